"""Where decisions live: pure code, no event loop, no I/O, time passed in.

``lifecycle`` is one backend's state machine; ``orchestrator`` holds every service and
makes the decisions that span them (idle deadlines, the open-connection gate, the
dependents' veto, group consensus, the API's refusals, wake fan-out, escalations).
The asyncio glue (``wakeproxy.serve.service`` and friends) feeds events in and carries the
actions out; nothing here can block, sleep or touch a socket.
"""
