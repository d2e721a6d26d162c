"""Readers of a server that bypass kvckpt's stores, for the conformance suite's ``raw`` hooks."""

from __future__ import annotations

import base64
import json
import subprocess
from dataclasses import dataclass
from typing import Any

from kvckpt.cli.local_server import find_binary
from tests.harness.tls import TLSFiles


@dataclass
class RedisRaw:
    """Through any redis-py-compatible client (redis.Redis, RedisCluster, fakeredis)."""

    client: Any

    def get(self, key: str) -> bytes | None:
        value: bytes | None = self.client.get(key.encode())
        return value

    def ttl(self, key: str) -> float | None:
        ms = int(self.client.pttl(key.encode()))
        return None if ms < 0 else ms / 1000


@dataclass
class EtcdRaw:
    """Through etcdctl, etcd's own command-line client."""

    endpoint: str
    tls: TLSFiles | None = None

    def _run(self, *args: str) -> Any:
        command = [find_binary("etcdctl"), f"--endpoints={self.endpoint}", "-w", "json"]
        if self.tls is not None:
            tls = self.tls
            command += [f"--cacert={tls.ca}", f"--cert={tls.client_cert}", f"--key={tls.client_key}"]
        done = subprocess.run([*command, *args], capture_output=True, check=True, timeout=30)
        return json.loads(done.stdout)

    def _kv(self, key: str) -> dict[str, Any] | None:
        kvs = self._run("get", "--", key).get("kvs") or []
        return kvs[0] if kvs else None

    def get(self, key: str) -> bytes | None:
        kv = self._kv(key)
        return None if kv is None else base64.b64decode(kv.get("value", ""))

    def ttl(self, key: str) -> float | None:
        kv = self._kv(key)
        lease = int(kv.get("lease", 0)) if kv else 0
        if not lease:
            return None
        return float(self._run("lease", "timetolive", f"{lease:x}")["ttl"])
