"""Redis beyond one node: a throw-away Cluster (failover, slot migration) and a primary + replica pair."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

from kvckpt.cli.local_server import REDIS_CHECKPOINT_SETTINGS, RedisServer, find_binary, free_port, wait_until
from tests.harness.base import Throwaway, _info, redis_call


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
