"""A backend written outside kvckpt: registered by scheme, it passes the conformance suite and serves
kvckpt.save/load, list_checkpoints and copy like the built-in ones."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

import kvckpt
from kvckpt import registry
from kvckpt.errors import InvalidCheckpointIdError
from kvckpt.store import Buffer, Capabilities, KVStore, RangeRead
from kvckpt.testing.conformance import StoreTests
from kvckpt.urls import StoreURL
from tests.helpers import bits_equal, random_tensor

#: In-process "servers" by host name: stores opened on one name share its keys.
_SERVERS: dict[str, dict[str, tuple[bytes, float | None]]] = {}
_LOCK = threading.Lock()


class MemoryStore(KVStore):
    """``mem://NAME/NAMESPACE``: keys in a dict of this process, expiring by the monotonic clock."""

    capabilities = Capabilities(max_value_bytes=1 << 20, native_ranges=True, ttl=True, max_batch_ops=7)

    def __init__(self, name: str) -> None:
        self.name = name
        with _LOCK:
            self._data = _SERVERS.setdefault(name, {})

    @classmethod
    def from_url(cls, url: StoreURL, **options: Any) -> MemoryStore:
        if options:
            raise TypeError(f"MemoryStore takes no options, got {sorted(options)}")
        return cls(url.hosts[0][0])

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"])  # type: ignore[misc]

    def _live(self, key: str) -> bytes | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[1] is not None and entry[1] <= time.monotonic():
            del self._data[key]
            return None
        return entry[0]

    @staticmethod
    def _deadline(ttl: float | None) -> float | None:
        return None if ttl is None else time.monotonic() + ttl

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        with _LOCK:
            return [self._live(k) for k in keys]

    def read_into_many(self, reads: Sequence[RangeRead]) -> list[int]:
        copied = []
        with _LOCK:
            for r in reads:
                data = (self._live(r.key) or b"")[r.offset : r.offset + r.into.nbytes]
                r.into.cast("B")[: len(data)] = data
                copied.append(len(data))
        return copied

    def put_many(self, items: Sequence[tuple[str, Buffer]], *, ttl: float | None = None) -> None:
        with _LOCK:
            for key, value in items:
                self._data[key] = (bytes(value), self._deadline(ttl))

    def put(self, key: str, value: Buffer, *, create: bool = False, ttl: float | None = None) -> bool:
        with _LOCK:
            if create and self._live(key) is not None:
                return False
            self._data[key] = (bytes(value), self._deadline(ttl))
            return True

    def swap(self, key: str, value: Buffer, *, ttl: float | None = None) -> bytes | None:
        with _LOCK:
            previous = self._live(key)
            self._data[key] = (bytes(value), self._deadline(ttl))
            return previous

    def take(self, key: str) -> bytes | None:
        with _LOCK:
            value = self._live(key)
            self._data.pop(key, None)
            return value

    def expire_many(self, keys: Sequence[str], ttl: float | None) -> list[bool]:
        with _LOCK:
            found = []
            for key in keys:
                value = self._live(key)
                if value is not None:
                    self._data[key] = (value, self._deadline(ttl))
                found.append(value is not None)
            return found

    def delete_many(self, keys: Sequence[str]) -> None:
        with _LOCK:
            for key in keys:
                self._data.pop(key, None)

    def scan_prefix(self, prefix: str) -> Iterator[str]:
        with _LOCK:
            keys = [k for k in self._data if k.startswith(prefix) and self._live(k) is not None]
        yield from keys

    def close(self) -> None:
        pass


@pytest.fixture
def mem_scheme() -> Iterator[str]:
    registry.register_backend("mem", f"{__name__}:MemoryStore")
    yield "mem"
    registry.unregister_backend("mem")


class MemoryRaw:
    """Reads the in-process server's dict directly."""

    def __init__(self, name: str) -> None:
        self.data = _SERVERS.setdefault(name, {})

    def get(self, key: str) -> bytes | None:
        entry = self.data.get(key)
        return None if entry is None else entry[0]

    def ttl(self, key: str) -> float | None:
        entry = self.data.get(key)
        return None if entry is None or entry[1] is None else entry[1] - time.monotonic()


class TestMemoryStore(StoreTests):
    expiry_wait = 0.5

    @pytest.fixture
    def raw(self) -> MemoryRaw:
        return MemoryRaw("conformance")

    @pytest.fixture
    def store(self, mem_scheme: str) -> Iterator[KVStore]:
        store = kvckpt.open_store(f"{mem_scheme}://conformance/ns")
        assert isinstance(store, MemoryStore)
        yield store


def test_save_load_list_and_copy(mem_scheme: str, tmp_path: Path) -> None:
    state = {"w": random_tensor((300, 7), torch.float32, seed=1), "b": random_tensor((5,), torch.bfloat16)}
    for step in (1, 2):
        kvckpt.save(state, f"mem://box/run/step{step}", chunk_bytes=4096)
    assert [c.namespace for c in kvckpt.list_checkpoints("mem://box/run")] == ["run/step1", "run/step2"]
    assert kvckpt.latest("mem://box/run") == "mem://box/run/step2"
    kvckpt.copy("mem://box/run/step2", "mem://other/backup")
    kvckpt.copy("mem://other/backup", str(tmp_path / "folder"))
    kvckpt.copy(str(tmp_path / "folder"), "mem://third/back")  # out to a DCP folder and back in
    for source in ("mem://box/run/step1", "mem://other/backup", "mem://third/back"):
        loaded = {"w": torch.zeros(300, 7), "b": torch.zeros(5, dtype=torch.bfloat16)}
        kvckpt.load(loaded, source)
        assert all(bits_equal(state[k], loaded[k]) for k in state)
    assert kvckpt.verify("mem://box/run/step2").checksums  # raises on a damaged chunk
    kvckpt.keep_last("mem://box/run", 1)
    assert [c.namespace for c in kvckpt.list_checkpoints("mem://box/run")] == ["run/step2"]


def test_an_unregistered_scheme_is_refused(mem_scheme: str) -> None:
    registry.unregister_backend("mem")
    with pytest.raises(InvalidCheckpointIdError, match="register_backend"):
        kvckpt.save({"x": torch.ones(1)}, "mem://box/x")


def test_a_backend_from_an_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed package advertises ``[kvckpt.backends] memx = module:Class``; no call needed."""
    dist = tmp_path / "kvckpt_mem_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kvckpt-mem-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[kvckpt.backends]\nmemx = {__name__}:MemoryStore\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_read", False)
    monkeypatch.setattr(registry, "_registered", dict(registry._registered))
    assert "memx" in registry.schemes()
    kvckpt.save({"x": torch.arange(10.0)}, "memx://plugin/ns/one")
    loaded = {"x": torch.zeros(10)}
    kvckpt.load(loaded, "memx://plugin/ns/one")
    assert torch.equal(loaded["x"], torch.arange(10.0))
