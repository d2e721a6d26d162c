"""The kvckpt command, run as a subprocess (python -m kvckpt) against real redis-servers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
import torch.distributed.checkpoint as dcp

import kvckpt
from kvckpt import humanize
from tests.harness.servers import REDIS_KEEP_FREED_MEMORY_ENV, RedisServer, find_binary, free_port

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "cli-s3cret"


def kvckpt_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "kvckpt", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def kvckpt_background(*args: str, path: str | None = None) -> subprocess.Popen[str]:
    """``kvckpt ARGS`` left running (``server``), its output piped; ``path`` goes first on PATH."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if path is not None:
        env["PATH"] = f"{path}{os.pathsep}{os.environ['PATH']}"
    return subprocess.Popen(
        [sys.executable, "-m", "kvckpt", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvckpt: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def auth_server() -> Iterator[RedisServer]:
    with RedisServer(extra_args=["--requirepass", PASSWORD]) as server:
        yield server


@pytest.fixture
def run_prefix(auth_server: RedisServer, namespace: str) -> str:
    """A prefix with the password in the URL and three committed checkpoints under it."""
    prefix = f"redis://:{PASSWORD}@127.0.0.1:{auth_server.port}/0/{namespace}"
    for step in (1, 2, 3):
        state = {"model": {"w": torch.full((256, 64), float(step)), "b": torch.zeros(64)}, "step": step}
        kvckpt.save(state, f"{prefix}/step{step}", chunk_bytes=20_000)
    return prefix


def test_ls_info_verify_human_and_json(run_prefix: str) -> None:
    listed = kvckpt_cli("ls", run_prefix)
    assert listed.returncode == 0, listed.stderr
    infos = kvckpt.list_checkpoints(run_prefix)
    assert "CHECKPOINT" in listed.stdout and humanize.size(infos[0].total_bytes) in listed.stdout
    total = humanize.size(sum(i.total_bytes for i in infos))
    assert f"3 checkpoint(s), {total}; latest: {infos[-1].display_id}" in listed.stdout
    rows = json.loads(kvckpt_cli("ls", run_prefix, "--json").stdout)
    assert [r["namespace"].rsplit("/", 1)[1] for r in rows] == ["step1", "step2", "step3"]
    assert rows[0]["num_tensors"] == 2 and rows[0]["world_size"] == 1 and rows[0]["expires_at"] is None

    info = kvckpt_cli("info", f"{run_prefix}/step2")
    assert info.returncode == 0, info.stderr
    assert "model.w  float32   256x64" in info.stdout and "total" in info.stdout
    entries = json.loads(kvckpt_cli("info", "--json", f"{run_prefix}/step2").stdout)["entries"]
    assert {e["fqn"]: e["chunks"] for e in entries} == {"model.w": 4, "model.b": 1, "step": 1}

    verified = kvckpt_cli("verify", f"{run_prefix}/step2")
    assert verified.returncode == 0 and verified.stdout.startswith("ok: ")
    verified_json = json.loads(kvckpt_cli("verify", "--json", f"{run_prefix}/step2").stdout)
    assert verified_json["num_keys"] == 5  # 4 chunks of "model.w"; "model.b" and "step" share a pack

    for result in (listed, info, verified):
        assert PASSWORD not in result.stdout + result.stderr and ":***@" in result.stdout


def test_verify_failure_exit_code_and_problems(
    run_prefix: str, auth_server: RedisServer, namespace: str
) -> None:
    raw = redis.Redis(port=auth_server.port, password=PASSWORD)
    victim = next(k for k in raw.scan_iter(match=f"{namespace}/step1/g*"))
    raw.setrange(victim, 10, b"\xff\xff")
    raw.close()
    result = kvckpt_cli("verify", f"{run_prefix}/step1")
    assert result.returncode == 1
    assert "checksum mismatch" in result.stderr and victim.decode() in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("kvckpt: error: ")
    report = json.loads(kvckpt_cli("verify", "--json", f"{run_prefix}/step1").stdout)
    assert report["ok"] is False and len(report["problems"]) == 1
    assert PASSWORD not in result.stdout + result.stderr


def test_rm_and_keep_last(run_prefix: str) -> None:
    dry = kvckpt_cli("keep-last", run_prefix, "1", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.count("would remove redis://") == 2
    assert len(kvckpt.list_checkpoints(run_prefix)) == 3
    pruned = json.loads(kvckpt_cli("keep-last", "--json", run_prefix, "2").stdout)
    assert [r["namespace"].rsplit("/", 1)[1] for r in pruned["removed"]] == ["step1"]

    removed = kvckpt_cli("rm", f"{run_prefix}/step2")
    assert removed.returncode == 0 and removed.stdout.startswith("removed redis://:***@")
    again = kvckpt_cli("rm", f"{run_prefix}/step2")
    assert again.returncode == 1 and "no committed checkpoint" in one_error_line(again)
    assert [i.namespace.rsplit("/", 1)[1] for i in kvckpt.list_checkpoints(run_prefix)] == ["step3"]
    assert PASSWORD not in removed.stdout + again.stderr + dry.stdout


def test_cp_to_a_folder_and_back(run_prefix: str, tmp_path: Path) -> None:
    exported = kvckpt_cli("cp", f"{run_prefix}/step3", str(tmp_path / "out"))
    assert exported.returncode == 0, exported.stderr
    assert "copied redis://:***@" in exported.stdout and PASSWORD not in exported.stdout + exported.stderr
    state: dict[str, Any] = {"model": {"w": torch.zeros(256, 64), "b": torch.ones(64)}, "step": 0}
    dcp.load(state, storage_reader=dcp.FileSystemReader(tmp_path / "out"))
    assert torch.equal(state["model"]["w"], torch.full((256, 64), 3.0)) and state["step"] == 3

    back = json.loads(kvckpt_cli("cp", "--json", str(tmp_path / "out"), f"{run_prefix}/copy").stdout)
    assert (
        back["items"] == 3 and back["destination"].endswith("/copy") and PASSWORD not in back["destination"]
    )


def test_failures_are_one_line_and_debug_shows_the_traceback(namespace: str) -> None:
    dead = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0/{namespace}"
    result = kvckpt_cli("ls", dead)
    assert result.returncode == 1 and "cannot reach Redis" in one_error_line(result)
    assert PASSWORD not in result.stdout + result.stderr

    debug = kvckpt_cli("ls", "--debug", dead)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "StoreUnavailableError" in debug.stderr
    assert PASSWORD not in debug.stderr

    bad_url = kvckpt_cli("info", "http://example/x")
    assert bad_url.returncode == 1 and "unknown scheme 'http'" in one_error_line(bad_url)
    assert "redis://[user[:password]@]host" in bad_url.stderr  # usage text intact after redaction


def test_missing_checkpoint_and_wrong_password(auth_server: RedisServer, namespace: str) -> None:
    missing = kvckpt_cli("info", f"redis://:{PASSWORD}@127.0.0.1:{auth_server.port}/0/{namespace}/none")
    assert missing.returncode == 1 and "no committed checkpoint" in one_error_line(missing)
    wrong = kvckpt_cli("ls", f"redis://:not-{PASSWORD}@127.0.0.1:{auth_server.port}/0/{namespace}")
    assert wrong.returncode == 1 and "authentication failed" in one_error_line(wrong)
    assert PASSWORD not in wrong.stderr + missing.stderr


@pytest.mark.parametrize(
    "args",
    [[], ["frobnicate"], ["keep-last", "redis://h/0/x", "-1"], ["keep-last", "redis://h/0/x"], ["ls"]],
    ids=["no-command", "unknown-command", "negative-n", "missing-n", "missing-prefix"],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = kvckpt_cli(*args)
    assert result.returncode == 2 and "usage: kvckpt" in result.stderr


def test_console_script_entry_point_is_the_cli() -> None:
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "kvckpt"]
    assert script.value == "kvckpt.cli.main:main"
    from kvckpt.cli.main import main

    assert script.load() is main


def test_demo_on_a_private_server() -> None:
    result = kvckpt_cli("demo", "--steps", "8", "--every", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "private redis-server" in out and "kvckpt.latest() -> redis+unix://" in out
    assert "step-000006" in out and "resuming at step 7" in out
    assert out.count("same as the uninterrupted run") == 2  # steps 7 and 8
    assert "bit for bit" in out and "stopped" in out


def test_demo_against_a_given_store(redis_server: RedisServer, namespace: str) -> None:
    """In-process (the subprocess test above covers the command line): --url keeps its checkpoints."""
    from kvckpt.cli.demo import run_demo

    said: list[str] = []
    assert run_demo(redis_server.url(namespace), steps=6, every=2, keep=1, say=said.append) is True
    assert "kvckpt ls redis://" in said[-1]
    (kept,) = kvckpt.list_checkpoints(redis_server.url(namespace))
    assert kept.namespace.startswith(f"{namespace}/kvckpt-demo-") and kept.namespace.endswith("/step-000004")


def test_server_runs_in_the_foreground_until_stopped(tmp_path: Path) -> None:
    port = free_port()
    # A redis-server first on PATH that records its environment (redis-server itself overwrites its
    # /proc/PID/environ with the process title), then runs the real one.
    wrapper = tmp_path / "redis-server"
    wrapper.write_text(f'#!/bin/sh\nenv > "{tmp_path}/env.txt"\nexec "{find_binary("redis-server")}" "$@"\n')
    wrapper.chmod(0o755)
    proc = kvckpt_background(
        "server", "--port", str(port), "--redis-server", str(wrapper), path=str(tmp_path)
    )
    try:
        assert proc.stdout is not None
        url_line = next(line for line in iter(proc.stdout.readline, "") if line.startswith("use: "))
        url = url_line.split("use: ", 1)[1].strip().replace("NAMESPACE", "srv/step1")
        kvckpt.save({"x": torch.ones(3)}, url)
        assert [i.namespace for i in kvckpt.list_checkpoints(url.rsplit("/", 1)[0])] == ["srv/step1"]
        raw = redis.Redis(port=port)
        assert raw.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert raw.config_get("appendonly") == {"appendonly": "no"}
        environ = (tmp_path / "env.txt").read_text().splitlines()
        for variable, value in REDIS_KEEP_FREED_MEMORY_ENV.items():
            assert f"{variable}={value}" in environ
        raw.close()

        busy = kvckpt_cli("server", "--port", str(port))
        assert busy.returncode == 1 and "in use" in one_error_line(busy)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    with pytest.raises(ConnectionRefusedError):  # the redis-server went with it
        socket.create_connection(("127.0.0.1", port), timeout=1)


def run_on_terminal(*args: str) -> bytes:
    """Run the command with stdout and stderr on a 100-column pseudo-terminal; return what it drew."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvckpt", *args], cwd=ROOT, env=env, stdout=follower, stderr=follower
    )
    proc.wait(60)
    os.close(follower)
    drawn = b""
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the terminal closed: everything has been read
            break
        if not data:
            break
        drawn += data
    os.close(leader)
    assert proc.returncode == 0, drawn
    return drawn


def test_progress_bar_only_on_a_terminal(redis_server: RedisServer, namespace: str) -> None:
    kvckpt.save({"w": torch.zeros(1 << 20)}, redis_server.url(namespace), chunk_bytes=1 << 20)
    drawn = run_on_terminal("verify", redis_server.url(namespace))
    # A total, an ETA, and the units of the summary line (binary sizes, decimal rates)
    assert b"verify: " in drawn and b" / 4.0 MiB " in drawn and b", ETA " in drawn and b" MB/s" in drawn
    assert b"4.0 MiB verified" in drawn
    assert b"verify:" not in run_on_terminal("verify", "--json", redis_server.url(namespace))
    assert "verify:" not in kvckpt_cli("verify", redis_server.url(namespace)).stderr


def test_management_commands_do_not_import_torch() -> None:
    """ls/info/verify/rm/keep-last must start fast: only cp and demo may pull in torch."""
    code = "import sys, kvckpt, kvckpt.cli.main, kvckpt.management.api; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_version() -> None:
    result = kvckpt_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"kvckpt {kvckpt.__version__}"


def test_info_into_head_exits_quietly(redis_server: RedisServer, namespace: str) -> None:
    """More output than a pipe holds, read by `head -1`: no BrokenPipeError traceback."""
    url = redis_server.url(namespace)
    kvckpt.save({f"layer{n:04d}.weight": torch.zeros(1) for n in range(3000)}, url)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        f"{sys.executable} -m kvckpt info '{url}' | head -1; echo \"status ${{PIPESTATUS[0]}}\"",
        shell=True,
        executable="/bin/bash",
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stderr == ""
    assert result.stdout.splitlines() == [f"checkpoint  {url}", "status 141"]


def test_unicode_namespaces_print_decoded(redis_server: RedisServer, namespace: str) -> None:
    from urllib.parse import quote

    url = redis_server.url(quote(f"{namespace}/étape-ü/步", safe="/"))
    kvckpt.save({"w": torch.ones(2)}, url)
    listed = kvckpt_cli("ls", redis_server.url(namespace))
    assert f"{namespace}/étape-ü/步" in listed.stdout and "%C3" not in listed.stdout
    info = kvckpt_cli("info", url)
    assert info.returncode == 0 and f"checkpoint  {redis_server.url(namespace)}/étape-ü/步" in info.stdout


def test_cp_to_a_folder_follows_the_umask(redis_server: RedisServer, namespace: str, tmp_path: Path) -> None:
    url = redis_server.url(namespace)
    kvckpt.save({"w": torch.ones(2)}, url)
    previous = os.umask(0o027)
    try:
        kvckpt.copy(url, tmp_path / "out" / "step1")
    finally:
        os.umask(previous)
    assert (tmp_path / "out" / "step1").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750


def test_ctrl_c_during_cp_exits_130_and_commits_nothing(redis_server: RedisServer, namespace: str) -> None:
    """The copy's reads are held by a proxy; Ctrl-C arrives meanwhile, then the reads are let go."""
    from tests.harness.proxy import FaultProxy

    kvckpt.save({"w": torch.ones(1 << 16)}, redis_server.url(f"{namespace}/src"), chunk_bytes=1 << 14)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    with FaultProxy(redis_server.port) as proxy:
        src = f"redis://127.0.0.1:{proxy.port}/0/{namespace}/src"
        proxy.hold_on(f"{namespace}/src/g".encode(), times=1)  # the first read of the data
        process = subprocess.Popen(
            [sys.executable, "-m", "kvckpt", "cp", src, redis_server.url(f"{namespace}/dst")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        proxy.wait_for(lambda: proxy.held() == 1, what="a held read")
        process.send_signal(signal.SIGINT)
        proxy.release()
        out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.strip() == "kvckpt: interrupted" and out == ""
    assert kvckpt.list_checkpoints(redis_server.url(f"{namespace}/dst")) == []
    assert kvckpt.list_orphans(redis_server.url(namespace)) == []
