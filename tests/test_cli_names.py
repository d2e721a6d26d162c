"""`kvckpt ls` and friends print checkpoint names as the characters they are, in aligned columns."""

from __future__ import annotations

import re
from urllib.parse import quote

import pytest
import torch

import kvckpt
from kvckpt.humanize import display_width
from tests.harness.servers import RedisServer
from tests.test_cli import kvckpt_cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: Lightning's file name, wide East Asian characters, a combining accent, a terminal escape.
NAMES = ["epoch=1-step=30.ckpt", "步骤/检查点", "e\u0301tape", "bell\x1b[31m"]


def test_display_width_counts_terminal_columns() -> None:
    assert [display_width(t) for t in ["abc", "步骤", "e\u0301", ""]] == [3, 4, 1, 0]


def test_ls_prints_names_as_they_are_in_aligned_columns(redis_server: RedisServer, namespace: str) -> None:
    for step, name in enumerate(NAMES):
        url = redis_server.url(f"{namespace}/{quote(name, safe='/')}")
        kvckpt.save({"w": torch.ones(2)}, url, step=step)
    listed = kvckpt_cli("ls", redis_server.url(namespace))
    assert listed.returncode == 0, listed.stderr
    assert "\x1b" not in listed.stdout and "bell\\x1b[31m" in listed.stdout  # escaped, not obeyed
    assert "%" not in listed.stdout
    prefix = f"redis://127.0.0.1:{redis_server.port}/0/{namespace}/"
    for name in NAMES[:3]:
        assert prefix + name in listed.stdout
    lines = listed.stdout.splitlines()
    header, rows = lines[0], lines[1 : 1 + len(NAMES)]
    committed = {display_width(header[: header.index("COMMITTED")])}
    for row in rows:
        when = re.search(r"\d{4}-\d\d-\d\d \d\d:", row)
        assert when is not None, row
        committed.add(display_width(row[: when.start()]))
    assert len(committed) == 1, listed.stdout  # every row's COMMITTED starts in the same column
    assert lines[1 + len(NAMES)].endswith(f"latest: {prefix}bell\\x1b[31m")

    info = kvckpt_cli("info", redis_server.url(f"{namespace}/{quote(NAMES[0])}"))
    assert info.returncode == 0 and f"checkpoint  {prefix}{NAMES[0]}\n" in info.stdout
    verify = kvckpt_cli("verify", redis_server.url(f"{namespace}/{quote(NAMES[1], safe='/')}"))
    assert verify.returncode == 0 and f"ok: {prefix}{NAMES[1]}: 1 key(s)" in verify.stdout
    kept = kvckpt_cli("keep-last", "--dry-run", redis_server.url(namespace), "3")
    assert kept.returncode == 0 and f"would remove {prefix}{NAMES[0]} (" in kept.stdout
