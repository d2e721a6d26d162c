"""The troubleshooting entry for a forgotten kvckpt.install() quotes what DCP really raises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "integrations.md"]

#: dcp.save, dcp.load and dcp.async_save by URL in a process that never ran kvckpt.install().
WITHOUT_INSTALL = """
import torch, torch.distributed.checkpoint as dcp
url = "redis://127.0.0.1:1/0/run1/step100"
for call in (
    lambda: dcp.save({"w": torch.ones(2)}, checkpoint_id=url, no_dist=True),
    lambda: dcp.load({"w": torch.ones(2)}, checkpoint_id=url, no_dist=True),
    lambda: dcp.async_save({"w": torch.ones(2)}, checkpoint_id=url).result(),
):
    try:
        call()
    except RuntimeError as exc:
        print(f"{type(exc).__name__}: {exc}")
"""


def documented(path: Path) -> str:
    """The error the document quotes (``RuntimeError: Cannot detect …``), line breaks undone."""
    text = " ".join(path.read_text().split())
    found = re.search(r"`(RuntimeError: Cannot detect which .*?)`", text)
    assert found is not None, f"{path.name} does not quote DCP's error"
    return found.group(1)


def test_the_documented_error_is_what_dcp_raises_without_install() -> None:
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", WITHOUT_INSTALL],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    raised = result.stdout.splitlines()
    assert len(raised) == 3 and len(set(raised)) == 1, result.stdout + result.stderr
    for path in DOCS:
        assert documented(path) == raised[0], path.name
        assert "kvckpt.install()" in path.read_text()
