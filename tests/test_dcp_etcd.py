"""etcd-specific DCP behaviour: the size guard that points large checkpoints to Redis."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

import kvckpt
from kvckpt.registry import open_store
from tests.harness.servers import EtcdServer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_checkpoint_over_the_cap_is_refused_before_any_write(etcd_server: EtcdServer, namespace: str) -> None:
    url = etcd_server.url(namespace)
    with pytest.raises(kvckpt.CheckpointTooLargeError, match="use Redis") as info:
        kvckpt.save({"w": torch.ones(1024, 1024)}, url, store_options={"max_total_bytes": 1 << 20})
    assert info.value.nbytes == 4 << 20
    with open_store(etcd_server.url("inspect")) as store:
        assert list(store.scan_prefix(namespace + "/")) == []


def test_large_tensor_is_chunked_under_the_request_limit(etcd_server: EtcdServer, namespace: str) -> None:
    url = etcd_server.url(namespace)
    tensor = torch.arange(3 << 20, dtype=torch.float32)  # 12 MiB, more than 8 etcd requests' worth
    kvckpt.save({"t": tensor}, url)
    with open_store(etcd_server.url("inspect")) as store:
        limit = store.capabilities.max_value_bytes
        sizes = [len(store.get(k) or b"") for k in store.scan_prefix(namespace + "/g")]
    assert len(sizes) > 8 and max(sizes) <= limit
    loaded = {"t": torch.zeros(3 << 20)}
    kvckpt.load(loaded, url)
    assert torch.equal(loaded["t"], tensor)


def test_data_is_written_once_without_pending_expiry(etcd_server: EtcdServer, namespace: str) -> None:
    """Re-putting every value to drop a pending lease would double etcd's backend size per save."""
    from kvckpt.stores.etcd import wire as pb
    from kvckpt.stores.etcd.store import EtcdStore

    kvckpt.save({f"t{i}": torch.ones(100) for i in range(10)}, etcd_server.url(namespace))
    store = open_store(etcd_server.url("inspect"))
    assert isinstance(store, EtcdStore)
    with store:
        keys = list(store.scan_prefix(namespace + "/g"))
        assert len(keys) == 1  # the ten small tensors share a pack
        for key in keys:
            reply = store.client.rpc(pb.RANGE, pb.join(pb.range_request(key.encode())), action="test")
            (kv,) = pb.parse_range_response(reply).kvs
            assert (kv.version, kv.lease) == (1, 0), key


def test_quota_exhausted_mid_save_commits_nothing_and_cleans_up(namespace: str) -> None:
    from tests.harness.servers import EtcdServer as Server

    with Server(quota_backend_bytes=8 << 20, unsafe_no_fsync=True) as server:
        state = {f"t{i}": torch.full((256 * 1024,), float(i)) for i in range(48)}  # 48 MiB
        with pytest.raises(kvckpt.StoreFullError, match="quota"):
            kvckpt.save(state, server.url(namespace))
        with open_store(server.url("inspect")) as store:
            assert list(store.scan_prefix(namespace + "/")) == []
        with pytest.raises(kvckpt.CheckpointNotFoundError):
            kvckpt.load({"t0": torch.zeros(256 * 1024)}, server.url(namespace))


def test_cluster_member_loss_and_quorum_loss(namespace: str) -> None:
    from tests.harness.servers import EtcdCluster

    state: dict[str, Any] = {"w": torch.arange(600_000, dtype=torch.float32), "step": 3}
    with EtcdCluster(size=3, unsafe_no_fsync=True) as cluster:
        kvckpt.save(state, cluster.url(f"{namespace}/a"))
        cluster.stop_member(0, kill=True)
        loaded: dict[str, Any] = {"w": torch.zeros(600_000), "step": 0}
        kvckpt.load(loaded, cluster.url(f"{namespace}/a"))
        assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3

        cluster.stop_member(1, kill=True)  # quorum lost
        started = time.monotonic()
        with pytest.raises(kvckpt.StoreUnavailableError):
            kvckpt.save(state, cluster.url(f"{namespace}/b"), store_options={"timeout": 5.0})
        assert time.monotonic() - started < 15
        cluster.start_member(0, wait=False)
        cluster.start_member(1)
        with pytest.raises(kvckpt.CheckpointNotFoundError):
            kvckpt.load({"w": torch.zeros(600_000), "step": 0}, cluster.url(f"{namespace}/b"))
