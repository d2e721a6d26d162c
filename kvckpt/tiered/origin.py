"""Where a checkpoint folder came from: the step and commit time its source recorded.

A store orders its checkpoints by step and commit time (docs/record-format.md, "Order"); a DCP folder
records neither. So that a checkpoint keeps its place through a folder (``kvckpt cp`` store → folder →
store, or a restore from the durable tier), the folders kvckpt writes say it beside DCP's files, in
JSON, never a pickle:

- ``.kvckpt-drained.json``, the drainer's completion marker (kvckpt.tiered.tiers);
- ``.kvckpt-source.json`` (:data:`SIDECAR`), written by a copy into a folder.

Both leave the folder a plain DCP checkpoint: DCP's readers open ``.metadata`` and the files it
names, nothing else. A sidecar names the ``.metadata`` it was written with (its xxh3_64), so a later
``dcp.save`` into the same folder does not inherit the step of the checkpoint it replaced.

Torch-free.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from kvckpt.errors import CorruptCheckpointError
from kvckpt.tiered import tiers

log = logging.getLogger(__name__)

SIDECAR = ".kvckpt-source.json"
FORMAT = "kvckpt-source/1"
METADATA_FILE = ".metadata"


@dataclass(frozen=True)
class Origin:
    """What orders a checkpoint, as its source recorded it, and which checkpoint that was."""

    step: int | None
    created: float  # the source's commit time, Unix seconds (the saving host's clock)
    #: The source store's clock at its commit. Only that store can compare it, so a copy into any
    #: store from a folder never records it as its own (docs/record-format.md, "Order").
    commit_clock: float | None
    source: str = ""  # the checkpoint it was copied from, credentials redacted
    namespace: str = ""
    save_id: str = ""


def read(folder: Path) -> Origin:
    """The origin a DCP folder records: the drainer's marker, else a copy's sidecar (while its
    ``.metadata`` is the one the sidecar names). A folder with neither (one ``dcp.save`` wrote) has
    no step, and its ``.metadata``'s modification time stands for its commit time."""
    drained = folder / tiers.MARKER
    if drained.is_file():
        return _parse(drained, tiers.FORMAT)[0]
    sidecar = folder / SIDECAR
    if sidecar.is_file():
        found, named = _parse(sidecar, FORMAT)
        if named == _digest((folder / METADATA_FILE).read_bytes()):
            return found
        log.warning(
            "%s describes another checkpoint than the folder now holds (its %s changed since): "
            "ignoring its step and commit time",
            sidecar,
            METADATA_FILE,
        )
    return Origin(step=None, created=(folder / METADATA_FILE).stat().st_mtime, commit_clock=None)


def write(folder: Path, origin: Origin) -> None:
    """Record ``origin`` in a folder whose DCP checkpoint is complete; its ``.metadata`` keeps the
    source's commit time as its modification time, for tools that know nothing of the sidecar."""
    metadata = folder / METADATA_FILE
    body = {"format": FORMAT, **dataclasses.asdict(origin), "metadata_xxh3": _digest(metadata.read_bytes())}
    with open(folder / SIDECAR, "wb") as out:
        out.write(json.dumps(body).encode())
        out.flush()
        os.fsync(out.fileno())
    os.utime(metadata, (origin.created, origin.created))


def _digest(data: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def _number(body: dict[str, Any], name: str, optional: bool = False) -> Any:
    value = body.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} {value!r} is not a number")
    return float(value)


def _parse(path: Path, expected: str) -> tuple[Origin, Any]:
    """The origin a marker or sidecar holds, and the metadata digest it names (None in a marker)."""
    try:
        body = json.loads(path.read_bytes())
        if not isinstance(body, dict) or body.get("format") != expected:
            raise ValueError(
                f"format {body.get('format') if isinstance(body, dict) else body!r}, not {expected!r}"
            )
        step = body.get("step")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise ValueError(f"step {step!r} is not a whole number >= 0")
        created, clock = _number(body, "created"), _number(body, "commit_clock", optional=True)
        found = Origin(
            step=step,
            created=created,
            commit_clock=clock,
            source=str(body.get("source", "")),
            namespace=str(body.get("namespace", "")),
            save_id=str(body.get("save_id", "")),
        )
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(
            f"{path} cannot be read as where this checkpoint came from ({exc}); delete that file to "
            "copy the checkpoint without its recorded step and commit time (it then sorts by the "
            f"folder's {METADATA_FILE} modification time)",
            key=str(path),
        ) from exc
    return found, body.get("metadata_xxh3")
