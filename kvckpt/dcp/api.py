"""One-call save/load, and the load planner that refuses to run pickles from the store."""

from __future__ import annotations

import contextlib
import io
import pickle
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlanner, ReadItem, SavePlanner
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.checkpoint.storage import StorageReader

from kvckpt.dcp.copy import durable_reader
from kvckpt.dcp.reader import KVStorageReader
from kvckpt.dcp.writer import KVStorageWriter
from kvckpt.errors import CheckpointNotFoundError, KVCheckpointError
from kvckpt.registry import owns


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
    no_dist: bool = False,
    use_collectives: bool = True,
    **writer_options: Any,
) -> Metadata:
    """``dcp.save`` into kvckpt; works with or without an initialised process group.

    ``no_dist`` saves this process's state alone; ``use_collectives=False`` gives every rank its own
    record (``NAMESPACE/__R.metadata``), as DCP defines both.
    """
    writer = KVStorageWriter(checkpoint_id, client=client, **writer_options)
    with unwrapped_errors():
        metadata: Metadata = dcp_save(
            state_dict,
            storage_writer=writer,
            planner=planner,
            process_group=process_group,
            no_dist=no_dist,
            use_collectives=use_collectives,
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
    no_dist: bool = False,
    **reader_options: Any,
) -> None:
    """``dcp.load`` from kvckpt in place; non-tensor values load with weights_only unless allowed.

    Like DCP, it falls back to this rank's own record when the checkpoint has no global one. An id
    that is not a kvckpt URL (and no ``client``) is a DCP checkpoint folder or fsspec URL, such as
    the durable tier's (``reader_options`` may then hold fsspec's ``storage_options``).
    """
    reader: StorageReader
    if client is None and not owns(checkpoint_id):
        reader = durable_reader(checkpoint_id, **reader_options)
    else:
        reader = KVStorageReader(checkpoint_id, client=client, **reader_options)
    with unwrapped_errors():
        if isinstance(reader, KVStorageReader):
            rank = 0 if no_dist or not dist.is_initialized() else dist.get_rank(process_group)
            _check_committed(reader, rank)
        dcp_load(
            state_dict,
            storage_reader=reader,
            planner=planner or SafeLoadPlanner(allow_pickle=allow_pickle),
            process_group=process_group,
            no_dist=no_dist,
        )


def _check_committed(reader: KVStorageReader, rank: int) -> None:
    """A missing checkpoint is CheckpointNotFoundError here, not DCP's AssertionError later."""
    try:
        reader.read_metadata()
    except CheckpointNotFoundError as missing:
        try:
            reader.read_metadata(rank=rank)
        except CheckpointNotFoundError:
            raise missing from None
