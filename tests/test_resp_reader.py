"""The RESP reader (kvckpt/stores/redis/resp.py) fed byte streams directly, split anywhere, no socket;
its caps against hostile streams; the retry policy's jitter bounds."""

from __future__ import annotations

import http.server
import logging
import threading
import tracemalloc
from collections.abc import Iterator, Sequence

import pytest
import redis.exceptions as rex
from hypothesis import given, settings
from hypothesis import strategies as st

import kvckpt
from kvckpt.errors import StoreProtocolError
from kvckpt.stores.redis import resp
from kvckpt.stores.redis.resp import Reply, RespReader
from kvckpt.stores.redis.retry import RetryPolicy


class Pieces:
    """A ``recv_into`` handing out ``data`` in pieces of the given sizes (the last size repeats),
    never more than the view asks for; 0 at the end of the data."""

    def __init__(self, data: bytes, sizes: Sequence[int] = (1 << 30,)) -> None:
        self.data, self.sizes, self.at, self.calls = data, list(sizes), 0, 0

    def __call__(self, view: memoryview) -> int:
        size = self.sizes[min(self.calls, len(self.sizes) - 1)]
        self.calls += 1
        piece = self.data[self.at : self.at + min(size, view.nbytes)]
        view[: len(piece)] = piece
        self.at += len(piece)
        return len(piece)


def endless(byte: bytes) -> resp.RecvInto:
    """A stream that never ends and never sends CRLF."""

    def recv_into(view: memoryview) -> int:
        view[:] = byte * view.nbytes
        return view.nbytes

    return recv_into


def encode(value: Reply) -> bytes:
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, rex.RedisError):
        return b"-%s\r\n" % str(value).encode()
    if isinstance(value, str):
        return b"+%s\r\n" % value.encode()
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    return b"*%d\r\n" % len(value) + b"".join(encode(item) for item in value)


def same(a: Reply, b: Reply) -> bool:
    """Equal, error replies compared by class and text."""
    if isinstance(a, rex.RedisError) or isinstance(b, rex.RedisError):
        return type(a) is type(b) and str(a) == str(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


LINE_TEXT = st.text(st.characters(exclude_characters="\r\n", codec="utf-8"), max_size=40)
ERRORS = st.builds(lambda text: rex.ResponseError("ERR " + text), LINE_TEXT)
SCALARS = st.one_of(
    st.none(),
    LINE_TEXT,
    st.integers(-(2**63), 2**63 - 1),
    st.binary(max_size=300),
    ERRORS,
)
REPLIES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5), max_leaves=30)


def read_all(data: bytes, count: int, sizes: Sequence[int], buffer_size: int = 7) -> list[Reply]:
    reader = RespReader(Pieces(data, sizes), buffer_size=buffer_size)
    return [reader.reply() for _ in range(count)]


@settings(max_examples=300, deadline=None)
@given(
    replies=st.lists(REPLIES, min_size=1, max_size=6),
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=20),
    buffer_size=st.integers(1, 64),
)
def test_any_chunking_reads_back_what_was_sent(
    replies: list[Reply], sizes: list[int], buffer_size: int
) -> None:
    got = read_all(b"".join(map(encode, replies)), len(replies), sizes, buffer_size)
    assert same(got, list(replies))


SAMPLE: list[Reply] = [
    "OK",
    -(2**63),
    b"",
    b"a\r\nb" * 40,
    None,
    [],
    [b"x", [1, None, [b"yz", "PONG"]], rex.ResponseError("ERR wrong")],
    rex.MovedError("3999 127.0.0.1:6381"),
]


def test_a_stream_split_at_every_byte_reads_the_same() -> None:
    data = b"".join(map(encode, SAMPLE[:-1])) + b"-MOVED 3999 127.0.0.1:6381\r\n"
    for cut in range(len(data) + 1):
        reader = RespReader(Pieces(data, [cut or 1, 1 << 20]), buffer_size=8)
        got = [reader.reply() for _ in SAMPLE]
        assert same(got, SAMPLE), cut


@settings(max_examples=200, deadline=None)
@given(
    value=st.binary(max_size=5000),
    room=st.integers(0, 100),
    sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=10),
    direct=st.integers(1, 2000),
)
def test_bulk_into_lands_in_the_callers_buffer(
    value: bytes, room: int, sizes: list[int], direct: int
) -> None:
    """Buffered and direct receives (into the destination itself) give the same bytes, followed by
    the next reply intact."""
    data = encode(value) + b"$-1\r\n-ERR gone\r\n+OK\r\n"
    reader = RespReader(Pieces(data, sizes), buffer_size=16)
    dest = bytearray(b"\xee" * (len(value) + room))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(resp, "DIRECT_RECV", direct)
        assert reader.bulk_into(memoryview(dest), "GETRANGE") == len(value)
    assert dest == value + b"\xee" * room
    assert reader.bulk_into(memoryview(dest), "GETRANGE") == 0  # nil: nothing written
    error = reader.bulk_into(memoryview(dest), "GETRANGE")
    assert isinstance(error, rex.ResponseError) and str(error) == "ERR gone"
    assert reader.reply() == "OK"


def test_a_large_bulk_is_received_straight_into_the_destination() -> None:
    value = bytes(range(256)) * 1024
    stream = Pieces(encode(value), [64, 1 << 30])  # a first piece, then all the view asks for
    dest = bytearray(len(value))
    assert RespReader(stream, buffer_size=64).bulk_into(memoryview(dest), "GETRANGE") == len(value)
    assert dest == value
    assert stream.calls < 10  # not len(value) / 64 copies through the read buffer


@pytest.mark.parametrize(
    ("stream", "complaint"),
    [
        (b"?what\r\n", "unknown type"),
        (b"HTTP/1.1 400 Bad Request\r\n", "unknown type"),
        (b"$abc\r\n", "not a number"),
        (b"*1x\r\n:1\r\n", "not a number"),
        (b":12a\r\n", "not a number"),
        (b": 12\r\n", "not a number"),
        (b":123456789012345678901\r\n", "not a number"),
        (b"$\r\n", "not a number"),
        (b"$-2\r\n", "of length -2"),
        (b"*-5\r\n", "of length -5"),
        (b"$3\r\nabcXY", "not followed by CRLF"),
        (b"$3\r\nabc\n+OK\r\n", "not followed by CRLF"),
        (b"<!DOCTYPE HTML>\n<html>", "unknown type"),  # no CRLF to wait for: the first byte tells
    ],
)
def test_malformed_replies_are_typed_errors(stream: bytes, complaint: str) -> None:
    reader = RespReader(Pieces(stream, [1]), source="Redis at here:1")
    with pytest.raises(StoreProtocolError, match=complaint) as caught:
        reader.reply()
    assert str(caught.value).startswith("Redis at here:1 ")
    assert "check that the URL names a Redis server" in str(caught.value)
    assert isinstance(caught.value, kvckpt.StoreUnavailableError)


@pytest.mark.parametrize("kind", [b"+", b"-", b":", b"$", b"*"])
def test_a_line_without_end_is_refused_after_max_line(kind: bytes) -> None:
    """An endless line is refused once it passes the cap, not read until memory runs out."""
    sent = 0
    endless_a = endless(b"a")

    def recv_into(view: memoryview) -> int:
        nonlocal sent
        got = kind if sent == 0 else b""
        view[: len(got)] = got
        n = len(got) or endless_a(view)
        sent += n
        return n

    with pytest.raises(StoreProtocolError, match="without CRLF"):
        RespReader(recv_into, max_line=1000, buffer_size=64).reply()
    assert sent < 3000


def test_the_default_line_cap_holds_a_long_error_reply() -> None:
    text = b"ERR " + b"x" * (resp.MAX_LINE - 10)
    error = RespReader(Pieces(b"-" + text + b"\r\n", [4096])).reply()
    assert isinstance(error, rex.ResponseError) and str(error) == text.decode()


def test_nesting_past_the_depth_cap_is_refused_without_recursion() -> None:
    with pytest.raises(StoreProtocolError, match="nested over 200 deep"):
        RespReader(Pieces(b"*1\r\n" * 10_000 + b":1\r\n")).reply()
    value: Reply = 1
    for _ in range(resp.MAX_DEPTH):
        value = [value]
    assert RespReader(Pieces(encode(value))).reply() == value  # as deep as allowed: read


@pytest.mark.parametrize(
    ("header", "complaint"),
    [
        (b"$2147483647\r\n", "bulk string of length 2,147,483,647, over 1,073,741,824 bytes"),
        (b"$9223372036854775807\r\n", "over 1,073,741,824 bytes"),
        (b"*999999999\r\n", "array of length 999,999,999, over 16,777,216 elements"),
    ],
)
def test_absurd_lengths_are_refused_before_any_allocation(header: bytes, complaint: str) -> None:
    reader = RespReader(Pieces(header + b"x" * 100))
    tracemalloc.start()
    try:
        with pytest.raises(StoreProtocolError, match=complaint):
            reader.reply()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_bulk_larger_than_the_destination_is_refused() -> None:
    reader = RespReader(Pieces(b"$5000\r\n" + b"x" * 5002))
    with pytest.raises(StoreProtocolError, match=r"length 5,000, over 4,096 bytes, what GETRANGE asked for"):
        reader.bulk_into(memoryview(bytearray(4096)), "GETRANGE")
    with pytest.raises(StoreProtocolError, match="answered GETRANGE with b':1'"):
        RespReader(Pieces(b":1\r\n")).bulk_into(memoryview(bytearray(8)), "GETRANGE")


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0/ns", "redis+cluster://127.0.0.1:1/ns"])
def test_the_caps_refuse_no_value_kvckpt_stores(url: str) -> None:
    store = kvckpt.open_store(url)  # not connected: capabilities need no server
    assert resp.MAX_BULK >= store.capabilities.max_value_bytes  # every chunk and record fits
    assert RespReader(Pieces(b"$3\r\nabc\r\n"), max_bulk=3).reply() == b"abc"
    assert RespReader(Pieces(b"*2\r\n:1\r\n:2\r\n"), max_array=2).reply() == [1, 2]


def test_a_stream_that_ends_mid_reply_is_a_connection_error() -> None:
    for data in (b"", b"$10\r\nabc", b"*2\r\n:1\r\n", b"+OK"):
        with pytest.raises(rex.ConnectionError, match="closed the connection mid-reply"):
            RespReader(Pieces(data)).reply()


@pytest.fixture
def http_port() -> Iterator[int]:
    """Another service where a Redis URL points: Python's own HTTP server."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_a_url_at_another_service_is_a_protocol_error_not_retried(
    http_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kvckpt")
    store = kvckpt.open_store(f"redis://127.0.0.1:{http_port}/0/ns", timeout=5, retries=3)
    try:
        with pytest.raises(StoreProtocolError, match=f"Redis at 127.0.0.1:{http_port} sent a reply"):
            store.get("ns/k")
    finally:
        store.close()
    assert not [r for r in caplog.records if "retry" in r.getMessage()]


def test_equal_jitter_stays_between_half_and_all_of_the_delay() -> None:
    policy = RetryPolicy(backoff=0.1, backoff_cap=0.5)
    ceilings = [0.1, 0.2, 0.4, 0.5, 0.5]
    for attempt, ceiling in enumerate(ceilings):
        assert policy.delay(attempt, draw=lambda: 0.0) == pytest.approx(ceiling / 2)
        assert policy.delay(attempt, draw=lambda: 0.999999) == pytest.approx(ceiling, rel=1e-5)
        assert policy.delay(attempt, draw=lambda: 0.5) == pytest.approx(0.75 * ceiling)
        waits = [policy.delay(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert len(set(waits)) > 1  # drawn, not fixed
