"""Every private torch name kvckpt uses, and every torch function ``kvckpt.install()`` patches.

DCP keeps some of what kvckpt needs behind underscores: the function that picks a storage for a bare
``checkpoint_id`` (the hook's patch target), the executor of process-based ``async_save``, the fsspec
writer and reader, and two state-dict helpers. torch may move or drop any of them in a release
without notice. Here they are looked up by name on first use, so a torch that lacks one still imports
kvckpt, and the one feature that needs the name fails with UnsupportedTorchError naming it, the
installed torch and the range kvckpt is tested with, instead of an ImportError from ``import kvckpt``.
No other kvckpt module names a private torch module or attribute (tests/test_package_shape.py).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvckpt.errors import UnsupportedTorchError

if TYPE_CHECKING:
    from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter

#: The oldest and newest torch releases CI runs kvckpt's DCP tests on (.ci/run, tox.ini).
TESTED_TORCH = ("2.13.0", "2.14.1")
_DCP = "torch.distributed.checkpoint"


def torch_version() -> str:
    import torch

    return str(torch.__version__)


@functools.cache
def private(module: str, name: str) -> Any:
    """torch's ``module.name``; ``name`` may be dotted (a class's attribute). Resolved once.

    UnsupportedTorchError when the installed torch has no such module or attribute.
    """
    return _lookup(module, name)


def _lookup(module: str, name: str) -> Any:
    """As ``private``, uncached: a patched attribute's current value."""
    try:
        found: Any = importlib.import_module(module)
    except ImportError as exc:
        raise _unsupported(f"{module}.{name}", f"module {module} does not import ({exc})") from exc
    for part in name.split("."):
        try:
            found = getattr(found, part)
        except AttributeError as exc:
            raise _unsupported(f"{module}.{name}", f"{part!r} is missing") from exc
    return found


def _unsupported(missing: str, detail: str) -> UnsupportedTorchError:
    version = torch_version()
    oldest, newest = TESTED_TORCH
    return UnsupportedTorchError(
        f"torch {version} has no {missing} ({detail}), a private torch name kvckpt relies on; kvckpt is "
        f"tested with torch {oldest} to {newest}: install a torch in that range "
        f"(pip install 'torch>={oldest},<={newest}'), or a kvckpt release that supports torch {version}",
        missing=missing,
        torch_version=version,
        tested=TESTED_TORCH,
    )


def flatten_state_dict(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """DCP's own flattening of nested dicts and lists into fqns (``"optim.state.0.exp_avg"``), so
    kvckpt's fqns are the ones DCP's planners use."""
    result: tuple[dict[str, Any], dict[str, Any]] = private(f"{_DCP}._nested_dict", "flatten_state_dict")(
        state_dict
    )
    return result


def set_element(root: dict[str, Any], path: Any, value: Any) -> None:
    """DCP's inverse of that flattening: put ``value`` where ``path`` (a flattening mapping) says."""
    private(f"{_DCP}._traverse", "set_element")(root, path, value)


def fsspec_reader() -> Callable[..., FileSystemReader]:
    """DCP's FsspecReader class (a FileSystemReader over any fsspec URL; its keywords go to fsspec)."""
    reader: Callable[..., FileSystemReader] = private(f"{_DCP}._fsspec_filesystem", "FsspecReader")
    return reader


def fsspec_writer() -> type[FileSystemWriter]:
    """DCP's FsspecWriter class (a FileSystemWriter over any fsspec URL)."""
    writer: type[FileSystemWriter] = private(f"{_DCP}._fsspec_filesystem", "FsspecWriter")
    return writer


@dataclass(frozen=True)
class PatchPoint:
    """One attribute of torch that ``kvckpt.install()`` replaces: ``attribute`` of the module, or of
    the class ``owner`` in it."""

    module: str
    attribute: str
    owner: str | None = None

    def holder(self) -> Any:
        return private(self.module, self.owner) if self.owner else importlib.import_module(self.module)

    def get(self) -> Any:
        return _lookup(self.module, f"{self.owner}.{self.attribute}" if self.owner else self.attribute)

    def replace(self, value: Any) -> Callable[[], None]:
        """Put ``value`` in place; returns what puts back exactly what was there before (deleting
        the attribute again where the class only inherited it)."""
        holder = self.holder()
        self.get()  # an attribute torch dropped is refused, not created where nothing would call it
        had_own = self.attribute in vars(holder)
        before = vars(holder).get(self.attribute)
        setattr(holder, self.attribute, value)

        def restore() -> None:
            if had_own:
                setattr(holder, self.attribute, before)
            else:
                delattr(holder, self.attribute)

        return restore


#: DCP's choice of storage for a bare checkpoint_id, and the two modules that imported it by name.
STORAGE_SETUP = (
    PatchPoint(f"{_DCP}._storage_utils", "_storage_setup"),
    PatchPoint(f"{_DCP}.state_dict_saver", "_storage_setup"),
    PatchPoint(f"{_DCP}.state_dict_loader", "_storage_setup"),
)
#: What process-based ``async_save`` runs in the caller before handing the save to its process.
PROCESS_EXECUTE_SAVE = PatchPoint(
    f"{_DCP}._async_process_executor", "execute_save", owner="_ProcessBasedAsyncCheckpointExecutor"
)
