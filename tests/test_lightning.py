"""Lightning fits, checkpoints to kvckpt through KVCheckpointIO, is killed, and resumes from the store."""

from __future__ import annotations

import subprocess
import sys
import uuid
import warnings
from pathlib import Path
from typing import cast

import pytest
import torch

import kvckpt
from kvckpt.integrations.lightning import KVCheckpointIO, split_tensors
from tests.harness.servers import RedisServer
from tests.jobs import finish, start

ROOT = Path(__file__).resolve().parent.parent


def job(url: str, losses: Path, steps: int, *extra: str) -> subprocess.Popen[bytes]:
    return start("lightning_job", url, str(losses), str(steps), *extra)


def losses_of(path: Path) -> list[tuple[int, float]]:
    return [
        (int(step), float(loss)) for step, loss in (line.split() for line in path.read_text().splitlines())
    ]


@pytest.mark.slow
def test_killed_in_save_resumes_from_last_committed_and_matches(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    run = f"lightning-{uuid.uuid4().hex[:8]}"
    straight_url, killed_url = redis_server.url(f"{run}/straight"), redis_server.url(f"{run}/killed")
    straight = job(straight_url, tmp_path / "straight.txt", 12)
    killed = job(killed_url, tmp_path / "killed.txt", 12, "--die-in-save-at", "8")
    assert finish(straight) == 0
    assert finish(killed) == -9  # SIGKILLed inside the save at step 8, data written, not committed

    names = sorted(info.namespace.rsplit("/", 1)[-1] for info in kvckpt.list_checkpoints(killed_url))
    assert names == ["last.ckpt", "step=4.ckpt"]

    assert finish(job(killed_url, tmp_path / "resumed.txt", 12, "--resume")) == 0
    expected = dict(losses_of(tmp_path / "straight.txt"))
    resumed = losses_of(tmp_path / "resumed.txt")
    assert [step for step, _ in resumed] == list(range(4, 12))  # from step 4: the killed save is unseen
    assert resumed == [(step, expected[step]) for step in range(4, 12)]

    kept = sorted(info.namespace.rsplit("/", 1)[-1] for info in kvckpt.list_checkpoints(straight_url))
    assert "last.ckpt" in kept and len(kept) == 3  # top-2 plus last: older ones were removed


def test_checkpoint_dict_round_trips_without_pickle(redis_server: RedisServer) -> None:
    """Nested tensors come back as tensors; the rest loads under weights_only, with no allow_pickle."""
    from lightning.fabric.utilities.data import AttributeDict

    checkpoint = {
        "epoch": 3,
        "state_dict": {"layer.weight": torch.randn(4, 3)},
        "optimizer_states": [
            {"state": {0: {"momentum_buffer": torch.ones(4, 3)}}, "param_groups": [{"lr": 0.1}]}
        ],
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 4}}}},
        "callbacks": {"ModelCheckpoint{}": {"best_model_score": torch.tensor(0.5), "dirpath": "redis://x"}},
        "hyper_parameters": AttributeDict(hidden=8, betas=(0.9, 0.99)),
    }
    url = redis_server.url(f"lightning-{uuid.uuid4().hex[:8]}/a.ckpt")
    io = KVCheckpointIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        io.save_checkpoint(checkpoint, url)
        loaded = io.load_checkpoint(url)
    assert not [w for w in caught if "single process" in str(w.message)]  # Lightning runs one per rank
    flat, tensors, _ = split_tensors(loaded)
    expected_flat, expected_tensors, _ = split_tensors(checkpoint)
    assert flat == expected_flat and isinstance(loaded["hyper_parameters"], AttributeDict)
    assert [path for path, _ in tensors] == [path for path, _ in expected_tensors]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(tensors, expected_tensors, strict=True))
    io.remove_checkpoint(url)
    assert kvckpt.latest(url) is None


def test_last_checkpoint_lookup_keeps_the_url(kvckpt_url: str) -> None:
    """The stock ModelCheckpoint turns remote last.ckpt names into local paths; ours keeps URLs."""
    from lightning.fabric.utilities.cloud_io import get_filesystem
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from kvckpt.integrations.lightning import KVModelCheckpoint

    io = KVCheckpointIO()
    for name in ("last.ckpt", "last-v1.ckpt", "step=4.ckpt", "lastly.ckpt"):
        io.save_checkpoint({"w": torch.ones(1)}, f"{kvckpt_url}/run1/{name}")
    no_trainer = cast(Trainer, None)  # dirpath is set, so neither class looks at the trainer
    found = {}
    for cls in (ModelCheckpoint, KVModelCheckpoint):
        callback = cls(dirpath=f"{kvckpt_url}/run1")
        assert callback.dirpath is not None
        callback._fs = get_filesystem(callback.dirpath)
        found[cls] = callback._find_last_checkpoints(no_trainer)
    assert found[KVModelCheckpoint] == {f"{kvckpt_url}/run1/last.ckpt", f"{kvckpt_url}/run1/last-v1.ckpt"}
    assert not any("://" in path for path in found[ModelCheckpoint])


#: A fresh process: nothing has registered kvckpt's fsspec view when the callbacks are built.
CALLBACKS_FIRST = """
import sys
from lightning.pytorch.callbacks import ModelCheckpoint
from kvckpt.integrations.lightning import KVCheckpointIO, KVModelCheckpoint

for cls in (KVModelCheckpoint, ModelCheckpoint):
    assert cls(dirpath=sys.argv[1]).dirpath == sys.argv[1]
KVCheckpointIO()
"""


def test_checkpoint_callbacks_may_be_built_before_the_plugin(kvckpt_url: str) -> None:
    """ModelCheckpoint resolves its dirpath through fsspec when it is built, which the docs' order
    (callbacks first, then ``Trainer(plugins=[KVCheckpointIO()], ...)``) does before the plugin."""
    done = subprocess.run(
        [sys.executable, "-c", CALLBACKS_FIRST, f"{kvckpt_url}/run1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]


class Opaque:
    def __init__(self, value: int) -> None:
        self.value = value


def test_unknown_objects_are_refused_unless_allowed(redis_server: RedisServer) -> None:
    url = redis_server.url(f"lightning-{uuid.uuid4().hex[:8]}/b.ckpt")
    KVCheckpointIO().save_checkpoint({"hyper_parameters": {"thing": Opaque(3)}}, url)
    with pytest.raises(kvckpt.KVCheckpointError, match="allow_pickle"):
        KVCheckpointIO().load_checkpoint(url)
    assert KVCheckpointIO(safe_globals=[Opaque]).load_checkpoint(url)["hyper_parameters"]["thing"].value == 3
