"""MCP as the proxy reads it, without a socket: which requests only set a session up,
what is learned from a server's answers and what is answered from it, and the head
rewrite that maps a session's id (httpmode.mcp, httpmode.heads, httpmode.mcpfront)."""

from __future__ import annotations

import asyncio
import os

import orjson
import pytest

from wakeproxy.config.model import HttpSettings, McpConfig
from wakeproxy.core.sessions import MINTED, Session
from wakeproxy.httpmode.heads import parse_head, with_header
from wakeproxy.httpmode.mcp import (
    Answer,
    Kind,
    Learned,
    classify,
    response_in,
)
from wakeproxy.httpmode.mcpfront import McpFront
from wakeproxy.httpmode.mcpstore import McpStore, _from_state, _to_state


def message(method: str | None, id_: object = 1, **params: object) -> bytes:
    data: dict[str, object] = {"jsonrpc": "2.0"}
    if method is not None:
        data["method"] = method
    if id_ is not None:
        data["id"] = id_
    if params:
        data["params"] = params
    return orjson.dumps(data)


@pytest.mark.parametrize(
    ("body", "header", "kind", "activity"),
    [
        (message("initialize", protocolVersion="2025-11-25"), b"", Kind.INITIALIZE, False),
        (message("notifications/initialized", None), b"", Kind.INITIALIZED, False),
        (message("ping"), b"", Kind.PING, False),
        (message("server/discover"), b"server/discover", Kind.DISCOVER, False),
        (message("subscriptions/listen"), b"subscriptions/listen", Kind.LISTEN, False),
        (message("tools/call", name="x"), b"", Kind.WORK, True),
        (message("tools/list"), b"tools/list", Kind.WORK, True),
        (message("notifications/cancelled", None), b"", Kind.WORK, True),
        # A header that disagrees with its body: the server refuses it; never set-up.
        (message("tools/call"), b"ping", Kind.WORK, True),
        (message("ping"), b"tools/call", Kind.WORK, True),
        # initialize without a version, a notification with an id: not what they name.
        (message("initialize"), b"", Kind.WORK, True),
        (message("notifications/initialized", 3), b"", Kind.WORK, True),
        (message("ping", None), b"", Kind.WORK, True),
        # A client's response to the server's request, a batch, not JSON-RPC at all.
        (b'{"jsonrpc":"2.0","id":4,"result":{}}', b"", Kind.WORK, True),
        (b"[" + message("tools/list") + b"]", b"", Kind.WORK, True),
        (b"{not json", b"", Kind.WORK, True),
        (b'"a string"', b"", Kind.WORK, True),
    ],
)
def test_what_is_set_up_and_what_is_work(body, header, kind, activity):
    found = classify(body, header)
    assert found.kind is kind
    assert found.activity is activity


def test_a_batch_of_set_up_goes_to_the_server_yet_is_no_activity():
    batch = b"[" + message("initialize", protocolVersion="x") + b"," + message("ping") + b"]"
    found = classify(batch)
    assert found.kind is Kind.WORK and not found.activity


def test_an_unread_body_is_classified_by_its_header():
    assert classify(None, b"subscriptions/listen").kind is Kind.LISTEN
    # Set-up is tiny: a body too large to read is work, whatever the header says.
    assert classify(None, b"ping").kind is Kind.WORK
    assert classify(None).expects_result


def test_the_id_is_echoed_as_the_client_wrote_it():
    for raw_id in (b"0", b'"abc"', b"12345678901234567890", b'"\\u00e9"'):
        body = b'{"jsonrpc":"2.0","id":' + raw_id + b',"method":"ping"}'
        found = classify(body)
        assert orjson.loads(found.id) == orjson.loads(raw_id)
        answer = Answer(200, "application/json", {"jsonrpc": "2.0", "id": 1, "result": {}})
        assert orjson.loads(answer.body(found.id))["id"] == orjson.loads(raw_id)


def test_a_response_is_found_in_json_and_in_an_event_stream():
    response = {"jsonrpc": "2.0", "id": 7, "result": {"protocolVersion": "v"}}
    data = orjson.dumps(response)
    assert response_in(b"application/json", data, b"7") == response
    stream = b": ping\r\n\r\nevent: message\r\ndata: " + data + b"\r\n\r\n"
    assert response_in(b"text/event-stream", stream, b"7") == response
    assert response_in(b"text/event-stream", stream[:-10], b"7") is None, "not whole yet"
    assert response_in(b"application/json", data, b"8") is None, "another request's"
    # A legacy server's error to server/discover names an id of its own.
    error = {"jsonrpc": "2.0", "id": "server-error", "error": {"code": -32600, "message": "x"}}
    assert response_in(b"application/json", orjson.dumps(error), b"1") == error


def _answer(name: str = "srv", *, stateful: bool = True) -> Answer:
    result = {"protocolVersion": "2025-06-18", "serverInfo": {"name": name, "version": "1"}}
    message = {"jsonrpc": "2.0", "id": 0, "result": result}
    return Answer(200, "application/json", message, stateful=stateful)


def test_learned_answers_are_used_only_on_their_endpoint_and_for_accepted_credentials():
    open_server = Learned()
    assert open_server.learn(Kind.INITIALIZE, "2025-06-18", "/mcp", b"", _answer())
    assert open_server.admits("/mcp", b"") and not open_server.admits("/other", b"")
    # Credentials the server never saw are not known to be enough (a server may answer
    # one token and refuse another): forwarded.
    assert not open_server.admits("/mcp", b"Bearer any")
    assert open_server.server_name() == "srv"
    assert not open_server.learn(Kind.INITIALIZE, "2025-06-18", "/mcp", b"", _answer()), "same"
    # A refusal of a request with no credentials: they are no longer enough.
    assert open_server.refused("/mcp", b"") and not open_server.admits("/mcp", b"")

    guarded = Learned()
    guarded.learn(Kind.INITIALIZE, "2025-06-18", "/mcp", b"Bearer good", _answer())
    assert guarded.admits("/mcp", b"Bearer good")
    assert not guarded.admits("/mcp", b"") and not guarded.admits("/mcp", b"Bearer bad")
    assert "good" not in str(guarded.to_state()), "a digest is kept, never the token"
    # An error (a legacy server's answer to server/discover) says nothing of them.
    error = Answer(400, "application/json", {"jsonrpc": "2.0", "id": 1, "error": {}})
    guarded.learn(Kind.DISCOVER, "2026-07-28", "/mcp", b"", error)
    assert not guarded.open and not guarded.admits("/mcp", b"")

    # Another endpoint: what was learned of the old one no longer applies, nor whose
    # credentials were accepted there.
    guarded.learn(Kind.DISCOVER, "2026-07-28", "/v2/mcp", b"", error)
    assert guarded.initialize == {} and guarded.endpoint == "/v2/mcp"
    assert guarded.auth == [] and not guarded.admits("/v2/mcp", b"Bearer good")


def test_the_learned_state_round_trips_and_anything_else_is_refused():
    learned = Learned()
    learned.learn(Kind.INITIALIZE, "2025-06-18", "/mcp", b"", _answer())
    learned.learn(Kind.DISCOVER, "2026-07-28", "/mcp", b"Bearer t", _answer("two"))
    state = orjson.loads(orjson.dumps(_to_state({"svc": learned, "empty": Learned()})))
    assert list(state["services"]) == ["svc"], "nothing learned: nothing written"
    assert _from_state(state)["svc"] == learned
    for broken in (
        {"version": 2, "services": {}},
        {"version": 1, "services": []},
        {"version": 1, "services": {"s": {"endpoint": "no-slash"}}},
        {"version": 1, "services": {"s": {"endpoint": "/m", "initialize": {"v": {"status": 200}}}}},
        {"version": 1, "services": {"s": {"endpoint": "/m", "auth": ["short"]}}},
    ):
        with pytest.raises(ValueError):
            _from_state(broken)


def test_a_session_id_is_set_in_a_head_whatever_its_case():
    raw = b"POST /mcp HTTP/1.1\r\nHost: x\r\nMCP-Session-Id: wp-1\r\nContent-Length: 2\r\n\r\n"
    rewritten = with_header(raw, b"Mcp-Session-Id", b"server-9")
    head = parse_head(rewritten)
    assert head.get(b"mcp-session-id") == b"server-9" and head.length == 2
    assert rewritten.count(b"wp-1") == 0 and rewritten.endswith(b"\r\n\r\n")
    added = with_header(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"Mcp-Session-Id", b"s")
    assert parse_head(added).get(b"mcp-session-id") == b"s"


def _front(**settings: object) -> McpFront:
    store = McpStore(McpConfig(state_file=None))
    front = McpFront("svc", HttpSettings(**settings), store, McpConfig())  # type: ignore[arg-type]
    front.learned.learn(Kind.INITIALIZE, "2025-06-18", "/mcp", b"", _answer())
    front.asleep = lambda _: True
    return front


INIT_HEAD = b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n"


def _sid(reply: bytes) -> bytes:
    lines = reply.split(b"\r\n")
    return next(line.split(b": ")[1] for line in lines if line.startswith(b"Mcp-Session-Id"))


def test_a_session_opened_while_the_server_sleeps_is_virtual_until_its_first_real_request():
    front = _front()
    body = message("initialize", 3, protocolVersion="2025-06-18")
    head = parse_head(INIT_HEAD)
    reply = front.answer(head, classify(body), INIT_HEAD + body, "10.0.0.1", 1)
    assert reply is not None and reply.startswith(b"HTTP/1.1 200 OK")
    answer_body = orjson.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert answer_body["id"] == 3 and answer_body["result"]["serverInfo"]["name"] == "srv"
    sid = _sid(reply)
    assert MINTED.fullmatch(sid)
    # The server awake: forwarded (the server answers, the proxy learns from it).
    front.asleep = lambda _: False
    assert front.answer(head, classify(body), INIT_HEAD + body, "10.0.0.1", 1) is None
    front.asleep = lambda _: True

    class Backend:
        name, incarnation, backend, cfg = "svc", 5, None, None

    opening, _ = front.route_to(sid, Backend())  # type: ignore[arg-type]
    assert isinstance(opening, Session) and opening.init == INIT_HEAD + body
    front.sessions.materialized(sid, b"server-1", 5, None)
    assert front.route_to(sid, Backend()) == (None, b"server-1")  # type: ignore[arg-type]
    # The client may adopt the id the server's answers carry: the same session.
    assert front.route_to(b"server-1", Backend()) == (None, b"")  # type: ignore[arg-type]


def test_one_connection_cannot_hold_sessions_without_bound():
    front = _front()
    body = message("initialize", 1, protocolVersion="2025-06-18")
    head, request = parse_head(INIT_HEAD), INIT_HEAD + body

    def status(connection: int) -> bytes:
        reply = front.answer(head, classify(body), request, "p", connection)
        assert reply is not None
        return reply[9:12]

    assert [status(7) for _ in range(100)] == [b"200"] * 100
    assert status(7) == b"429" and front.sessions.refused == 1
    # Another connection of the same client is not held back; a session that ended
    # gives its place back.
    assert status(8) == b"200"
    front.sessions.end(next(iter(front.sessions._sessions)))
    assert status(7) == b"200"


def test_set_up_of_a_session_is_answered_on_its_own_endpoint_only():
    front = _front()
    body = message("initialize", 1, protocolVersion="2025-06-18")
    sid = _sid(front.answer(parse_head(INIT_HEAD), classify(body), INIT_HEAD + body, "p", 1) or b"")
    ping = message("ping", 2)
    for path, answered in (("/mcp", True), ("/elsewhere", False)):
        raw = f"POST {path} HTTP/1.1\r\nHost: x\r\nMcp-Session-Id: {sid.decode()}\r\n\r\n"
        assert (
            front.answer(parse_head(raw.encode()), classify(ping), b"", "p", 1) is not None
        ) is answered
    # A session the proxy does not hold and did not mint: the server's to answer.
    head = parse_head(b"POST /mcp HTTP/1.1\r\nHost: x\r\nMcp-Session-Id: theirs\r\n\r\n")
    assert front.answer(head, classify(ping), b"", "p", 1) is None
    # An initialize too big to keep for a replay is never answered here.
    big = message("initialize", 1, protocolVersion="2025-06-18", pad="x" * 5000)
    assert front.answer(parse_head(INIT_HEAD), classify(big), INIT_HEAD + big, "p", 1) is None


@pytest.mark.asyncio
async def test_a_state_file_that_is_no_regular_file_is_refused_unread(tmp_path, caplog):
    # A FIFO opened for reading would wait for a writer for ever.
    fifo = tmp_path / "mcp.json"
    os.mkfifo(fifo)
    store = McpStore(McpConfig(state_file=str(fifo)))
    await asyncio.wait_for(store.loaded(), 10)
    assert store.learned == {}
    assert "a FIFO, not a regular file" in caplog.text and str(fifo) in caplog.text


@pytest.mark.asyncio
async def test_learned_answers_are_written_once_after_a_burst_and_read_back(tmp_path):
    path = tmp_path / "state" / "mcp.json"
    store = McpStore(McpConfig(state_file=str(path)))
    for name in ("a", "b"):
        store.of(name).learn(Kind.INITIALIZE, "2025-06-18", "/mcp", b"", _answer(name))
        store.changed()
    await store.close()  # a change pending: written now
    again = McpStore(McpConfig(state_file=str(path)))
    await again.loaded()
    assert again.learned["b"].server_name() == "b" and set(again.learned) == {"a", "b"}
