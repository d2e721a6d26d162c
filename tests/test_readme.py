"""The README's code that runs without a server runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_block_after(marker: str) -> str:
    text = README.read_text()
    start = text.index(marker)
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert block is not None, f"no python block after {marker!r}"
    return block.group(1)


def test_the_fakeredis_snippet_runs_as_written() -> None:
    code = python_block_after("For unit tests, inject")
    assert "FakeServer" in code  # it says how two clients see the same data
    exec(compile(code, str(README), "exec"), {})
