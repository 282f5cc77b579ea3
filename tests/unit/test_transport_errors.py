"""The transport's error boundary: every exception aiohttp, the socket layer or the JSON decoder can raise while
the gateway talks to a node comes out as one of the documented errors (Unreachable before the reply, BrokenStream
during it, Timeout, Refused, Malformed), naming the foreign exception it replaced; cancellations and bugs pass
through untouched. The NDJSON reader and the health probe over the same tree, without sockets."""

import asyncio
import ssl
from collections.abc import Iterator

import aiohttp
import orjson
import pytest
from aiohttp.client_reqrep import ConnectionKey
from tests.unit.dispatch_support import Grid, store_writer

from gridserve.gateway.registry.health import probe
from gridserve.gateway.transport import (
    BrokenStream,
    Malformed,
    Refused,
    Timeout,
    TransportError,
    Unreachable,
)
from gridserve.gateway.transport import http as http_transport
from gridserve.gateway.transport.errors import Phase, map_errors
from gridserve.gateway.transport.http import HttpEventStream
from gridserve.store import StoreWriter
from gridserve.trust import Identity
from gridserve.types import NodeId, TokenEvent


def _connector_error() -> aiohttp.ClientConnectorError:
    key = ConnectionKey("n1.test", 9000, False, True, None, None, None)
    return aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "Connection refused"))


def _json_error() -> orjson.JSONDecodeError:
    try:
        orjson.loads(b'{"text": "a", "tok')
    except orjson.JSONDecodeError as exc:
        return exc
    raise AssertionError("orjson accepted a garbled line")


FOREIGN: list[tuple[BaseException, Phase, type[TransportError]]] = [
    (_connector_error(), "open", Unreachable),
    (aiohttp.ServerDisconnectedError(), "open", Unreachable),
    (aiohttp.ClientConnectionResetError("Cannot write to closing transport"), "open", Unreachable),
    (ConnectionResetError(104, "Connection reset by peer"), "open", Unreachable),
    (OSError(113, "No route to host"), "open", Unreachable),
    (aiohttp.InvalidURL("http//bad"), "open", Unreachable),
    (aiohttp.ConnectionTimeoutError("connect timed out"), "open", Timeout),
    (TimeoutError(), "open", Timeout),
    (aiohttp.ServerDisconnectedError(), "read", BrokenStream),
    (aiohttp.ClientPayloadError("Response payload is not completed"), "read", BrokenStream),
    (aiohttp.ClientConnectionResetError("Cannot write to closing transport"), "read", BrokenStream),
    (aiohttp.ClientOSError(104, "Connection reset by peer"), "read", BrokenStream),
    (ConnectionResetError(104, "Connection reset by peer"), "read", BrokenStream),
    (aiohttp.SocketTimeoutError("read timed out"), "read", Timeout),
    (_json_error(), "read", Malformed),
    (ValueError("Chunk too big"), "read", Malformed),
    (aiohttp.ClientResponseError(None, (), status=502, message="Bad Gateway"), "read", Refused),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(
    ("foreign", "phase", "expected"),
    FOREIGN,
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_every_foreign_exception_becomes_one_of_the_tree(
    foreign: BaseException, phase: Phase, expected: type[TransportError]
) -> None:
    with pytest.raises(TransportError) as caught, map_errors(phase):
        raise foreign
    assert type(caught.value) is expected and caught.value.__cause__ is foreign
    if not isinstance(caught.value, Refused):
        assert caught.value.cause == type(foreign).__name__ == caught.value.why


def test_a_certificate_that_does_not_verify_says_what_to_do() -> None:
    key = ConnectionKey("n1.test", 9443, True, True, None, None, None)
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_message = "unable to get local issuer certificate"
    with pytest.raises(Unreachable) as caught, map_errors("open"):
        raise aiohttp.ClientConnectorCertificateError(key, error)
    assert caught.value.why == "TLS certificate does not verify"
    assert "unable to get local issuer certificate" in caught.value.detail and "--node-ca-file" in caught.value.detail


@pytest.mark.parametrize("phase", ["open", "read"])
def test_cancellations_bugs_and_the_trees_own_errors_pass_through(phase: Phase) -> None:
    for own in (asyncio.CancelledError(), RuntimeError("a bug"), KeyError("k"), BrokenStream("already mapped")):
        with pytest.raises(type(own)) as caught, map_errors(phase):
            raise own
        assert caught.value is own


def test_a_value_error_before_anything_was_read_is_not_blamed_on_the_node() -> None:
    with pytest.raises(ValueError, match="bad header"), map_errors("open"):
        raise ValueError("bad header")


def test_refused_keeps_the_status_and_the_nodes_message() -> None:
    error = Refused(503, "not registered", body='{"error": {"message": "not registered"}}')
    assert (error.status, error.message, str(error)) == (503, "not registered", "answered 503: not registered")


# -- the NDJSON stream reader -----------------------------------------------------------------------------------


def _read_all(data: bytes) -> list[object]:
    async def go() -> list[object]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        stream = HttpEventStream(reader, lambda: None)
        out: list[object] = []
        while (event := await stream.next()) is not None:
            out.append(event)
        return out

    return asyncio.run(go())


def test_the_stream_reader_yields_each_line_as_an_event_and_skips_blank_lines() -> None:
    data = b'{"text": "a", "token_ids": [1]}\n\n  \n{"finish_reason": "stop"}\n'
    assert _read_all(data) == [{"text": "a", "token_ids": [1]}, {"finish_reason": "stop"}]


def test_the_stream_reader_reads_back_the_lines_a_node_writes() -> None:
    sent = [TokenEvent(text="a", token_ids=(1,)).wire(), TokenEvent(finish_reason="stop", completion_tokens=1).wire()]
    sent[1]["receipt"] = "{envelope}"
    assert _read_all(b"".join(orjson.dumps(e) + b"\n" for e in sent)) == sent


@pytest.mark.parametrize("line", [b'{"text": "a", "tok\n', b"[1, 2]\n", b'"text"\n'], ids=["garbled", "list", "string"])
def test_a_line_that_is_not_a_json_object_is_malformed(line: bytes) -> None:
    with pytest.raises(Malformed):
        _read_all(b'{"text": "a"}\n' + line)


def test_the_stream_reader_joins_lines_cut_across_reads_and_takes_a_last_line_without_its_newline() -> None:
    async def go() -> list[object]:
        reader = asyncio.StreamReader()
        stream = HttpEventStream(reader, lambda: None)
        out: list[object] = []
        for piece in (b'{"text": "a", "tok', b'en_ids": [1]}\n{"text"', b': "b"}\n\n{"finish_reason": "stop"}'):
            reader.feed_data(piece)
            await asyncio.sleep(0)
        reader.feed_eof()
        while (event := await stream.next()) is not None:
            out.append(event)
        return out

    assert asyncio.run(go()) == [{"text": "a", "token_ids": [1]}, {"text": "b"}, {"finish_reason": "stop"}]


def test_the_stream_reader_is_ready_only_when_a_token_is_already_here() -> None:
    """`ready`: the next event is a token already read (the API then sends it with the one before in one write);
    not the last event, an error or a busy line, and not a token whose line has not ended."""

    async def go() -> list[tuple[bool, object]]:
        reader = asyncio.StreamReader()
        stream = HttpEventStream(reader, lambda: None)
        reader.feed_data(b'{"text": "a"}\n{"text": "\\"finish_reason\\""}\n{"busy": 1}\n{"text": "c"}\n')
        seen = [(stream.ready(), await stream.next())]  # nothing read yet: not ready
        seen.append((stream.ready(), await stream.next()))  # a token whose text names a key is still a token
        seen.append((stream.ready(), await stream.next()))  # a busy line next: not ready (it is skipped)
        reader.feed_data(b'{"error": {"message": "x"}}\n{"text": "d"')
        await asyncio.sleep(0)
        seen.append((stream.ready(), await stream.next()))  # the error
        seen.append((stream.ready(), None))  # half a line: not ready
        reader.feed_data(b'}\n{"finish_reason": "stop"}\n')
        seen.append((stream.ready(), await stream.next()))
        seen.append((stream.ready(), await stream.next()))  # the last event next: not ready
        return seen

    assert asyncio.run(go()) == [
        (False, {"text": "a"}),
        (True, {"text": '"finish_reason"'}),
        (False, {"text": "c"}),
        (False, {"error": {"message": "x"}}),
        (False, None),
        (False, {"text": "d"}),
        (False, {"finish_reason": "stop"}),
    ]


def test_a_line_past_the_longest_allowed_is_malformed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_transport, "MAX_LINE_BYTES", 64)
    with pytest.raises(Malformed, match="longer than 64 bytes"):
        _read_all(b'{"text": "' + b"x" * 100)


class _BreakingSource:
    async def read(self, n: int) -> bytes:
        raise aiohttp.ClientPayloadError("Response payload is not completed")


def test_a_connection_that_breaks_mid_stream_is_a_broken_stream() -> None:
    closed: list[bool] = []
    stream = HttpEventStream(_BreakingSource(), lambda: closed.append(True))
    with pytest.raises(BrokenStream) as caught:
        asyncio.run(stream.next())
    assert caught.value.why == "ClientPayloadError"
    stream.close()
    assert closed == [True]


# -- probes and loads through the fake --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def writer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreWriter]:
    yield from store_writer(tmp_path_factory.mktemp("store"))


@pytest.mark.parametrize(
    ("failure", "reported"),
    [
        (None, ""),
        (Refused(503, "draining"), "HTTP 503"),
        (Timeout("timed out", cause="TimeoutError"), "no answer in 1.0 s"),
        (Unreachable("refused", cause="ClientConnectorError"), "ClientConnectorError"),
    ],
    ids=["healthy", "refused", "timeout", "unreachable"],
)
def test_a_probe_reports_health_and_why_not(writer: StoreWriter, failure: TransportError | None, reported: str) -> None:
    grid = Grid(writer, nodes=1)
    if failure is not None:
        grid.fake.health["n1"] = failure
    key = Identity.generate()
    ok, rtt, error, foreign = asyncio.run(probe(grid.fake, NodeId("n1"), "http://n1.test", 1.0, key.public_key))
    assert (ok, error) == (failure is None, reported) and 0.0 <= rtt < 0.1 and grid.fake.probes == ["n1"]
    assert ("does not sign" in foreign) if ok else foreign == ""  # (the fake holds no key for n1: it signs nothing)


def test_a_probe_answered_with_the_nodes_own_key_is_its_own(writer: StoreWriter) -> None:
    grid, key = Grid(writer, nodes=1), Identity.generate()
    grid.fake.identities[key.node_id] = key
    ok, _, error, foreign = asyncio.run(probe(grid.fake, NodeId(key.node_id), "http://n.test", 1.0, key.public_key))
    assert (ok, error, foreign) == (True, "", "")
    other = Identity.generate()  # the same endpoint's answer, checked against a key that registered it wrongly
    ok, _, _, foreign = asyncio.run(probe(grid.fake, NodeId(key.node_id), "http://n.test", 1.0, other.public_key))
    assert ok and "not signed by this node's key" in foreign


@pytest.mark.parametrize(
    ("failure", "answer"),
    [(None, True), (Refused(404, "unknown model"), False), (Unreachable("refused", cause="ClientOSError"), None)],
    ids=["took-it", "declined", "unreachable"],
)
def test_a_load_request_says_whether_the_node_took_it(
    writer: StoreWriter, failure: TransportError | None, answer: bool | None
) -> None:
    grid = Grid(writer, nodes=1)
    if failure is not None:
        grid.fake.load_answers["n1"] = failure
    assert asyncio.run(grid.dispatcher.ask_to_load("n1", {"model": "m"})) is answer
    assert grid.fake.loads == [("n1", {"model": "m"})]
    assert asyncio.run(grid.dispatcher.ask_to_load("nobody", {"model": "m"})) is None  # not on the grid
