"""A full Redis is told to switch to noeviction only when its maxmemory-policy is something else."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import kvckpt
from kvckpt.errors import StoreFullError
from tests.harness.servers import RedisServer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BIG = b"x" * (32 << 20)  # over the servers' 24 MiB


def full_server(policy: str) -> Iterator[RedisServer]:
    with RedisServer(extra_args=["--maxmemory", "24mb", "--maxmemory-policy", policy]) as server:
        yield server


@pytest.fixture
def noeviction_server() -> Iterator[RedisServer]:
    yield from full_server("noeviction")


@pytest.fixture
def volatile_server() -> Iterator[RedisServer]:
    yield from full_server("volatile-lru")  # no key has a TTL: nothing to evict, so writes fail


def test_a_noeviction_server_is_not_told_to_use_noeviction(noeviction_server: RedisServer) -> None:
    with pytest.raises(StoreFullError) as raised:
        kvckpt.save({"big": torch.zeros(8 << 20)}, noeviction_server.url("run/step1"))
    message = str(raised.value)
    assert "out of memory" in message and "free memory or raise maxmemory" in message
    assert "noeviction" not in message and "maxmemory-policy" not in message


def test_an_unread_policy_is_advised_on_conditionally(noeviction_server: RedisServer) -> None:
    store = kvckpt.open_store(noeviction_server.url("run"))  # check_server_settings never ran
    with pytest.raises(StoreFullError, match=r"noeviction if it is not \(kvckpt has not read it\)"):
        store.put("run/k", BIG)
    store.close()


def test_another_policy_is_named_with_the_advice(volatile_server: RedisServer) -> None:
    store = kvckpt.open_store(volatile_server.url("run"))
    assert store.check_server_settings(allow_eviction=True)
    with pytest.raises(StoreFullError) as raised:
        store.put("run/k", BIG)
    assert "maxmemory-policy is 'volatile-lru': set it to noeviction" in str(raised.value)
    store.close()
