"""``kvckpt server``'s private redis-server: which binary, what it says about it, and bad settings."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from kvckpt.cli.local_server import (
    RedisServer,
    ServerStartError,
    allocator_of,
    allocator_of_version,
    find_binary,
    free_port,
    pick_redis_server,
)
from tests.test_cli import kvckpt_background, kvckpt_cli, one_error_line


def test_a_jemalloc_build_is_preferred_over_an_earlier_libc_one() -> None:
    allocators = {"/a/redis-server": "libc", "/b/redis-server": "jemalloc-5.3.0"}
    assert pick_redis_server(list(allocators), allocators.__getitem__) == "/b/redis-server"
    assert pick_redis_server(["/a/redis-server"], allocators.__getitem__) == "/a/redis-server"


def test_the_allocator_is_read_from_the_version_line() -> None:
    line = "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=1"
    assert allocator_of_version(line) == "jemalloc-5.3.0"
    assert allocator_of_version("Redis server v=6.2.14 sha=40305114:0 malloc=libc bits=64") == "libc"
    binary = find_binary("redis-server")
    with RedisServer(binary=binary) as server:  # the binary says what the running server reports
        assert allocator_of(binary) == server.allocator() != ""


def test_server_prints_the_allocator_it_really_runs() -> None:
    port = free_port()
    proc = kvckpt_background("server", "--port", str(port))
    try:
        assert proc.stdout is not None
        lines = []
        for line in iter(proc.stdout.readline, ""):
            lines.append(line)
            if line.startswith("use: "):
                break
        running = RedisServer(port=port).allocator()  # INFO memory of the server it started
        (note,) = [line for line in lines if "allocator" in line]
        assert note.startswith(f"allocator: {running}")
        if not running.startswith("jemalloc"):
            assert "keep freed pages mapped" not in "".join(lines)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_a_bad_maxmemory_shows_redis_servers_own_error() -> None:
    result = kvckpt_cli("server", "--port", str(free_port()), "--maxmemory", "garbage")
    assert result.returncode == 1
    line = one_error_line(result)
    assert "maxmemory" in line and "argument must be a memory value" in line


def test_a_server_that_exits_while_starting_is_reported_at_once(tmp_path: Path) -> None:
    server = RedisServer(settings={"maxmemory": "garbage"}, tmpdir=str(tmp_path / "srv"))
    os.makedirs(server.tmpdir)
    with pytest.raises(ServerStartError, match="argument must be a memory value"):
        server.start()
    assert server.process is None


@pytest.mark.parametrize("port", ["70000", "0", "http"])
def test_a_port_out_of_range_is_a_usage_error(port: str) -> None:
    result = kvckpt_cli("server", "--port", port)
    assert result.returncode == 2
    assert "usage:" in result.stderr and "--port" in result.stderr and "Traceback" not in result.stderr
