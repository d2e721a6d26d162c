"""A checkpoint_id given as an os.PathLike is its text wherever kvckpt takes one, and a kvckpt URL
that pathlib has collapsed (``Path("redis://h/0/ns")`` reads ``redis:/h/0/ns``) is refused: neither
ever lands in a local folder. Every test runs in an empty working directory and checks it stays so."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

import kvckpt
from kvckpt.errors import InvalidCheckpointIdError
from tests.harness.servers import RedisServer, free_port


class URLPath:
    """A PathLike that is not a pathlib.Path: its text is the URL exactly as given."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __fspath__(self) -> str:
        return self.text


def waited(response: Any) -> None:
    """Wait for dcp.async_save's future (typed as a union with the staging response)."""
    assert isinstance(response, concurrent.futures.Future)
    response.result()


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert sorted(p.name for p in tmp_path.rglob("*")) == [], "something was written to local disk"


@pytest.fixture
def url(redis_server: RedisServer, cwd: Path) -> str:
    kvckpt.install()
    return redis_server.url(f"paths-{uuid.uuid4().hex[:12]}")


def test_a_pathlike_url_goes_to_the_store_everywhere(url: str) -> None:
    weights = torch.arange(6, dtype=torch.float32)

    def roundtrip(name: str, save: Callable[[str], Any], load: Callable[[str, dict[str, Any]], Any]) -> None:
        save(f"{url}/{name}")
        loaded = {"w": torch.zeros(6)}
        load(f"{url}/{name}", loaded)
        assert torch.equal(loaded["w"], weights), name
        assert kvckpt.info(URLPath(f"{url}/{name}")).entries[0].fqn == "w", name

    roundtrip(
        "dcp",
        lambda u: dcp.save({"w": weights}, checkpoint_id=URLPath(u)),
        lambda u, sd: dcp.load(sd, checkpoint_id=URLPath(u)),
    )
    roundtrip(
        "async",
        lambda u: waited(dcp.async_save({"w": weights}, checkpoint_id=URLPath(u))),
        lambda u, sd: kvckpt.load(sd, URLPath(u)),
    )
    roundtrip(
        "kvckpt",
        lambda u: kvckpt.save({"w": weights}, URLPath(u)),
        lambda u, sd: kvckpt.load(sd, URLPath(u)),
    )
    roundtrip(
        "storage",
        lambda u: dcp.save({"w": weights}, storage_writer=kvckpt.KVStorageWriter(URLPath(u))),
        lambda u, sd: dcp.load(sd, storage_reader=kvckpt.KVStorageReader(URLPath(u))),
    )
    assert kvckpt.KVStorageWriter.validate_checkpoint_id(URLPath(url))
    assert len(kvckpt.list_checkpoints(URLPath(url))) == 4
    kvckpt.copy(URLPath(f"{url}/dcp"), URLPath(f"{url}/copied"))
    assert kvckpt.latest(URLPath(url)) is not None


def _refusals(url: str) -> dict[str, Callable[[Any], Any]]:
    """Every way an id reaches kvckpt, each called with an id that pathlib collapsed."""
    state = {"w": torch.ones(3)}
    return {
        "dcp.save": lambda cid: dcp.save(state, checkpoint_id=cid),
        "dcp.load": lambda cid: dcp.load({"w": torch.zeros(3)}, checkpoint_id=cid),
        "dcp.async_save": lambda cid: waited(dcp.async_save(state, checkpoint_id=cid)),
        "dcp.async_save(PROCESS)": lambda cid: waited(
            dcp.async_save(state, checkpoint_id=cid, async_checkpointer_type=AsyncCheckpointerType.PROCESS)
        ),
        "kvckpt.save": lambda cid: kvckpt.save(state, cid),
        "kvckpt.load": lambda cid: kvckpt.load({"w": torch.zeros(3)}, cid),
        "KVStorageWriter": lambda cid: kvckpt.KVStorageWriter(cid),
        "KVStorageReader": lambda cid: kvckpt.KVStorageReader(cid),
        "KVStorageWriter.reset": lambda cid: dcp.save(
            state, storage_writer=kvckpt.KVStorageWriter(), checkpoint_id=cid
        ),
        "kvckpt.info": lambda cid: kvckpt.info(cid),
        "kvckpt.copy to": lambda cid: kvckpt.copy(url, cid),
        "kvckpt.copy from": lambda cid: kvckpt.copy(cid, "restored"),
    }


@pytest.mark.parametrize("entry", sorted(_refusals("redis://x/0/y")))
@pytest.mark.parametrize("form", ["pathlib.Path", "PathLike", "str"])
def test_a_collapsed_url_is_refused_not_written_locally(url: str, entry: str, form: str) -> None:
    given = f"{url}/c"
    collapsed: Any = {
        "pathlib.Path": Path(given),
        "PathLike": URLPath(given.replace("://", ":/", 1)),
        "str": given.replace("://", ":/", 1),
    }[form]
    assert os.fspath(collapsed).startswith("redis:/127.0.0.1")  # what pathlib makes of the URL
    with pytest.raises(
        InvalidCheckpointIdError, match=r"'redis:/…' .*'//' became '/'.*pass the URL as a str"
    ):
        _refusals(url)[entry](collapsed)
    assert kvckpt.list_checkpoints(url) == []


def test_the_refusal_never_shows_a_password(cwd: Path) -> None:
    with pytest.raises(InvalidCheckpointIdError) as raised:
        kvckpt.KVStorageWriter(Path("redis://user:hunter2@127.0.0.1:1/0/ns"))
    assert "hunter2" not in str(raised.value) and "(a PosixPath)" in str(raised.value)


def test_paths_that_are_not_urls_still_go_to_dcp(tmp_path: Path) -> None:
    kvckpt.install()
    dcp.save({"w": torch.ones(3)}, checkpoint_id=tmp_path / "ckpt")
    loaded = {"w": torch.zeros(3)}
    kvckpt.load(loaded, tmp_path / "ckpt")
    assert torch.equal(loaded["w"], torch.ones(3))
    assert (tmp_path / "ckpt" / ".metadata").is_file()


PROCESS_SAVE = """
import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp, kvckpt
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

class URLPath:
    def __init__(self, text): self.text = text
    def __fspath__(self): return self.text

dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
kvckpt.install()
dcp.async_save(
    {"w": torch.full((6,), 3.0)}, checkpoint_id=URLPath(sys.argv[1]),
    async_checkpointer_type=AsyncCheckpointerType.PROCESS,
).result(timeout=120)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_async_save_process_takes_a_pathlike_url(url: str, cwd: Path) -> None:
    """The PathLike is the caller's class: only its text crosses to the checkpoint process."""
    subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PROCESS_SAVE), f"{url}/p", str(free_port())],
        check=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    loaded = {"w": torch.zeros(6)}
    kvckpt.load(loaded, f"{url}/p")
    assert torch.equal(loaded["w"], torch.full((6,), 3.0))
