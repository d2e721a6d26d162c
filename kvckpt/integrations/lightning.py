"""Lightning checkpoints in kvckpt: a CheckpointIO plugin, and a ModelCheckpoint that finds ``last``.

    trainer = Trainer(plugins=[KVCheckpointIO()],
                      callbacks=[KVModelCheckpoint(dirpath="redis://host:6379/0/run1", save_last=True)])
    trainer.fit(model, ckpt_path="last")

Each Lightning checkpoint (``…/run1/epoch=0-step=100.ckpt``, ``…/run1/last.ckpt``) is one kvckpt
checkpoint at that namespace, committed atomically (an existing one is swapped, never half-replaced).
The checkpoint dict's tensors, wherever they sit in nested dicts and lists (model weights, optimizer
moments, metric tensors), are stored as tensors; everything else (loops, callback states, hparams)
is one DCP object value, loaded with ``torch.load(weights_only=True)`` (hparams' AttributeDict is
stored as a plain dict and rebuilt). Other classes there (hparams holding arbitrary objects) are
refused with an error: allow them by name with ``safe_globals=[…]``, or load everything with
``allow_pickle=True`` if you trust whoever writes the store.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import CheckpointIO
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from kvckpt.arguments import keywords
from kvckpt.dcp.api import SafeLoadPlanner, single_process_quietly, unwrapped_errors
from kvckpt.dcp.reader import KVStorageReader
from kvckpt.dcp.writer import KVStorageWriter
from kvckpt.integrations.fsview import register_fsspec
from kvckpt.management.api import delete
from kvckpt.registry import owns

#: The state-dict key of the non-tensor remainder; tensors sit at "tensor/<path>".
SKELETON = "lightning"

# ModelCheckpoint (ours or the stock one) resolves its dirpath through fsspec as it is constructed,
# which may come before KVCheckpointIO() is: importing this module is what makes kvckpt URLs known.
register_fsspec()

_Path = tuple[Any, ...]


def split_tensors(obj: Any, path: _Path = ()) -> tuple[Any, list[tuple[_Path, torch.Tensor]], list[_Path]]:
    """``obj`` with each tensor inside dicts and lists replaced by None, the tensors by path, and the
    paths of AttributeDicts (turned into plain dicts: the weights_only unpickler fills no dict subclass)."""
    if isinstance(obj, torch.Tensor):
        return None, [(path, obj)], []
    found: list[tuple[_Path, torch.Tensor]] = []
    wrapped: list[_Path] = [path] if isinstance(obj, AttributeDict) else []
    if isinstance(obj, dict):
        out = {} if isinstance(obj, AttributeDict) else type(obj)()
        for key, value in obj.items():
            out[key], inner, inner_wrapped = split_tensors(value, (*path, key))
            found += inner
            wrapped += inner_wrapped
        return out, found, wrapped
    if isinstance(obj, list):
        items = []
        for index, value in enumerate(obj):
            item, inner, inner_wrapped = split_tensors(value, (*path, index))
            items.append(item)
            found += inner
            wrapped += inner_wrapped
        return items, found, wrapped
    return obj, found, wrapped


def _put(root: Any, path: _Path, value: Any) -> Any:
    """Set ``value`` at ``path`` in ``root``; returns the new root (an empty path replaces it)."""
    if not path:
        return value
    node = root
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return root


def _get(root: Any, path: _Path) -> Any:
    for key in path:
        root = root[key]
    return root


class KVCheckpointIO(CheckpointIO):
    """Save, load and remove Lightning checkpoints at kvckpt URLs.

    ``writer_options`` go to KVStorageWriter (``ttl``, ``chunk_bytes``, ``min_replicas``, …);
    ``safe_globals`` adds classes your checkpoint's non-tensor state holds to the load allowlist.
    """

    def __init__(
        self, *, allow_pickle: bool = False, safe_globals: Iterable[Any] = (), **writer_options: Any
    ) -> None:
        keywords("KVCheckpointIO", writer_options, KVStorageWriter, taken=("checkpoint_id", "overwrite"))
        KVStorageWriter(**writer_options)  # checks the values now, not at the first save; connects to nothing
        self.allow_pickle = allow_pickle
        self.safe_globals = list(safe_globals)
        self.writer_options = writer_options

    def writer(self, checkpoint_id: str) -> KVStorageWriter:
        """The writer for one save: an existing checkpoint at the same name is swapped atomically."""
        return KVStorageWriter(checkpoint_id, overwrite=True, **self.writer_options)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        url = os.fspath(path)
        skeleton, tensors, wrapped = split_tensors(checkpoint)
        state: dict[str, Any] = {}
        paths = []
        for index, (where, tensor) in enumerate(tensors):
            key = f"tensor/{index}/" + "/".join(map(str, where))
            state[key] = tensor
            paths.append((where, key))
        state[SKELETON] = (skeleton, paths, wrapped)  # a tuple: DCP stores it as one object, unflattened
        with unwrapped_errors(), single_process_quietly():
            dcp_save(state, storage_writer=self.writer(url), no_dist=True)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        reader = KVStorageReader(os.fspath(path))
        template: dict[str, Any] = {SKELETON: None}
        with unwrapped_errors(), single_process_quietly():
            for fqn, meta in reader.read_metadata().state_dict_metadata.items():
                if isinstance(meta, TensorStorageMetadata):
                    template[fqn] = torch.empty(meta.size, dtype=meta.properties.dtype)
            with torch.serialization.safe_globals(self.safe_globals):
                dcp_load(
                    template,
                    storage_reader=reader,
                    planner=SafeLoadPlanner(allow_pickle=self.allow_pickle),
                    no_dist=True,
                )
        skeleton, paths, wrapped = template[SKELETON]
        device = map_location if isinstance(map_location, (str, torch.device)) else None
        for where, key in paths:
            tensor = template[key]
            skeleton = _put(skeleton, where, tensor.to(device) if device is not None else tensor)
        for where in sorted(wrapped, key=len, reverse=True):
            skeleton = _put(skeleton, where, AttributeDict(_get(skeleton, where)))
        checkpoint: dict[str, Any] = skeleton
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        delete(os.fspath(path))

    def teardown(self) -> None:
        """Every call opens and closes its own connections: nothing stays open."""


class KVModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``ckpt_path="last"`` lookup keeps kvckpt URLs whole.

    Lightning takes ``last.ckpt`` candidates from fsspec's ``ls`` of ``dirpath``, which names them
    without protocol and server (as fsspec does for every remote protocol), and passes them through
    ``os.path.normpath`` (which would turn ``redis://host`` into ``redis:/host`` anyway); the stock
    class then looks for them on the local disk. Everything else is ModelCheckpoint's.
    """

    def _find_last_checkpoints(self, trainer: Any) -> set[str]:
        if not (isinstance(self.dirpath, str) and owns(self.dirpath)):
            found: set[str] = super()._find_last_checkpoints(trainer)
            return found
        if not self._fs.exists(self.dirpath):
            return set()
        last = self.CHECKPOINT_NAME_LAST
        names = [str(name).rsplit("/", 1)[-1] for name in self._fs.ls(self.dirpath, detail=False)]
        return {
            f"{self.dirpath.rstrip('/')}/{name}"
            for name in names
            if name.endswith(self.FILE_EXTENSION)
            and (name == last + self.FILE_EXTENSION or name.startswith(last + "-"))
        }
