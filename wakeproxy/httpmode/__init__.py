"""``mode: http``: read request heads so a health probe never wakes a backend.

Bytes are forwarded unchanged; the proxy only reads what its decisions need:

* each request head (``heads``: checked by one grammar, read on demand). A probe
  (``http.probes`` plus the
  gateway's SSE check, ``answers``) is answered by the proxy while the backend sleeps
  and forwarded while it is awake; it never counts as activity.
* request bodies are only counted (Content-Length) or followed chunk by chunk (chunked,
  ``chunks``: stricter than h11 where leniency could let two parsers disagree) to find
  where the next head starts. Small JSON POST bodies are read to
  tell MCP session set-up (``initialize``, ``ping``...) from real work.
* responses are followed with ``idle_connections: allow-sleep`` (``tracker``): a request
  whose response has not ended blocks sleep, as does a POST answered 202 (its result may
  still be due on an event stream) for ``inflight_grace`` seconds; otherwise only probes'
  responses, so a connection of probes lets go of the backend once they are answered.

``client`` is the connection's Protocol. Errors a client can read: 400 bad request, 408
no head within ``header_timeout``, 431 head over 16 KiB, 501 a transfer coding other than
chunked, 502 backend refused, 503 hold queue full (or too many partial heads), 504 wake
timeout.
"""
