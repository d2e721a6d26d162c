"""State dict shapes, as PyTorch's own DCP tests use them, on a DCP folder and on kvckpt.

Mirrors upstream ``test_file_system_checkpoint_cpu.py`` (a module's state dict saved and loaded
without a process group, here with ``test_dtensor_checkpoint.py``'s module extra state; "blob"
values of a Stateful object; ``[1]`` and ``"string"`` stored as bytes; a float32 checkpoint loaded
into a bfloat16 template), ``test_nested_dict.py`` (nested dicts and lists),
``e2e/test_e2e_save_and_load.py`` (Stateful objects loaded in place while plain values are replaced;
a BytesIO train state; an empty state dict) and ``test_list_stored_state_dict.py`` (the stored keys
and their tensor/bytes metadata).

Not mirrored, because they test FileSystemWriter itself: the ``_extensions`` stream transforms
(Rot13, ZStandard) wrap file streams, and kvckpt stores raw bytes with checksums instead; the
``allow_unsafe_types`` load planner option is newer than torch 2.13.
"""

from __future__ import annotations

import io
import os
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import load
from torch.distributed.checkpoint.state_dict_saver import save
from torch.distributed.checkpoint.stateful import Stateful

import kvckpt
from tests.dcp_semantics.compare import assert_same, rank_failure
from tests.dcp_semantics.places import Place
from tests.helpers import bits_equal, random_tensor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


class SmallModule(nn.Module):
    """Upstream's MyTestModule, plus ``get_extra_state`` (test_dtensor_checkpoint.py's extra state:
    an int and a tensor under ``_extra_state``)."""

    def __init__(self, extra: int = 0) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(5, 5)
        self.linear_2 = nn.Linear(5, 1)
        self.emb = nn.EmbeddingBag(5, 10)
        self.extra = {"count": extra, "tensor": torch.full((2,), float(extra))}

    def get_extra_state(self) -> dict[str, Any]:
        return self.extra

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.extra = state


def test_module_state_dict_without_a_process_group(places: list[Place]) -> None:
    for place in places:
        saved = SmallModule(extra=3).state_dict()
        save(saved, storage_writer=place.writer("module"), no_dist=True)
        module = SmallModule()
        target = module.state_dict()
        assert not bits_equal(target["emb.weight"], saved["emb.weight"])
        load(target, storage_reader=place.reader("module"), no_dist=True)
        assert_same(target, saved, place.name)
        module.load_state_dict(target)
        assert_same(module.extra, {"count": 3, "tensor": torch.full((2,), 3.0)}, place.name)


def nested(fill: bool) -> dict[str, Any]:
    """Tensors at every depth of dicts and lists, next to plain values DCP stores as bytes."""

    def t(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        value = random_tensor(shape, dtype, seed)
        return value if fill else torch.zeros_like(value)

    return {
        "model": {
            "encoder": {"weight": t((4, 3), 1), "bias": t((3,), 2, torch.bfloat16)},
            "layers": [t((2, 2), 3), {"gate": t((5,), 4, torch.int64)}, [t((1,), 5), t((3, 1), 6)]],
        },
        "scalar": t((), 7, torch.float64),
        "empty": t((0, 3), 8),
        "mask": t((6,), 9, torch.uint8) % 2 == 1,  # random bits are not all valid bools
        "ints": [1, 2, 3] if fill else [0],
        "name": "run-ü" if fill else "",
        "step": 7 if fill else 0,
        "lr": 0.25 if fill else 0.0,
        "nothing": None,
        "raw": b"\x00\xffraw" if fill else b"",
        "options": {"betas": (0.9, 0.99) if fill else (0.0, 0.0), "nesterov": fill},
    }


def test_nested_dicts_lists_and_plain_values(places: list[Place]) -> None:
    for place in places:
        save(nested(fill=True), storage_writer=place.writer("nested"), no_dist=True)
        target = nested(fill=False)
        load(target, storage_reader=place.reader("nested"), no_dist=True)
        assert_same(target, nested(fill=True), place.name)


def test_views_tied_and_non_contiguous_tensors(places: list[Place]) -> None:
    """What a module's state dict really holds: tied weights (one tensor under two keys), slices of
    a larger storage, transposed and strided views. Only each view's own elements are stored."""
    base = random_tensor((8, 6), torch.float32, 11)
    tied = random_tensor((5, 3), torch.float32, 12)
    saved = {"embed": tied, "head": tied, "rows": base[2:5], "cols": base[:, 1::2], "t": base.t()}
    for place in places:
        save(saved, storage_writer=place.writer("views"), no_dist=True)
        shared = torch.zeros(5, 3)
        target = {"embed": shared, "head": shared} | {
            k: torch.zeros_like(v) for k, v in saved.items() if k not in ("embed", "head")
        }
        load(target, storage_reader=place.reader("views"), no_dist=True)
        assert_same(
            {k: v.contiguous() for k, v in target.items()},
            {k: v.contiguous() for k, v in saved.items()},
            place.name,
        )
        assert target["embed"] is shared and target["head"] is shared, place.name
        listed = place.reader("views").read_metadata().state_dict_metadata
        assert listed["rows"].size == torch.Size([3, 6]), place.name  # type: ignore[union-attr]


def test_byte_values_load_over_other_values(places: list[Place]) -> None:
    """Upstream's test_save_load_bytes: ``[1]`` and ``"string"`` replace what the template held."""
    for place in places:
        save({"bytes0": [1], "bytes1": "string"}, storage_writer=place.writer("bytes"), no_dist=True)
        target: dict[str, Any] = {"bytes0": [2], "bytes1": "other"}
        load(target, storage_reader=place.reader("bytes"), no_dist=True)
        assert target == {"bytes0": [1], "bytes1": "string"}, place.name


class BlobState(Stateful):
    """A Stateful object whose state is a bytes value (upstream's BlobState)."""

    def __init__(self, value: bytes) -> None:
        self.state = {"blob": value}
        self.loads = 0

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = dict(state_dict)
        self.loads += 1


class TrainState(Stateful):
    """Upstream's TestTrainState: tensors for step and loss, the loss history as a BytesIO."""

    def __init__(self, step: int = 0, losses: list[float] | None = None) -> None:
        self.step, self.losses = step, losses or []

    def state_dict(self) -> dict[str, Any]:
        history = io.BytesIO()
        torch.save(self.losses, history)
        return {"step": torch.tensor(self.step, dtype=torch.int32), "losses": history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"].item())
        state_dict["losses"].seek(0)
        self.losses = torch.load(state_dict["losses"])


class RecordingDict(dict[str, Any]):
    """Notices when DCP replaces a top-level value instead of loading into it."""

    replaced = False

    def __setitem__(self, key: str, value: Any) -> None:
        self.replaced = True
        super().__setitem__(key, value)


def test_stateful_objects_load_in_place_and_plain_values_are_replaced(places: list[Place]) -> None:
    for place in places:
        saved = {"blob": BlobState(b"SomeBlobForTesting"), "train": TrainState(4, [0.5, 0.25, -1.0])}
        save(saved, storage_writer=place.writer("stateful"), no_dist=True)

        blob, train = BlobState(b""), TrainState()
        target = RecordingDict(blob=blob, train=train)
        target.replaced = False
        load(target, storage_reader=place.reader("stateful"), no_dist=True)
        assert target["blob"] is blob and target["train"] is train and not target.replaced, place.name
        assert blob.loads == 1 and blob.state == {"blob": b"SomeBlobForTesting"}, place.name
        assert (train.step, train.losses) == (4, [0.5, 0.25, -1.0]), place.name

        plain = RecordingDict(foo={"replicated": torch.zeros(3, 3), "bytes": [0]})
        plain.replaced = False
        expected = {"replicated": random_tensor((3, 3), torch.float32, 3), "bytes": [1, 2, 3, 4]}
        save({"foo": expected}, storage_writer=place.writer("plain"), no_dist=True)
        load(plain, storage_reader=place.reader("plain"), no_dist=True)
        assert plain.replaced, place.name
        assert_same(plain["foo"], expected, place.name)


def test_bytesio_value_round_trips_as_bytesio(places: list[Place]) -> None:
    for place in places:
        save({"epoch": io.BytesIO(b"TrainingEpoch:4")}, storage_writer=place.writer("bio"), no_dist=True)
        target: dict[str, Any] = {"epoch": io.BytesIO()}
        load(target, storage_reader=place.reader("bio"), no_dist=True)
        assert_same(target, {"epoch": io.BytesIO(b"TrainingEpoch:4")}, place.name)


def test_kvckpt_load_takes_the_values_dcp_load_takes(places: list[Place]) -> None:
    """``kvckpt.load`` refuses to unpickle code, but every kind of value DCP stores as bytes is data
    and must load as ``dcp.load`` loads it from a folder: BytesIO (upstream's train state), lists,
    strings, tuples and bytes."""
    results = []
    for place in places:
        saved = {
            "epoch": io.BytesIO(b"TrainingEpoch:4"),
            "train": TrainState(4, [0.5, 0.25]),
            "bytes0": [1],
            "bytes1": "string",
            "options": {"betas": (0.9, 0.99), "raw": b"\x00"},
        }
        train = TrainState()
        target: dict[str, Any] = {
            "epoch": io.BytesIO(),
            "train": train,
            "bytes0": [],
            "bytes1": "",
            "options": {},
        }
        if place.is_folder:
            save(saved, storage_writer=place.writer("api"), no_dist=True)
            load(target, storage_reader=place.reader("api"), no_dist=True)
        else:
            kvckpt.save(saved, place.id("api"), no_dist=True, **place.options)
            kvckpt.load(target, place.id("api"), no_dist=True, **place.options)
        assert (train.step, train.losses) == (4, [0.5, 0.25]), place.name
        target.pop("train")
        results.append(target)
    assert_same(results[1], results[0])
    assert_same(results[1]["epoch"], io.BytesIO(b"TrainingEpoch:4"))

    store = places[1]  # a BytesIO is allowed as data; what is placed inside it still is not
    smuggled = io.BytesIO(b"x")
    smuggled.payload = Smuggled()  # type: ignore[attr-defined]
    kvckpt.save({"epoch": smuggled}, store.id("smuggled"), no_dist=True, **store.options)
    with pytest.raises(kvckpt.KVCheckpointError, match="a safe load does not construct"):
        kvckpt.load({"epoch": io.BytesIO()}, store.id("smuggled"), no_dist=True, **store.options)


class Smuggled:
    """Unpickling this calls a function: harmless here, but no allow-list admits it."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (os.getpid, ())


def test_rank_local_record_without_a_process_group(places: list[Place]) -> None:
    """``use_collectives=False`` writes rank 0's own record (FileSystemWriter: ``__0_.metadata``);
    ``load`` finds no global record and falls back to it."""
    saved = {"w": random_tensor((3, 5), torch.float32, 21), "step": 2}
    for place in places:
        save(saved, storage_writer=place.writer("local"), no_dist=True, use_collectives=False)
        with pytest.raises(FileNotFoundError if place.is_folder else kvckpt.CheckpointNotFoundError):
            place.reader("local").read_metadata()  # no global record
        target: dict[str, Any] = {"w": torch.zeros(3, 5), "step": 0}
        load(target, storage_reader=place.reader("local"), no_dist=True)
        assert_same(target, saved, place.name)


def test_meta_tensor_is_refused(places: list[Place]) -> None:
    """A tensor with no data (torch 2.13's pipeline-stage state dicts keep other stages' meta
    tensors) fails the save everywhere; kvckpt says why, and commits nothing."""
    for place in places:
        with pytest.raises(CheckpointException) as refused:
            save({"w": torch.empty(3, device="meta")}, storage_writer=place.writer("meta"), no_dist=True)
        if not place.is_folder:
            failure = rank_failure(refused.value)
            assert isinstance(failure, kvckpt.KVCheckpointError) and "meta device" in str(failure)
            with pytest.raises(kvckpt.CheckpointNotFoundError):
                place.reader("meta").read_metadata()


def test_empty_state_dict(places: list[Place]) -> None:
    for place in places:
        metadata = save({}, storage_writer=place.writer("empty"), no_dist=True)
        assert metadata.state_dict_metadata == {}, place.name
        load({}, storage_reader=place.reader("empty"), no_dist=True)
        assert place.reader("empty").read_metadata().state_dict_metadata == {}, place.name


def test_float32_checkpoint_loads_into_a_bfloat16_template(places: list[Place]) -> None:
    """DCP casts on load when the template's dtype differs (upstream keeps this for compatibility)."""
    saved = random_tensor((4, 3), torch.float32, 5).clamp(-1e30, 1e30).nan_to_num()
    for place in places:
        save({"w": saved}, storage_writer=place.writer("cast"), no_dist=True)
        target = {"w": torch.zeros(4, 3, dtype=torch.bfloat16)}
        load(target, storage_reader=place.reader("cast"), no_dist=True)
        assert bits_equal(target["w"], saved.to(torch.bfloat16)), place.name


def test_listing_the_stored_state_dict(places: list[Place]) -> None:
    """Upstream's ``list_stored_state_dict`` (newer than torch 2.13) returns the reader's
    ``read_metadata().state_dict_metadata``; that is what is listed here, keys flattened."""
    for place in places:
        save(nested(fill=True) | {"bytes_data": io.BytesIO(b"x")}, storage_writer=place.writer("ls"))
        listed = place.reader("ls").read_metadata().state_dict_metadata
        weight = listed["model.encoder.weight"]
        assert isinstance(weight, TensorStorageMetadata), place.name
        assert (weight.size, weight.properties.dtype) == (torch.Size([4, 3]), torch.float32), place.name
        assert listed["model.encoder.bias"].properties.dtype == torch.bfloat16, place.name  # type: ignore[union-attr]
        assert isinstance(listed["bytes_data"], BytesStorageMetadata), place.name
        assert isinstance(listed["name"], BytesStorageMetadata), place.name
        assert "model.layers.1.gate" in listed and "model.layers.2.1" in listed, sorted(listed)
    folder_keys, store_keys = (set(p.reader("ls").read_metadata().state_dict_metadata) for p in places)
    assert folder_keys == store_keys
