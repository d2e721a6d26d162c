"""Every ```python block of README.md and docs/*.md runs as written, or says why it cannot.

A user pastes a block into a fresh Python and runs it, so each block runs alone, in a new process
(nothing a block before it imported, installed or registered carries over), in an empty working
folder (relative paths land there), against real servers. The text of the block is changed in two
ways only, both mechanical:

- the Redis address the docs write, ``localhost:6379``, ``host:6379`` or ``store:6379``, becomes the
  address of a redis-server started for these tests and emptied before each block;
- ``s3://bucket/`` becomes a fresh bucket on a moto S3 server, whose endpoint and credentials are in
  the block's environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), as a user's would be.

A block that cannot run as written (a fragment of the reader's own code, something that runs until
stopped, another machine's paths) starts with the line ``# not run: <why>``; it is then only checked
for that reason. Anything else in the block is run exactly as the reader sees it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.servers import RedisServer, redis_call
from tests.s3_server import MotoServer

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```(\S*)\s*$")
NOT_RUN = re.compile(r"# not run: (\S.*)$")
REDIS_ADDRESS = re.compile(r"\b(?:localhost|host|store):6379\b")
S3_BUCKET = "s3://bucket/"

#: Seconds one block may take; the slowest (the Lightning one) takes a few.
BLOCK_TIMEOUT = 180


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def not_run_reason(self) -> str | None:
        first = self.code.split("\n", 1)[0]
        marked = NOT_RUN.match(first)
        return marked.group(1).strip() if marked else None


def blocks_of(path: Path) -> Iterator[Block]:
    lines = path.read_text().splitlines()
    opened: tuple[int, str] | None = None
    body: list[str] = []
    for number, line in enumerate(lines, 1):
        fence = FENCE.match(line)
        if opened is None:
            if fence:
                opened, body = (number, fence.group(1)), []
        elif fence and not fence.group(1):
            yield Block(path, opened[0], opened[1], "\n".join(body) + "\n")
            opened = None
        else:
            body.append(line)
    assert opened is None, f"{path.relative_to(ROOT)}:{opened[0]}: a code block is never closed"


ALL_BLOCKS = [block for path in DOCUMENTS for block in blocks_of(path)]
PYTHON_BLOCKS = [block for block in ALL_BLOCKS if block.language == "python"]
RUN_BLOCKS = [block for block in PYTHON_BLOCKS if block.not_run_reason is None]


def test_every_python_block_is_run_or_says_why_not() -> None:
    assert {block.path.name for block in RUN_BLOCKS} >= {"README.md", "integrations.md"}
    misspelt = [b.where for b in ALL_BLOCKS if b.language.lower().startswith("py") and b.language != "python"]
    assert not misspelt, f"write these fences as ```python so they are run: {misspelt}"
    half_marked = [
        block.where
        for block in PYTHON_BLOCKS
        if block.code.lstrip().startswith("# not run") and block.not_run_reason is None
    ]
    assert not half_marked, f"'# not run: <why>' must be the first line and give a reason: {half_marked}"


@pytest.fixture(scope="module")
def docs_redis() -> Iterator[RedisServer]:
    """A redis-server of these tests' own: it is emptied before each block."""
    with RedisServer() as server:
        yield server


def as_run(block: Block, redis_port: int, bucket: str) -> str:
    code = REDIS_ADDRESS.sub(f"127.0.0.1:{redis_port}", block.code)
    return code.replace(S3_BUCKET, f"s3://{bucket}/")


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[block.where for block in RUN_BLOCKS])
def test_block_runs_as_written(
    block: Block, docs_redis: RedisServer, moto_server: MotoServer, tmp_path: Path
) -> None:
    redis_call(docs_redis.port, "FLUSHALL")
    bucket = f"docs-{uuid.uuid4().hex[:12]}"
    if S3_BUCKET in block.code:
        moto_server.create_bucket(bucket)
    script = tmp_path / f"{block.path.stem}_line{block.line}.py"
    script.write_text(as_run(block, docs_redis.port, bucket))
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=work,
        env={**os.environ, **moto_server.environment()},
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"{block.where} failed as written:\n{done.stderr[-4000:]}"
