"""RESP without sockets: commands packed to bytes, and replies read from any ``recv_into`` callable.

Kept apart from the connection (as redis-py keeps ``redis/_parsers/`` apart from ``connection.py``) so
the reader can be fed any byte stream, split anywhere, and tested without a server.

The reader speaks RESP2, which is what a connection gets unless it sends ``HELLO 3`` (kvckpt's never
does): simple strings, errors, integers, bulk strings (nil included) and arrays (nil included). A
RESP3 type byte is refused like any other unknown one.

What a broken or hostile server sends cannot make the reader allocate more than it received, recurse,
or read without end; each cap below raises StoreProtocolError:

- ``MAX_BULK`` (1 GiB) bounds a bulk string the reader allocates for. Every value kvckpt writes to
  Redis is at most its stores' ``max_value_bytes`` (512 MiB, Redis's default ``proto-max-bulk-len``),
  so the bound refuses none of them, with room for a server whose limit was raised, and refuses the
  2 GiB and larger lengths a garbled header claims. A bulk read into a caller's buffer is bounded by
  that buffer instead.
- ``MAX_ARRAY`` (16,777,216) bounds one array's length. The longest arrays kvckpt asks for are a
  SCAN page (COUNT 1000) and CLUSTER SLOTS (at most 16,384 ranges); elements are never allocated
  ahead of the bytes that carry them, so the bound only has to catch a nonsense header early.
- ``MAX_DEPTH`` (200, as redis-py) bounds nesting; kvckpt's deepest reply (CLUSTER SLOTS) has 4
  levels. Arrays are read with an explicit stack, never by recursion.
- ``MAX_LINE`` (64 KiB) bounds a type line (status, error, integer, length) without its CRLF.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TypeAlias, TypeVar

import redis.exceptions as rex

from kvckpt._buffers import flat_view, key_bytes
from kvckpt.errors import StoreProtocolError
from kvckpt.store import Buffer

#: A reply still missing at least this many bytes is received straight into its destination.
DIRECT_RECV = 64 << 10
READ_BUFFER = 256 << 10
#: A status, error, integer or length line longer than this means the stream is not RESP.
MAX_LINE = 64 << 10
#: The longest bulk string the reader allocates for (see the module doc).
MAX_BULK = 1 << 30
#: The most elements one array may announce (see the module doc).
MAX_ARRAY = 1 << 24
#: The deepest nesting of arrays accepted (see the module doc).
MAX_DEPTH = 200

#: A reply: status line (str), integer, bulk string (bytes, None when nil), array, or an error reply.
Reply: TypeAlias = "str | int | bytes | list[Reply] | rex.RedisError | None"
Arg: TypeAlias = "str | bytes | int | Buffer"
#: Reads into the view it is given and returns how many bytes it read (0: the stream ended).
RecvInto: TypeAlias = Callable[[memoryview], int]
T = TypeVar("T")

#: An integer or length: RESP2 integers are signed 64-bit (at most 19 digits).
_NUMBER = re.compile(rb"-?[0-9]{1,19}")
#: The first bytes of RESP2 replies: simple string, error, integer, bulk string, array.
_TYPES = frozenset(b"+-:$*")
_ADVICE = (
    "check that the URL names a Redis server (not another service) and that nothing between kvckpt "
    "and it (a proxy, a TLS terminator) alters the stream"
)

_ERROR_CODES: dict[bytes, type[rex.RedisError]] = {
    b"OOM": rex.OutOfMemoryError,
    b"NOAUTH": rex.AuthenticationError,
    b"WRONGPASS": rex.AuthenticationError,
    b"NOPERM": rex.NoPermissionError,
    b"READONLY": rex.ReadOnlyError,
    b"LOADING": rex.BusyLoadingError,
    b"TRYAGAIN": rex.TryAgainError,
    b"CLUSTERDOWN": rex.ClusterDownError,
}

#: Cluster redirections: the exception is built from the text after the code ("SLOT HOST:PORT").
_REDIRECTIONS: dict[bytes, type[rex.AskError]] = {b"MOVED": rex.MovedError, b"ASK": rex.AskError}


def server_error(line: bytes) -> rex.RedisError:
    """An error reply (after its '-') as the redis-py exception for its code (the reply's first word)."""
    code, _, rest = line.partition(b" ")
    text = line.decode("utf-8", "replace")
    redirection = _REDIRECTIONS.get(code)
    if redirection is not None and rest.count(b" ") == 1 and b":" in rest:
        return redirection(rest.decode("utf-8", "replace"))
    return _ERROR_CODES.get(code, rex.ResponseError)(text)


def raise_first(replies: Sequence[T]) -> list[T]:
    """``replies`` as a list, once none of them is an error reply (else the first one is raised)."""
    for reply in replies:
        if isinstance(reply, rex.RedisError):
            raise reply
    return list(replies)


# Packing ---------------------------------------------------------------------------------------


def arg_bytes(value: Arg) -> bytes:
    """One argument as the bytes sent for it (a buffer is copied: large values are sent unpacked)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return key_bytes(value)
    if isinstance(value, int):
        return str(value).encode()
    return bytes(flat_view(value))


def pack(*args: Arg) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in map(arg_bytes, args):
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


# Reading ---------------------------------------------------------------------------------------


class RespReader:
    """Replies from one byte stream, buffered; bulk values can land straight in the caller's memory.

    ``source`` names the peer in error messages. The buffer size and caps are the module's unless
    given (tests give small ones); the buffer grows to hold a line longer than itself. After any
    exception but a returned error reply the stream is out of step: the caller must drop it (and
    ``clear`` it for a new one).
    """

    def __init__(
        self,
        recv_into: RecvInto,
        *,
        source: str = "the server",
        buffer_size: int | None = None,
        max_line: int = MAX_LINE,
        max_bulk: int = MAX_BULK,
        max_array: int = MAX_ARRAY,
        max_depth: int = MAX_DEPTH,
    ) -> None:
        self.source = source
        self.max_line, self.max_bulk = max_line, max_bulk
        self.max_array, self.max_depth = max_array, max_depth
        self._recv = recv_into
        self._buf = bytearray(READ_BUFFER if buffer_size is None else buffer_size)
        self._view = memoryview(self._buf)
        self._pos = self._end = 0

    def clear(self) -> None:
        """Drop whatever is buffered: the stream behind ``recv_into`` starts anew (a new connection)."""
        self._pos = self._end = 0

    def reply(self) -> Reply:
        """The next reply; an error reply is returned as its redis-py exception, not raised."""
        stack: list[tuple[list[Reply], int]] = []  # the arrays being filled, and how many items each wants
        while True:
            line = self._line(typed=True)
            kind, rest = line[:1], line[1:]
            value: Reply
            if kind == b"*":
                count = self._length(rest, "an array", self.max_array, "elements, the most it may hold")
                if count > 0:
                    if len(stack) >= self.max_depth:
                        raise self._error(f"sent arrays nested over {self.max_depth} deep")
                    stack.append(([], count))
                    continue
                value = None if count < 0 else []
            else:
                value = self._scalar(kind, rest, line)
            while stack:
                items, count = stack[-1]
                items.append(value)
                if len(items) < count:
                    break
                stack.pop()
                value = items
            else:
                return value

    def bulk_into(self, dest: memoryview, what: str) -> int | rex.RedisError:
        """The next reply, a bulk string (``what`` asked for it) of at most ``dest.nbytes`` bytes, read
        into ``dest``; returns its length (0 for nil), or the error reply the server sent instead."""
        line = self._line(typed=True)
        kind = line[:1]
        if kind == b"-":
            return server_error(line[1:])
        if kind != b"$":
            raise self._error(f"answered {what} with {line[:40]!r}, not a bulk string")
        length = self._length(line[1:], "a bulk string", dest.nbytes, f"bytes, what {what} asked for")
        if length > 0:
            self._read_into(dest[:length])
        if length >= 0:
            self._crlf()
        return max(length, 0)

    def _scalar(self, kind: bytes, rest: bytes, line: bytes) -> Reply:
        if kind == b"$":
            length = self._length(rest, "a bulk string", self.max_bulk, "bytes, the most it may hold")
            if length < 0:
                return None
            data = bytearray(length)
            self._read_into(memoryview(data))
            self._crlf()
            return bytes(data)
        if kind == b"+":
            return rest.decode("utf-8", "replace")
        if kind == b":":
            return self._number(rest, "integer")
        assert kind == b"-"  # _line(typed=True) let no other type through
        return server_error(rest)

    def _number(self, text: bytes, what: str) -> int:
        if _NUMBER.fullmatch(text) is None:
            raise self._error(f"sent {what} {text[:40]!r}, not a number")
        return int(text)

    def _length(self, text: bytes, what: str, bound: int, unit: str) -> int:
        """The length of a bulk string or array: -1 (nil) or from 0 to ``bound`` (``unit``: what it is)."""
        length = self._number(text, f"a length of {what}")
        if length < -1:
            raise self._error(f"sent {what} of length {length}")
        if length > bound:
            raise self._error(f"sent {what} of length {length:,}, over {bound:,} {unit}")
        return length

    def _error(self, what: str) -> StoreProtocolError:
        return StoreProtocolError(
            f"{self.source} {what}: that is not a Redis reply, and the connection is out of step; {_ADVICE}",
            source=self.source,
        )

    def _fill(self) -> None:
        """Receive more bytes into the read buffer (at least one, or ConnectionError)."""
        if self._pos == self._end:
            self._pos = self._end = 0
        elif self._end == len(self._buf):  # full: move the unread tail to the front, or grow
            size = self._end - self._pos
            if self._pos == 0:  # one line fills the whole buffer (bounded by max_line)
                bigger = bytearray(2 * len(self._buf))
                bigger[:size] = self._view
                self._buf, self._view = bigger, memoryview(bigger)
            else:
                self._buf[:size] = self._buf[self._pos : self._end]  # a copy first: the ranges overlap
            self._pos, self._end = 0, size
        received = self._recv(self._view[self._end :])
        if not received:
            raise rex.ConnectionError(f"{self.source} closed the connection mid-reply")
        self._end += received

    def _line(self, typed: bool = False) -> bytes:
        """The next line without its CRLF; a ``typed`` one (a reply's first) is refused as soon as its
        first byte is no RESP2 type, rather than when a CRLF that may never come arrives."""
        scanned = self._pos  # where the search for CRLF resumes (one byte back: a CR may end a read)
        while True:
            if typed and self._end > self._pos and self._buf[self._pos] not in _TYPES:
                end = self._buf.find(b"\r\n", self._pos, self._end)
                head = bytes(self._view[self._pos : self._end if end < 0 else end][:40])
                raise self._error(f"sent a reply of unknown type {head!r}")
            at = self._buf.find(b"\r\n", scanned, self._end)
            if at >= 0:
                line = bytes(self._view[self._pos : at])
                self._pos = at + 2
                return line
            if self._end - self._pos > self.max_line:
                raise self._error(f"sent a line of over {self.max_line:,} bytes without CRLF")
            scanned = max(self._end - 1, self._pos) - self._pos
            self._fill()
            scanned += self._pos

    def _read_into(self, dest: memoryview) -> None:
        """Fill ``dest`` exactly: buffered bytes first, then straight from the stream when much is left."""
        want, got = dest.nbytes, 0
        while got < want:
            if self._pos == self._end and want - got >= DIRECT_RECV:
                received = self._recv(dest[got:])
                if not received:
                    raise rex.ConnectionError(f"{self.source} closed the connection mid-reply")
                got += received
                continue
            if self._pos == self._end:
                self._fill()
            take = min(self._end - self._pos, want - got)
            dest[got : got + take] = self._view[self._pos : self._pos + take]
            self._pos += take
            got += take

    def _crlf(self) -> None:
        while self._end - self._pos < 2:
            self._fill()
        if self._buf[self._pos] != 13 or self._buf[self._pos + 1] != 10:  # CR LF
            raise self._error("sent a bulk string not followed by CRLF")
        self._pos += 2
