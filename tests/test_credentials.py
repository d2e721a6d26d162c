"""A password given in the URL never reaches the store, the record, logs, errors or reprs."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import redis
import torch

import kvckpt
from tests.harness.servers import RedisServer

PASSWORD = "pw-Zq7-never-stored"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def locked_server() -> Iterator[RedisServer]:
    with RedisServer(extra_args=["--requirepass", PASSWORD]) as server:
        yield server


def test_password_absent_everywhere(locked_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"redis://default:{PASSWORD}@127.0.0.1:{locked_server.port}/0/secure/ckpt"
    writer = kvckpt.KVStorageWriter(url)
    metadata = kvckpt.save({"w": torch.ones(8), "note": "hello"}, url)
    loaded = {"w": torch.zeros(8), "note": None}
    kvckpt.load(loaded, url)
    assert loaded["note"] == "hello"
    assert metadata.storage_meta is not None
    assert (
        metadata.storage_meta.checkpoint_id
        == f"redis://default:***@127.0.0.1:{locked_server.port}/0/secure/ckpt"
    )
    assert PASSWORD not in repr(writer) + str(writer.checkpoint_id) + repr(writer.target.store)
    with pytest.raises(kvckpt.CheckpointExistsError) as exists:
        kvckpt.save({"w": torch.ones(8)}, url)
    assert PASSWORD not in str(exists.value)

    raw = redis.Redis(port=locked_server.port, password=PASSWORD)
    stored = b"".join(k + (raw.get(k) or b"") for k in raw.scan_iter())
    assert stored and PASSWORD.encode() not in stored
    assert PASSWORD not in caplog.text


def test_wrong_password_is_a_clear_error(locked_server: RedisServer) -> None:
    url = f"redis://default:wrong-{PASSWORD}@127.0.0.1:{locked_server.port}/0/secure/x"
    with pytest.raises(kvckpt.StoreUnavailableError) as info:
        kvckpt.save({"w": torch.ones(2)}, url)
    assert "password" in str(info.value) and PASSWORD not in str(info.value)
