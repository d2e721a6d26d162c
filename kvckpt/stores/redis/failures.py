"""How a Redis store's failures become kvckpt's errors, and the server settings that decide some of
them (a server that may evict keys is refused; a full one is explained by its policy).

Both ways commands travel (kvckpt's RESP transport and a redis-py client) raise redis-py's exception
classes, so one translation serves every store.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence

import redis.exceptions as rex

from kvckpt.errors import (
    InvalidCheckpointIdError,
    KVCheckpointError,
    StoreFullError,
    StoreUnavailableError,
    UnsafeStoreConfigError,
    UnsafeStoreConfigWarning,
)
from kvckpt.stores.redis.retry import GaveUp

logger = logging.getLogger("kvckpt.stores.redis")

#: The only maxmemory-policy under which Redis never drops a key it acknowledged.
SAFE_MAXMEMORY_POLICY = "noeviction"

# Errors ---------------------------------------------------------------------------------------

TO_CLUSTER = "is a Redis Cluster node; use redis+cluster://host:port/NAMESPACE"
TO_STANDALONE = "is not a Redis Cluster; use redis://host:port/DB/NAMESPACE"
#: Error replies that mean the URL names the wrong kind of server, and what to write instead.
_WRONG_KIND = (
    ("SELECT is not allowed in cluster mode", TO_CLUSTER),
    ("Cluster mode is not enabled", TO_STANDALONE),
    ("cluster support disabled", TO_STANDALONE),
)


def wrong_kind(exc: BaseException) -> str | None:
    """What to write instead when ``exc`` says the server is not the kind the URL names."""
    text = str(exc)
    if isinstance(exc, rex.AskError) or text.split(" ", 1)[0] in ("MOVED", "ASK", "CLUSTERDOWN"):
        return TO_CLUSTER
    return next((advice for marker, advice in _WRONG_KIND if marker in text), None)


@contextlib.contextmanager
def translated(
    where: str, action: str, timeout: float | None = None, *, cluster: bool = False
) -> Iterator[None]:
    """Translate redis-py's exception classes into kvckpt's types by class (and a few by reply text).

    ``cluster`` says which kind of server the store expects, so a reply that shows the other kind is
    explained as a wrong URL scheme."""
    try:
        yield
    except KVCheckpointError:
        raise
    except GaveUp as gave_up:
        cause = gave_up.__cause__
        assert isinstance(cause, BaseException)
        raise _translate(cause, where, action, timeout, f" after {gave_up}", cluster) from cause
    except Exception as exc:
        raise _translate(exc, where, action, timeout, "", cluster) from exc


def _translate(
    exc: BaseException, where: str, action: str, timeout: float | None, tries: str, cluster: bool
) -> Exception:
    if isinstance(exc, rex.OutOfMemoryError):
        return StoreFullError(
            f"{where}: Redis is out of memory while {action} (maxmemory reached); free memory or raise "
            f"maxmemory{_policy_advice(where)}"
        )
    if isinstance(exc, rex.NoPermissionError):
        return StoreUnavailableError(
            f"{where}: the ACL user may not do this while {action} ({str(exc)[:120]}); give it the key "
            "pattern of every namespace it uses (~NAMESPACE/*) and the commands in "
            "docs/operations-redis.md (ACL users and passwords)"
        )
    if isinstance(exc, rex.AuthenticationError):
        return StoreUnavailableError(
            f"{where}: authentication failed while {action}; check user and password"
        )
    if isinstance(exc, rex.ResponseError | rex.RedisClusterException):
        text = str(exc)
        advice = wrong_kind(exc)
        if advice == (TO_STANDALONE if cluster else TO_CLUSTER):
            return InvalidCheckpointIdError(f"{where} {advice} (the server said: {text[:120]})")
        if "DB index is out of range" in text:
            return InvalidCheckpointIdError(
                f"{where}: the server has no such database ({text}); its databases are numbered from 0 "
                "to its 'databases' setting minus one (16 by default: 0-15)"
            )
    if isinstance(exc, rex.TimeoutError | TimeoutError):
        # After retries the tries text says how long they took in all; the deadline may have cut
        # each attempt shorter than ``timeout``, so ``timeout`` alone would overstate the wait.
        waited = f" within {timeout:g}s" if timeout and not tries else ""
        return StoreUnavailableError(
            f"{where}: the server did not answer{waited} while {action} (TimeoutError{tries}); it accepts "
            "connections but does not reply: check that it is not stuck, overloaded or paused"
        )
    if isinstance(exc, rex.ConnectionError | OSError):
        return StoreUnavailableError(
            f"{where}: cannot reach Redis while {action} ({type(exc).__name__}{tries}); "
            "check the server is up and the URL"
        )
    if isinstance(exc, rex.RedisError):
        return KVCheckpointError(f"{where}: Redis error while {action}: {exc}")
    if isinstance(exc, Exception):
        return exc
    raise exc


# Server safety --------------------------------------------------------------------------------

#: The maxmemory-policy check_settings last read from each server, by the name its store gives it
#: (the store's description; "DESCRIPTION node HOST:PORT" for a Cluster's nodes): what a
#: StoreFullError from that store may say about the policy.
_policies_read: dict[str, str] = {}


def _policy_advice(where: str) -> str:
    """Advice on the maxmemory-policy of the server(s) named ``where``: none when every one read is
    noeviction (Redis refusing writes is then what that policy is for)."""
    read = {
        policy
        for name, policy in list(_policies_read.items())
        if name == where or name.startswith(f"{where} node ")
    }
    if not read:
        return "; set maxmemory-policy noeviction if it is not (kvckpt has not read it)"
    unsafe = sorted(read - {SAFE_MAXMEMORY_POLICY})
    if not unsafe:
        return ""
    return (
        f"; maxmemory-policy is {' and '.join(map(repr, unsafe))}: set it to noeviction so that a full "
        "server refuses writes instead of evicting checkpoint keys"
    )


def eviction_problem(where: str, settings: dict[str, str]) -> str | None:
    """Why ``settings`` (a CONFIG GET reply) can lose checkpoint keys, or None when they cannot.

    Any policy but noeviction is refused even with maxmemory 0 (no limit today): maxmemory can be set
    at runtime (CONFIG SET, a managed service's resize), and eviction then drops chunks of committed
    checkpoints silently. volatile-* policies are no safer: they evict the keys kvckpt gives a TTL,
    the previous generation that readers may still be loading.
    """
    policy = settings.get("maxmemory-policy", SAFE_MAXMEMORY_POLICY)
    if policy == SAFE_MAXMEMORY_POLICY:
        return None
    limit = settings.get("maxmemory", "?")
    return (
        f"{where}: maxmemory-policy is {policy!r} (maxmemory {limit}): when memory runs short Redis "
        "silently evicts keys, which can leave a committed checkpoint whose chunks are gone. Set "
        "'maxmemory-policy noeviction' so a full server refuses writes instead (kvckpt then raises "
        "StoreFullError), or pass allow_eviction=True to accept the risk"
    )


def check_settings(
    servers: Sequence[tuple[str, Callable[[], dict[str, str]]]], allow_eviction: bool
) -> dict[str, str]:
    """Refuse a server that may evict checkpoint keys; with ``allow_eviction`` only warn.

    ``servers`` are (name, CONFIG GET maxmemory*). CONFIG may be denied (ACL, managed Redis, a renamed
    command): that server is then skipped with a debug log, since refusing would make kvckpt
    unusable there and the user cannot change the policy anyway.
    """
    policies: dict[str, str] = {}
    for name, config_get in servers:
        try:
            settings = config_get()
        except rex.ResponseError as exc:  # NOPERM, unknown command: CONFIG is off limits
            logger.debug("%s: cannot read maxmemory-policy (%s)", name, type(exc).__name__)
            continue
        policies[name] = settings.get("maxmemory-policy", "")
        if policies[name]:
            _policies_read[name] = policies[name]
        problem = eviction_problem(name, settings)
        if problem and not allow_eviction:
            raise UnsafeStoreConfigError(problem, server=name, policy=policies[name])
        if problem:
            warnings.warn(problem, UnsafeStoreConfigWarning, stacklevel=3)
    return policies
