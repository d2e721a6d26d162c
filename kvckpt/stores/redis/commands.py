"""The commands every Redis store sends, whatever carries them (kvckpt.stores.redis.operations): their
arguments, the replies they get, and the two conditional steps of the protocol (the commit, and
delete_if) as Lua scripts and, for servers without Lua (fakeredis), as WATCH + MULTI/EXEC rounds
that answer the same replies.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kvckpt.store import Buffer, Commit, RangeRead
from kvckpt.stores.redis.transport import Arg, Reply

Command = tuple[Arg, ...]  # ("SET", key, value, ...): the key is args[1], except for EVAL

REDIS_MAX_VALUE = 512 * 1024 * 1024
#: The least an ACL user needs (``ACL SETUSER name on >password ~NAMESPACE/* -@all`` + these);
#: ``config|get`` only serves check_server_settings, which skips quietly without it. ``eval`` runs the
#: commit script (whose own commands are in the list) and ``time`` reads the store's clock
#: (docs/protocol.md). ``client|id client|kill`` are optional: a second fence after a lost reply.
ACL_RULES = (
    "+get", "+set", "+getrange", "+getdel", "+pexpire", "+persist", "+exists", "+unlink", "+scan", "+ping",
    "+wait", "+strlen", "+eval", "+time",
    "+config|get",
)  # fmt: skip


def glob_escape(text: str) -> str:
    """Make ``text`` literal inside a Redis MATCH pattern (Redis escapes with backslash)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def as_bytes_view(value: Any) -> Any:
    """A 1-D byte view of a memoryview: redis-py measures arguments with len(), which counts items,
    not bytes. Any other argument is returned as it is."""
    if isinstance(value, memoryview) and (value.ndim != 1 or value.itemsize != 1):
        return value.cast("B")
    return value


def copy_into(into: memoryview, data: bytes) -> int:
    """Copy a GETRANGE reply into its read's buffer; a short reply means a missing or short value."""
    into = into.cast("B") if into.format != "B" else into
    n = min(len(data), into.nbytes)
    into[:n] = data[:n]
    return n


def ms(ttl: float) -> int:
    return max(1, round(ttl * 1000))


def px(ttl: float | None) -> list[Any]:
    """``PX milliseconds`` for a SET, or nothing."""
    return [] if ttl is None else ["PX", ms(ttl)]


def set_command(key: str, value: Buffer, ttl: float | None) -> Command:
    """SET of a data value, with its expiry when it has one."""
    return ("SET", key, value, *px(ttl))


def getrange_command(read: RangeRead) -> Command:
    """GETRANGE of the bytes ``read`` wants (Redis takes an inclusive end)."""
    return ("GETRANGE", read.key, read.offset, read.offset + read.into.nbytes - 1)


def str_of(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def expiry_commands(keys: Sequence[str], ttl: float | None) -> list[Command]:
    """PEXPIRE each key, or PERSIST + EXISTS (PERSIST is 0 for a key without expiry too)."""
    if ttl is None:
        return [c for key in keys for c in (("PERSIST", key), ("EXISTS", key))]
    return [("PEXPIRE", key, ms(ttl)) for key in keys]


def expiry_results(replies: Sequence[Any], ttl: float | None) -> list[bool]:
    return [bool(r) for r in (replies[1::2] if ttl is None else replies)]


def clock_of(reply: Any) -> float:
    """TIME's reply (seconds, microseconds) as seconds."""
    assert isinstance(reply, list | tuple) and len(reply) == 2, reply
    return int(reply[0]) + int(reply[1]) / 1e6


def scan_pages(execute: Callable[[list[Command]], list[Reply]], pattern: str) -> Iterator[Reply]:
    """Every key one server has that matches ``pattern``, by SCAN (a key may come more than once)."""
    cursor: Reply = b"0"
    while True:
        (reply,) = execute([("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)])  # type: ignore[list-item]
        assert isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], list)
        cursor = reply[0]
        yield from reply[1]
        if cursor in (b"0", "0", 0):
            return


def settings_of(reply: Reply) -> dict[str, str]:
    """``CONFIG GET maxmemory*``'s reply as a dict (for failures.check_settings)."""
    assert isinstance(reply, list)
    return {str_of(k): str_of(v) for k, v in zip(reply[::2], reply[1::2], strict=True)}


# The conditional steps ------------------------------------------------------------------------


@dataclass(frozen=True)
class Conditional:
    """One atomic check-then-write step of the protocol, in the two forms a server may run.

    ``script`` runs in the server (EVAL, sent whole: no SCRIPT LOAD permission or NOSCRIPT retry).
    ``watched`` does the same on a redis-py pipeline in WATCH mode, for a client whose server has no
    Lua: it reads under WATCH and writes in MULTI/EXEC, so a change to a watched key in between
    makes EXEC fail (redis.WatchError) and the step is tried again; it answers what the script
    answers. ``contended`` ends the error when the keys never stop changing.
    """

    script: str
    watched: Callable[[Any, Sequence[str], Sequence[Any]], Reply]
    contended: str

    def command(self, keys: Sequence[str], args: Sequence[Arg]) -> Command:
        return ("EVAL", self.script, len(keys), *keys, *args)


#: The commit rule (docs/protocol.md) as one server-side step. KEYS: the record, the save's liveness
#: marker (one hash slot). ARGV: the record, "1" for put-if-absent, the expiry in ms or "". Replies
#: {0}: the marker is gone (nothing changed); {1}: the record exists (create; nothing changed);
#: {2} or {2, previous}: written, and the marker removed. UNLINK, not DEL: one ACL rule fewer.
COMMIT_SCRIPT = """
if redis.call('EXISTS', KEYS[2]) == 0 then return {0} end
local previous = false
if ARGV[2] == '1' then
  if redis.call('EXISTS', KEYS[1]) == 1 then return {1} end
else
  previous = redis.call('GET', KEYS[1])
end
if ARGV[3] == '' then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
end
redis.call('UNLINK', KEYS[2])
if previous then return {2, previous} end
return {2}
"""


def _commit_watched(pipe: Any, keys: Sequence[str], args: Sequence[Any]) -> Reply:
    (record, live), (value, create, expiry) = keys, args
    pipe.watch(live, record)
    if not pipe.exists(live):
        return [0]
    if create == "1" and pipe.exists(record):
        return [1]
    previous = None if create == "1" else pipe.get(record)
    pipe.multi()
    pipe.set(record, value, px=int(expiry) if expiry else None)
    pipe.unlink(live)
    pipe.execute()
    return [2] if previous is None else [2, previous]


#: Compare-and-delete: KEYS[1] is removed only while it holds ARGV[1]; replies 1 when it was.
DELETE_IF_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('UNLINK', KEYS[1]) end
return 0
"""


def _delete_if_watched(pipe: Any, keys: Sequence[str], args: Sequence[Any]) -> Reply:
    pipe.watch(keys[0])
    if pipe.get(keys[0]) != bytes(args[0]):
        return 0
    pipe.multi()
    pipe.unlink(keys[0])
    pipe.execute()
    return 1


COMMIT = Conditional(COMMIT_SCRIPT, _commit_watched, "while committing; nothing was committed")
DELETE_IF = Conditional(DELETE_IF_SCRIPT, _delete_if_watched, "while deleting it")


def commit_args(value: Buffer, create: bool, ttl: float | None) -> tuple[Arg, ...]:
    """COMMIT's ARGV."""
    return (value, "1" if create else "0", "" if ttl is None else str(ms(ttl)))


def commit_outcome(reply: Any) -> Commit:
    """COMMIT's reply as a Commit."""
    if not isinstance(reply, list) or not reply or reply[0] not in (0, 1, 2):
        raise ValueError(f"the commit script answered {reply!r:.80}")
    previous = reply[1] if len(reply) > 1 and isinstance(reply[1], bytes) else None
    return Commit(written=reply[0] == 2, alive=reply[0] != 0, previous=previous)
