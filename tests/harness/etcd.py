"""Throw-away etcd members and clusters on free loopback ports."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvckpt.cli.local_server import find_binary, free_port, stop_process, tail_of, wait_until
from tests.harness.base import Throwaway
from tests.harness.tls import TLSFiles


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
