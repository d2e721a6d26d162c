"""What a fresh install needs is declared: `pip install torch==2.13.0 && pip install -e '.[test]'` and
nothing else runs kvckpt, its tests, benchmarks and examples."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.harness.servers import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("kvckpt", "tests", "benchmarks", "examples")


def declared() -> set[str]:
    """Distribution names kvckpt requires, its extras included, normalized."""
    names = set()
    for requirement in importlib.metadata.requires("kvckpt") or []:
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
        assert match, requirement
        names.add(normalize(match.group()))
    return names


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def providers() -> dict[str, set[str]]:
    """Top-level module name -> installed distributions that provide it.

    Built from each distribution's file list: Python 3.10's ``packages_distributions`` only reads
    ``top_level.txt``, which many wheels no longer ship.
    """
    found: dict[str, set[str]] = {}
    for dist in importlib.metadata.distributions():
        tops = set((dist.read_text("top_level.txt") or "").split())
        for file in dist.files or []:
            first = file.parts[0] if file.parts else ""
            if first and first != ".." and not first.endswith((".dist-info", ".egg-info", ".pth")):
                tops.add(first.split(".")[0])
        for top in tops:
            found.setdefault(top, set()).add(normalize(dist.metadata["Name"]))
    return found


def imported_top_level_names() -> dict[str, str]:
    """Every module imported anywhere in the project's Python files -> one file that imports it."""
    found: dict[str, str] = {}
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared() -> None:
    local = {*SOURCES, "__future__"} | {
        path.stem for folder in SOURCES for path in (ROOT / folder).glob("*.py")
    }  # scripts in benchmarks/ and examples/ import their neighbours
    installed = providers()
    wanted = declared()
    undeclared = {}
    for name, where in imported_top_level_names().items():
        if name in local or name in sys.stdlib_module_names:
            continue
        provided_by = installed.get(name, set())
        if not provided_by and normalize(name) in wanted:
            continue  # an extra this environment did not install (torchtitan)
        if not provided_by & wanted:
            undeclared[name] = (where, sorted(provided_by) or "not installed")
    assert not undeclared, f"imported but not in pyproject.toml's dependencies or extras: {undeclared}"


#: One gloo rank saving through kvckpt where numpy cannot be imported.
WITHOUT_NUMPY = textwrap.dedent(
    """
    import sys
    sys.modules["numpy"] = None
    import torch
    import torch.distributed as dist
    import kvckpt
    dist.init_process_group("gloo", init_method=sys.argv[1], rank=0, world_size=1)
    try:
        kvckpt.save({"w": torch.ones(3)}, sys.argv[2])
    finally:
        dist.destroy_process_group()
    """
)


def test_numpy_is_declared_because_torch_distributed_needs_it(
    redis_server: RedisServer, namespace: str
) -> None:
    """kvckpt's own code needs no numpy (tests/test_tensor_bytes.py), but a save or load in a process
    group gathers plans with torch.distributed's object collectives, which call Tensor.numpy()."""
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_NUMPY, f"tcp://127.0.0.1:{free_port()}", redis_server.url(namespace)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        check=False,
    )
    assert done.returncode != 0 and "Numpy is not available" in done.stderr, done.stderr[-2000:]
    assert "numpy" in declared()
