"""What every throw-away test server shares: ``with X() as server`` and one-command helpers."""

from __future__ import annotations

from typing import Any, TypeVar

import redis

_T = TypeVar("_T", bound="Throwaway")


class Throwaway:
    """A local server (or group of them) used as ``with X() as server``: start on enter, cleanup on exit."""

    def start(self) -> object:
        raise NotImplementedError

    def cleanup(self) -> None:
        raise NotImplementedError

    def __enter__(self: _T) -> _T:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def redis_call(port: int, *args: object, timeout: float = 10.0) -> Any:
    """One command to the redis-server on loopback ``port`` (plain TCP, no auth), replies decoded."""
    client: Any = redis.Redis(port=port, socket_timeout=timeout, decode_responses=True)
    try:
        return client.execute_command(*args)
    finally:
        client.close()


def _info(port: int, section: str) -> dict[str, str]:
    """INFO ``section``, every value as text."""
    client: Any = redis.Redis(port=port, socket_timeout=10)
    try:
        return {str(k): str(v) for k, v in client.info(section).items()}
    finally:
        client.close()
