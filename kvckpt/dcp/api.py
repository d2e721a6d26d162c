"""One-call save/load: safe loading under any planner, and DCP's failures as typed kvckpt errors.

DCP wraps every rank's failure in ``CheckpointException``, a ``BaseException`` that ``except
Exception`` misses and whose text is a list of tracebacks. ``kvckpt.save``/``kvckpt.load`` raise
kvckpt's own error instead: the one a rank raised, or, for a mistake in the state_dict, one naming the
entry (StateDictMismatchError, UnpicklableValueError), or a KVCheckpointError summing up each rank's
failure. Ctrl-C stays a plain KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlanner, SavePlanner
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.checkpoint.storage import StorageReader

from kvckpt.arguments import keywords
from kvckpt.dcp.reader import KVStorageReader
from kvckpt.dcp.safe_load import SafeLoadPlanner as SafeLoadPlanner  # re-exported: kvckpt.SafeLoadPlanner
from kvckpt.dcp.writer import KVStorageWriter
from kvckpt.errors import (
    CheckpointNotFoundError,
    KVCheckpointError,
    StateDictMismatchError,
    StoreFullError,
    UnloadedEntriesError,
    UnloadedEntriesWarning,
    UnpicklableValueError,
)
from kvckpt.humanize import printable
from kvckpt.integrations.torch_private import flatten_state_dict
from kvckpt.management import orphans
from kvckpt.registry import owns, parse_url
from kvckpt.target import checkpoint_text
from kvckpt.tiered.copy import durable_reader
from kvckpt.tiered.copy import read_metadata as read_durable_metadata

Diagnosis = Callable[[], KVCheckpointError | None]


@contextlib.contextmanager
def unwrapped_errors(what: str = "checkpoint", diagnose: Diagnosis | None = None) -> Iterator[None]:
    """DCP's CheckpointException as kvckpt's typed error (see the module's docstring)."""
    try:
        yield
    except CheckpointException as exc:
        errors = [f[0] if isinstance(f, tuple) else f for f in exc.failures.values()]
        for error in errors:
            if isinstance(error, KeyboardInterrupt):
                raise error.with_traceback(None) from None
        ours = [e for e in errors if isinstance(e, KVCheckpointError)]
        if ours:
            raise ours[0] from exc
        found = diagnose() if diagnose is not None else None
        if found is not None:
            raise found from exc
        summary = "; ".join(
            f"rank {rank}: {type(error).__name__}: {printable(_first_line(error))}"
            for rank, error in zip(exc.failures, errors, strict=True)
        )
        raise KVCheckpointError(
            f"{what} failed: {summary}", failures=dict(zip(exc.failures, errors, strict=True))
        ) from exc


#: torch's warning, on every dcp.save/dcp.load without a process group, that it assumes one process.
_SINGLE_PROCESS = (
    r"torch\.distributed is (disabled, )?unavailable or uninitialized, "
    r"assuming the intent is to (save|load) in a single process"
)


@contextlib.contextmanager
def single_process_quietly() -> Iterator[None]:
    """Silence torch's single-process warning, and only it.

    kvckpt.save/load document that they work without a process group, so the warning says nothing
    the caller did not ask for; every other warning still reaches the caller.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS, category=UserWarning)
        yield


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def save(
    state_dict: dict[str, Any],
    checkpoint_id: str | os.PathLike[str],
    *,
    client: Any = None,
    planner: SavePlanner | None = None,
    process_group: Any = None,
    no_dist: bool = False,
    use_collectives: bool = True,
    step: int | None = None,
    **writer_options: Any,
) -> Metadata:
    """``dcp.save`` into kvckpt; works with or without an initialised process group.

    ``no_dist`` saves this process's state alone; ``use_collectives=False`` gives every rank its own
    record (``NAMESPACE/__R.metadata``), as DCP defines both. ``step`` is recorded, and orders
    ``kvckpt.latest``/``keep_last`` (a copy keeps it). Returns the Metadata the commit recorded
    (storage_meta, version) on the rank that committed, DCP's plan metadata on the others.
    """
    keywords("kvckpt.save", writer_options, KVStorageWriter)
    writer = KVStorageWriter(checkpoint_id, client=client, step=step, **writer_options)
    try:
        with unwrapped_errors("save", lambda: _unsavable(state_dict)), single_process_quietly():
            metadata: Metadata = dcp_save(
                state_dict,
                storage_writer=writer,
                planner=planner,
                process_group=process_group,
                no_dist=no_dist,
                use_collectives=use_collectives,
            )
    except StoreFullError as full:
        raise _with_orphans(writer, full) from full
    finally:
        writer.reset()  # ends the liveness of a save that failed on another rank: finish never ran here
    return writer.recorded or metadata


def load(
    state_dict: dict[str, Any],
    checkpoint_id: str | os.PathLike[str],
    *,
    client: Any = None,
    allow_pickle: bool = False,
    planner: LoadPlanner | None = None,
    process_group: Any = None,
    no_dist: bool = False,
    strict: bool = False,
    **reader_options: Any,
) -> None:
    """``dcp.load`` from kvckpt in place; non-tensor values load safely unless ``allow_pickle``.

    Whatever ``planner`` is given, a stored non-tensor value whose unpickling would construct a class
    outside torch's weights_only allow-list is refused (UnsafeObjectError) unless
    ``allow_pickle=True``. Like DCP, it falls back to this rank's own record when the checkpoint has
    no global one. An id that is not a kvckpt URL (and no ``client``) is a DCP checkpoint folder or
    fsspec URL, such as the durable tier's (``reader_options`` may then hold fsspec's
    ``storage_options``); DCP's own reader loads it, with the planner as given.

    Checkpoint entries under a top-level key of ``state_dict`` that no rank's ``state_dict`` has a
    place for (a fresh ``optimizer.state_dict()`` has no ``state`` to load into) would stay unloaded:
    that is an UnloadedEntriesWarning, or with ``strict=True`` an UnloadedEntriesError raised before
    anything is loaded. Keys ``state_dict`` lacks altogether are a partial load, not reported.
    """
    reader: StorageReader
    chosen = planner or SafeLoadPlanner(allow_pickle=allow_pickle)
    checkpoint_id = checkpoint_text(checkpoint_id)
    if client is None and not owns(checkpoint_id):
        durable = reader = durable_reader(checkpoint_id, **reader_options)

        def metadata() -> Metadata:  # read again only to say what went wrong, as DCP read it
            return read_durable_metadata(durable, checkpoint_id)
    else:
        keywords("kvckpt.load", reader_options, KVStorageReader)
        reader = KVStorageReader(checkpoint_id, client=client, allow_pickle=allow_pickle, **reader_options)
        rank = 0 if no_dist or not dist.is_initialized() else dist.get_rank(process_group)
        with unwrapped_errors("load"):
            committed = _check_committed(reader, rank)  # DCP's load reuses this fetch

        def metadata() -> Metadata:
            return committed

    _report_unloaded(state_dict, metadata(), chosen, strict, process_group, no_dist)
    with (
        unwrapped_errors("load", lambda: _mismatch(state_dict, metadata(), chosen)),
        single_process_quietly(),
    ):
        dcp_load(
            state_dict,
            storage_reader=reader,
            planner=chosen,
            process_group=process_group,
            no_dist=no_dist,
        )


def _check_committed(reader: KVStorageReader, rank: int) -> Metadata:
    """A missing checkpoint is CheckpointNotFoundError here, not DCP's AssertionError later; the
    record found is the one DCP's load then uses (fetched once)."""
    try:
        return reader.prefetch_metadata()
    except CheckpointNotFoundError as missing:
        try:
            return reader.prefetch_metadata(rank=rank)
        except CheckpointNotFoundError:
            raise missing from None


# Saying which entry was wrong -----------------------------------------------------------------


def _flat(state_dict: dict[str, Any], flatten: bool) -> dict[str, Any]:
    plain = {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state_dict.items()}
    return dict(flatten_state_dict(plain)[0]) if flatten else plain


def _describe(shape: Any, dtype: Any) -> str:
    return f"shape {tuple(shape)}, dtype {str(dtype).removeprefix('torch.')}"


def _mismatch(
    state_dict: dict[str, Any], metadata: Metadata, planner: LoadPlanner
) -> KVCheckpointError | None:
    """The first entry of ``state_dict`` the checkpoint cannot fill, as DCP's planner checks it."""
    saved = metadata.state_dict_metadata
    partial = bool(getattr(planner, "allow_partial_load", False))
    for fqn, value in _flat(state_dict, bool(getattr(planner, "flatten_state_dict", True))).items():
        meta = saved.get(fqn)
        size = value.size() if callable(getattr(value, "size", None)) else None
        if meta is None:
            if partial:
                continue
            return StateDictMismatchError(
                f"{printable(fqn)!r} is in the state_dict but not in the checkpoint (it holds "
                f"{len(saved)} entries); remove it from the state_dict, or load with "
                "planner=DefaultLoadPlanner(allow_partial_load=True) to leave it as it is",
                fqn=fqn,
            )
        if isinstance(meta, TensorStorageMetadata) and size is not None and tuple(size) != tuple(meta.size):
            wanted = _describe(size, getattr(value, "dtype", "?"))
            return StateDictMismatchError(
                f"{printable(fqn)!r}: the checkpoint holds {_describe(meta.size, meta.properties.dtype)}"
                f", the state_dict wants {wanted}; load into a tensor of the saved shape (or reshard "
                "with a DTensor of that global shape)",
                fqn=fqn,
                saved=tuple(meta.size),
                wanted=tuple(size),
            )
        if isinstance(meta, BytesStorageMetadata) and isinstance(value, torch.Tensor):
            return StateDictMismatchError(
                f"{printable(fqn)!r}: the checkpoint holds a non-tensor value there, the state_dict "
                f"a tensor ({_describe(value.shape, value.dtype)})",
                fqn=fqn,
            )
    return None


def _report_unloaded(
    state_dict: dict[str, Any],
    metadata: Metadata,
    planner: LoadPlanner,
    strict: bool,
    process_group: Any,
    no_dist: bool,
) -> None:
    """Warn about (or, ``strict``, refuse) checkpoint entries this load would leave behind.

    Only entries under a top-level key the state_dict has count: a key it lacks altogether is a
    partial load the caller chose (the model alone, say). Ranks may each hold a part (pipeline
    stages), so with a process group an entry counts only when no rank has a place for it, and
    every rank reaches the same verdict: a strict refusal never leaves a rank waiting in the load.
    """
    wanted = _flat(state_dict, bool(getattr(planner, "flatten_state_dict", True)))
    tops = {str(key) for key in state_dict}
    lacking = [fqn for fqn in metadata.state_dict_metadata if fqn not in wanted and _under(fqn, tops)]
    if not no_dist and dist.is_initialized():
        lacking = _lacking_everywhere(lacking, wanted, process_group)
    if not lacking:
        return
    lacking.sort()
    named = ", ".join(repr(printable(fqn)) for fqn in lacking[:3]) + (", …" if len(lacking) > 3 else "")
    message = (
        f"the checkpoint holds {len(lacking)} entr{'y' if len(lacking) == 1 else 'ies'} that the "
        f"state_dict has no place for, under keys it has ({named}); they "
        f"{'would stay' if strict else 'stay'} unloaded. A fresh optimizer.state_dict() has no state "
        "to load into: build the state_dict with torch.distributed.checkpoint.state_dict."
        "get_state_dict(model, optimizer) (it creates the optimizer's state) for the save and the load, "
        "then set_state_dict"
    )
    if strict:
        raise UnloadedEntriesError(f"{message}; nothing was loaded", fqns=lacking)
    warnings.warn(
        f"{message}, or pass strict=True to make this an error", UnloadedEntriesWarning, stacklevel=3
    )


def _under(fqn: str, tops: set[str]) -> bool:
    """Whether ``fqn`` is a top-level key in ``tops`` or lies under one (keys may hold dots)."""
    at = fqn.find(".")
    while at != -1:
        if fqn[:at] in tops:
            return True
        at = fqn.find(".", at + 1)
    return fqn in tops


def _lacking_everywhere(lacking: list[str], wanted: dict[str, Any], process_group: Any) -> list[str]:
    """The entries of any rank's ``lacking`` that no rank's state_dict holds (one or two gathers)."""
    size = dist.get_world_size(process_group)
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, lacking, group=process_group)
    candidates = sorted({fqn for part in gathered for fqn in part})
    if not candidates:
        return []
    held: list[Any] = [None] * size
    dist.all_gather_object(held, [fqn for fqn in candidates if fqn in wanted], group=process_group)
    found = {fqn for part in held for fqn in part}
    return [fqn for fqn in candidates if fqn not in found]


def _unsavable(state_dict: dict[str, Any]) -> KVCheckpointError | None:
    """The first non-tensor value that torch.save (pickle) refuses, as DCP serialises them."""
    for fqn, value in _flat(state_dict, True).items():
        if isinstance(value, torch.Tensor) or value is None:
            continue
        try:
            torch.save(value, io.BytesIO())
        except Exception as exc:  # pickle raises many types: each means "cannot store this value"
            return UnpicklableValueError(
                f"{printable(fqn)!r}: a {type(value).__qualname__} cannot be saved: DCP stores "
                f"non-tensor values with torch.save (pickle), which refused it ({type(exc).__name__}: "
                f"{printable(_first_line(exc))}); make it picklable or plain data, or leave it out",
                fqn=fqn,
            )
    return None


def _with_orphans(writer: KVStorageWriter, full: StoreFullError) -> StoreFullError:
    """Say how much of the full store saves that died still hold, and how to free it."""
    target = writer.target
    root = target.namespace.split("/", 1)[0]
    try:
        left = orphans.survey(target.store, root)
    except KVCheckpointError:
        return full
    if not left.orphans:
        return full
    prefix = root
    if target.display != target.namespace:  # a URL (not an injected client's bare namespace)
        prefix = parse_url(target.display).with_namespace(root).to_url(redact=True)
    return StoreFullError(
        f"{full} ({orphans.summary(left.orphans)} under {prefix}: `kvckpt gc {prefix}` or kvckpt.gc() "
        "frees them)",
        orphan_bytes=left.nbytes,
    )
