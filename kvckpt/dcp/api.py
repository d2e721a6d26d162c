"""One-call save/load, and the load planner that refuses to run pickles from the store."""

from __future__ import annotations

import contextlib
import io
import pickle
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlanner, ReadItem, SavePlanner
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from kvckpt.dcp.reader import KVStorageReader
from kvckpt.dcp.writer import KVStorageWriter
from kvckpt.errors import KVCheckpointError


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose BYTE_IO items load with ``torch.load(weights_only=True)``.

    DCP's own planner unpickles arbitrary objects; a store shared between jobs must not be a way to
    run code in the loading process. ``allow_pickle=True`` restores DCP's behaviour.
    """

    def __init__(self, *args: Any, allow_pickle: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allow_pickle = allow_pickle

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=not self.allow_pickle)
        except pickle.UnpicklingError as exc:
            raise KVCheckpointError(
                f"{fqn!r}: the stored object is not loadable safely (weights_only=True refused it: "
                f"{str(exc).splitlines()[0]}); pass allow_pickle=True only if you trust whoever wrote "
                "this store",
                fqn=fqn,
            ) from exc
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


@contextlib.contextmanager
def unwrapped_errors() -> Iterator[None]:
    """DCP wraps every rank's failure in CheckpointException; surface kvckpt's own typed error."""
    try:
        yield
    except CheckpointException as exc:
        errors = [f[0] if isinstance(f, tuple) else f for f in exc.failures.values()]
        ours = [e for e in errors if isinstance(e, KVCheckpointError)]
        if ours:
            raise ours[0] from exc
        raise


def save(
    state_dict: dict[str, Any],
    checkpoint_id: str,
    *,
    client: Any = None,
    planner: SavePlanner | None = None,
    process_group: Any = None,
    **writer_options: Any,
) -> Metadata:
    """``dcp.save`` into kvckpt; works with or without an initialised process group."""
    writer = KVStorageWriter(checkpoint_id, client=client, **writer_options)
    with unwrapped_errors():
        metadata: Metadata = dcp_save(
            state_dict, storage_writer=writer, planner=planner, process_group=process_group
        )
    return metadata


def load(
    state_dict: dict[str, Any],
    checkpoint_id: str,
    *,
    client: Any = None,
    allow_pickle: bool = False,
    planner: LoadPlanner | None = None,
    process_group: Any = None,
    **reader_options: Any,
) -> None:
    """``dcp.load`` from kvckpt in place; non-tensor values load with weights_only unless allowed."""
    reader = KVStorageReader(checkpoint_id, client=client, **reader_options)
    with unwrapped_errors():
        reader.read_metadata()  # a missing checkpoint is CheckpointNotFoundError, not DCP's AssertionError
        dcp_load(
            state_dict,
            storage_reader=reader,
            planner=planner or SafeLoadPlanner(allow_pickle=allow_pickle),
            process_group=process_group,
        )
