"""EtcdStore over TLS with client certificates (``etcd://…?tls=true&ca=&cert=&key=``), as etcd runs in
production (Kubernetes' etcd always requires client certificates)."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import kvckpt
from kvckpt.errors import InvalidCheckpointIdError, StoreUnavailableError
from kvckpt.registry import open_store
from kvckpt.store import KVStore
from kvckpt.testing.conformance import StoreTests
from kvckpt.urls import TLSOptions
from tests.harness.raw import EtcdRaw
from tests.harness.servers import EtcdServer, TLSFiles, make_tls_files
from tests.helpers import bits_equal, random_tensor


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    files = make_tls_files(tmp_path_factory.mktemp("etcd-tls"))
    with EtcdServer(unsafe_no_fsync=True, tls=files) as server:
        yield server


def tls_files(server: EtcdServer) -> TLSFiles:
    assert server.tls is not None
    return server.tls


class TestEtcdOverTLS(StoreTests):
    expiry_wait = 4.0  # etcd leases: whole seconds, at least ~2 s
    model_examples = 4  # the same store as TestEtcd (12 sequences there), here over TLS: ~4 s each

    @pytest.fixture
    def raw(self, tls_etcd: EtcdServer) -> EtcdRaw:
        return EtcdRaw(f"https://{tls_etcd.endpoint}", tls_etcd.tls)

    @pytest.fixture
    def store(self, tls_etcd: EtcdServer) -> Iterator[KVStore]:
        store = open_store(tls_etcd.url("conformance"))
        yield store
        store.close()


def test_checkpoint_round_trip_over_tls(tls_etcd: EtcdServer, namespace: str) -> None:
    reference: dict[str, Any] = {"w": random_tensor((300, 70), torch.bfloat16, seed=4), "step": 7}
    kvckpt.save(reference, tls_etcd.url(namespace))
    loaded: dict[str, Any] = {"w": torch.zeros(300, 70, dtype=torch.bfloat16), "step": 0}
    kvckpt.load(loaded, tls_etcd.url(namespace))
    assert bits_equal(loaded["w"], reference["w"]) and loaded["step"] == 7
    assert kvckpt.latest(tls_etcd.url(namespace.rsplit("/", 1)[0])) is not None


def test_store_pickles_with_paths_and_reconnects(tls_etcd: EtcdServer, namespace: str) -> None:
    """An async-save process gets the store pickled: the TLS paths travel, the channel does not."""
    store = open_store(tls_etcd.url("ns"))
    store.put_many([(f"{namespace}/k", b"v")])
    copy = pickle.loads(pickle.dumps(store))
    assert copy.get_many([f"{namespace}/k"]) == [b"v"]
    copy.close()
    store.close()


def test_tls_given_as_an_option_to_a_plain_url(tls_etcd: EtcdServer, namespace: str) -> None:
    files = tls_files(tls_etcd)
    tls = TLSOptions(ca=files.ca, cert=files.client_cert, key=files.client_key)
    store = open_store(f"etcd://{tls_etcd.endpoint}/ns", tls=tls)
    store.put_many([(f"{namespace}/k", b"v")])
    assert store.get_many([f"{namespace}/k"]) == [b"v"]
    store.close()


def test_plain_client_is_refused_by_a_tls_server(tls_etcd: EtcdServer) -> None:
    store = open_store(f"etcd://{tls_etcd.endpoint}/ns", connect_timeout=1.0, timeout=3.0)
    with pytest.raises(StoreUnavailableError, match="requires TLS"):
        store.get("ns/k")


def test_client_without_certificate_is_refused(tls_etcd: EtcdServer) -> None:
    url = f"etcd://{tls_etcd.endpoint}/ns?tls=true&ca={tls_files(tls_etcd).ca}"
    store = open_store(url, connect_timeout=1.0, timeout=3.0)
    with pytest.raises(StoreUnavailableError, match="TLS handshake failed"):
        store.get("ns/k")


def test_server_certificate_from_another_ca_is_refused(tls_etcd: EtcdServer, tmp_path: Path) -> None:
    other = make_tls_files(tmp_path)
    files = tls_files(tls_etcd)
    url = f"etcd://{tls_etcd.endpoint}/ns?tls=true&ca={other.ca}&cert={files.client_cert}&key={files.client_key}"
    store = open_store(url, connect_timeout=1.0, timeout=3.0)
    with pytest.raises(StoreUnavailableError, match="TLS handshake failed"):
        store.get("ns/k")


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("ca=/etc/ca.pem", "add tls=true"),
        ("tls=true&cert=/c.pem", "both cert= and key="),
        ("tls=true&cafile=/etc/ca.pem", "unknown URL option"),
    ],
)
def test_bad_tls_options_are_refused_before_connecting(query: str, message: str) -> None:
    with pytest.raises(InvalidCheckpointIdError, match=message):
        open_store(f"etcd://127.0.0.1:2379/ns?{query}")


def test_unreadable_tls_file_says_which(tls_etcd: EtcdServer, tmp_path: Path) -> None:
    missing = tmp_path / "nope.crt"
    store = open_store(f"etcd://{tls_etcd.endpoint}/ns?tls=true&ca={missing}")
    with pytest.raises(InvalidCheckpointIdError, match=r"nope\.crt"):
        store.get("ns/k")
