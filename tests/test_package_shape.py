"""Rules about the package's shape that code review would otherwise have to catch by eye."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import kvckpt
import kvckpt.errors

PACKAGE = Path(kvckpt.__file__).parent
#: A module longer than this holds more than one thing: split it by what it holds.
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every kvckpt module ``path`` imports, at module level or inside a function (a lazy import
    still ties the two modules together); TYPE_CHECKING-only imports count too."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from pkg import module` names a module, not just pkg
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else node.module)
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(paths)
    return {name: imports_of(path, known) - {name} for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_in_the_package() -> None:
    graph = import_graph()
    assert graph.get("kvckpt.stores.redis.standalone")  # the walk sees imports at all
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_is_too_long() -> None:
    long = {
        module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


#: The modules that work on tensors: the DCP adapter, the copies and the drainer (which go through
#: DCP), the framework integrations, and the demo that trains a model. Everything else runs without torch.
TORCH_AWARE = (
    "kvckpt.dcp.",
    "kvckpt.tiered.copy",
    "kvckpt.tiered.drain",
    "kvckpt.integrations.hook",
    "kvckpt.integrations.lightning",
    "kvckpt.integrations.torch_private",
    "kvckpt.cli.demo",
)


def torch_aware(name: str) -> bool:
    return any(name == prefix or name.startswith(prefix) for prefix in TORCH_AWARE)


def imports_torch(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    return any(n == "torch" or n.startswith("torch.") for n in names)


def test_only_the_torch_aware_modules_import_torch() -> None:
    offenders = [
        name
        for path in PACKAGE.rglob("*.py")
        if not torch_aware(name := module_name(path)) and name != "kvckpt" and imports_torch(path)
    ]
    assert offenders == []


#: The one module that names torch's private modules and attributes, each looked up on first use.
TORCH_PRIVATE = "kvckpt.integrations.torch_private"


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_torch_names(source: str) -> list[str]:
    """The private torch names ``source`` imports or reaches, as far as the syntax shows: an import
    from a torch module with a ``_``-prefixed part or name, or an attribute ``_x`` read from a name
    that a torch import bound (``storage_utils._storage_setup``, ``torch.distributed._x``)."""
    found: list[str] = []
    bound: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "torch" or alias.name.startswith("torch."):
                    bound.add(alias.asname or alias.name.split(".")[0])
                    found += [alias.name] if any(map(private, alias.name.split("."))) else []
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            module = node.module or ""
            for alias in node.names:
                bound.add(alias.asname or alias.name)
                if any(map(private, module.split("."))) or private(alias.name):
                    found.append(f"{module}.{alias.name}")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and private(node.attr):
            root: ast.expr = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in bound:
                found.append(f"{ast.unparse(node.value)}.{node.attr}")
    return found


def test_private_torch_names_appear_only_in_the_guarded_module() -> None:
    """torch can move or drop a private name in any release; one module looks each up on first use
    and says which is missing (UnsupportedTorchError), so no other module may name one."""
    offenders = {
        name: names
        for path in PACKAGE.rglob("*.py")
        if (name := module_name(path)) != TORCH_PRIVATE and (names := private_torch_names(path.read_text()))
    }
    assert offenders == {}


def test_the_private_name_finder_sees_imports_and_attributes() -> None:
    source = (
        "import torch\n"
        "import torch.distributed.checkpoint._storage_utils as storage_utils\n"
        "from torch.distributed.checkpoint._traverse import set_element\n"
        "from torch.distributed.checkpoint import _nested_dict\n"
        "from torch.distributed.checkpoint.filesystem import FileSystemWriter\n"
        "storage_utils._storage_setup, FileSystemWriter._write, torch.distributed._x, torch.__version__\n"
        "self._own\n"
    )
    assert private_torch_names(source) == [
        "torch.distributed.checkpoint._storage_utils",
        "torch.distributed.checkpoint._traverse.set_element",
        "torch.distributed.checkpoint._nested_dict",
        "storage_utils._storage_setup",
        "FileSystemWriter._write",
        "torch.distributed._x",
    ]


def test_the_torch_free_modules_import_without_torch() -> None:
    """The store layer, management and the command line start on a machine without torch: each
    module imports with torch made unimportable (kvckpt itself loads its torch names on first use)."""
    names = sorted(
        name
        for p in PACKAGE.rglob("*.py")
        if not torch_aware(name := module_name(p)) and name != "kvckpt.__main__"
    )
    assert "kvckpt.management.api" in names and "kvckpt.cli.main" in names
    code = (
        "import importlib, sys\n"
        "sys.modules['torch'] = None\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_test_harness_is_not_shipped() -> None:
    assert importlib.util.find_spec("kvckpt.testing.servers") is None
    assert importlib.util.find_spec("kvckpt.testing.proxy") is None
    shipped = {module_name(p) for p in (PACKAGE / "testing").rglob("*.py")}
    assert shipped <= {
        "kvckpt.testing",
        "kvckpt.testing.conformance",
        "kvckpt.testing.stateful",
        "kvckpt.testing.fake_server",
        "kvckpt.testing.pytest_plugin",
    }


def test_every_error_and_warning_is_exported() -> None:
    """A user catches what kvckpt raises or warns by its name on ``kvckpt``, as the README lists them."""
    defined = {
        name
        for name, value in vars(kvckpt.errors).items()
        if isinstance(value, type) and issubclass(value, Exception) and value.__module__ == "kvckpt.errors"
    }
    assert {"KVCheckpointError", "ReplicationError", "UnsafeStoreConfigWarning"} <= defined
    assert defined - set(kvckpt.__all__) == set()
    assert all(getattr(kvckpt, name) is getattr(kvckpt.errors, name) for name in defined)


#: Modules that open, wrap or wait on sockets.
NETWORK = ("socket", "ssl", "select", "selectors", "asyncio", "grpc", "http.client", "urllib.request")


def network_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
    return {name for name in names if any(name == m or name.startswith(m + ".") for m in NETWORK)}


def test_the_resp_reader_imports_no_socket() -> None:
    """The RESP reader reads any ``recv_into`` callable, so it is tested without a server: neither it
    nor any kvckpt module it imports (transitively) imports a socket module."""
    graph = import_graph()
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    reached, todo = set(), ["kvckpt.stores.redis.resp"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += graph[name]
    assert "kvckpt.errors" in reached  # the walk follows imports at all
    offenders = {name: found for name in sorted(reached) if (found := network_imports(paths[name]))}
    assert offenders == {}
    assert network_imports(paths["kvckpt.stores.redis.transport"]) >= {"socket", "ssl"}  # the rule sees one


def own_private_names(tree: ast.Module) -> set[str]:
    """The private names a module defines: its functions and classes (methods included), every name
    it assigns or binds, and the attributes it assigns on ``self``/``cls``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name.split(".")[0])
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and is_self(node.value):
            names.add(node.attr)
    return {name for name in names if private(name)}


def is_self(node: ast.expr) -> bool:
    """``self``, ``cls`` or ``super()``: an object whose private names its own class may use."""
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Name) and node.func.id == "super"
    return isinstance(node, ast.Name) and node.id in ("self", "cls")


def foreign_private_names(sources: dict[str, str]) -> list[str]:
    """Where one kvckpt module reaches a private name another kvckpt module defines, as far as the
    syntax shows: an attribute ``x._name`` (``x`` not self/cls/super()) whose ``_name`` this module
    does not define and another does, or ``from kvckpt.m import _name`` of anything but a module."""
    trees = {name: ast.parse(source) for name, source in sources.items()}
    own = {name: own_private_names(tree) for name, tree in trees.items()}
    found: list[str] = []
    for name, tree in trees.items():
        elsewhere = set().union(*(names for other, names in own.items() if other != name))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "kvckpt":
                found += [
                    f"{name}: from {node.module} import {alias.name}"
                    for alias in node.names
                    if private(alias.name) and f"{node.module}.{alias.name}" not in sources
                ]
            elif (
                isinstance(node, ast.Attribute)
                and private(node.attr)
                and node.attr not in own[name]
                and node.attr in elsewhere
                and not is_self(node.value)
            ):
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_reaches_another_modules_private_names() -> None:
    """A ``_name`` is free to change with its own module; a caller elsewhere that needs it is using
    an interface, which then deserves a public name the owner keeps."""
    sources = {module_name(path): path.read_text() for path in PACKAGE.rglob("*.py")}
    assert foreign_private_names(sources) == []


def test_the_foreign_private_name_finder_sees_attributes_and_imports() -> None:
    sources = {
        "kvckpt.a": "class A:\n    def _end(self) -> None:\n        self._live = None\n_helper = 1\n",
        "kvckpt.b": (
            "from kvckpt.a import A, _helper\n"
            "from kvckpt import _buffers\n"
            "def f(a: A) -> None:\n"
            "    a._end()\n"
            "    a._live, a._unknown, a.__dict__\n"
        ),
        "kvckpt.c": (
            "from kvckpt.a import A\n"
            "class C(A):\n"
            "    def _end(self) -> None:\n"
            "        super()._end()\n"
            "        self._live = 1\n"
            "    def same(self, other: C) -> None:\n"
            "        other._end()\n"
        ),
        "kvckpt._buffers": "",
    }
    assert foreign_private_names(sources) == [
        "kvckpt.b: from kvckpt.a import _helper",
        "kvckpt.b:4: a._end",
        "kvckpt.b:5: a._live",
    ]
