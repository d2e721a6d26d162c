"""docker/*.compose.yml start redis-server with the settings the test servers use.

No Docker engine runs here, so the files are parsed (PyYAML) and each redis-server command line is
checked against REDIS_CHECKPOINT_SETTINGS, then started with the local redis-server to prove it is valid.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.servers import (
    REDIS_CHECKPOINT_SETTINGS,
    REDIS_KEEP_FREED_MEMORY_ENV,
    find_binary,
    free_port_with_bus,
    wait_until,
)

DOCKER = Path(__file__).resolve().parents[1] / "docker"
COMPOSE_FILES = sorted(DOCKER.glob("*.compose.yml"))


def argv_of(value: Any) -> list[str]:
    """A compose command/entrypoint as argv: a string is split like a shell would."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return ["" if v is None else str(v) for v in value]


def redis_server_commands(path: Path) -> Iterator[tuple[str, list[str]]]:
    """(service, arguments after redis-server) for each service that runs redis-server."""
    doc = yaml.safe_load(path.read_text())
    for name, service in (doc.get("services") or {}).items():
        argv = argv_of(service.get("entrypoint")) + argv_of(service.get("command"))
        if len(argv) >= 3 and argv[0] in ("sh", "bash") and argv[1] == "-c":
            argv = shlex.split(argv[2])  # a shell one-liner: look inside it
        for i, token in enumerate(argv):
            if os.path.basename(token) == "redis-server":
                yield name, argv[i + 1 :]
                break


def settings_of(args: list[str]) -> dict[str, str]:
    """``--name v1 v2`` pairs (a leading config-file path is skipped), values joined by spaces."""
    settings: dict[str, list[str]] = {}
    current: list[str] | None = None
    for token in args:
        if token.startswith("--"):
            current = settings.setdefault(token[2:], [])
        elif current is not None:
            current.append(token)
    return {name: " ".join(" ".join(values).split()) for name, values in settings.items()}


def test_compose_files_are_found() -> None:
    names = {p.name for p in COMPOSE_FILES}
    assert {"redis-cluster.compose.yml", "redis-replica.compose.yml"} <= names


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_redis_server_uses_the_checkpoint_settings(path: Path) -> None:
    commands = list(redis_server_commands(path))
    if path.name.startswith("redis"):
        assert commands, f"{path.name} starts no redis-server"
    for service, args in commands:
        settings = settings_of(args)
        for name, want in REDIS_CHECKPOINT_SETTINGS.items():
            got = settings.get(name)
            assert got is not None and got.lower() == want.lower(), (
                f"{path.name} service {service}: --{name} is {got!r}, the test servers use {want!r}"
            )


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's environment, given as a mapping or as KEY=VALUE lines."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(line.split("=", 1) for line in env)
    return {str(k): str(v) for k, v in env.items()}


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_redis_server_keeps_freed_memory(path: Path) -> None:
    services = yaml.safe_load(path.read_text())["services"]
    for name, _ in redis_server_commands(path):
        env = environment_of(services[name])
        for variable, want in REDIS_KEEP_FREED_MEMORY_ENV.items():
            assert env.get(variable) == want, f"{path.name} service {name}: {variable}={env.get(variable)!r}"


def test_cluster_file_runs_six_cluster_nodes_and_joins_them() -> None:
    path = DOCKER / "redis-cluster.compose.yml"
    commands = dict(redis_server_commands(path))
    assert len(commands) == 6
    ports = []
    for args in commands.values():
        settings = settings_of(args)
        assert settings["cluster-enabled"] == "yes"
        ports.append(settings["port"])
    doc = yaml.safe_load(path.read_text())
    create = " ".join(argv_of(doc["services"]["cluster-create"]["command"]))
    assert "--cluster-replicas 1" in create
    assert all(f"127.0.0.1:{port}" in create for port in ports)


def test_replica_file_runs_a_primary_and_its_replica() -> None:
    commands = dict(redis_server_commands(DOCKER / "redis-replica.compose.yml"))
    replicaof = {name: settings_of(args).get("replicaof") for name, args in commands.items()}
    assert replicaof == {"redis-primary": None, "redis-replica": "redis-primary 6379"}


@pytest.mark.parametrize(
    ("path", "service", "args"),
    [(p, s, a) for p in COMPOSE_FILES for s, a in redis_server_commands(p)],
    ids=lambda v: v.name if isinstance(v, Path) else v if isinstance(v, str) else "",
)
def test_redis_server_accepts_the_command_line(path: Path, service: str, args: list[str]) -> None:
    """Start the local redis-server with the service's arguments (port and dir swapped for free ones)."""
    settings = settings_of(args)
    port = free_port_with_bus()  # cluster nodes need port + 10000 free too
    with tempfile.TemporaryDirectory(prefix="kvckpt-compose-") as tmp:
        argv = [find_binary("redis-server"), *args, "--port", str(port), "--dir", tmp, "--bind", "127.0.0.1"]
        if "replicaof" in settings:  # the primary's compose hostname does not resolve here
            argv += ["--replicaof", "no", "one"]
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: process.poll() is not None or _pong(port), 10, f"{path.name} {service}")
        finally:
            exited = process.poll() is not None
            process.kill()
            output = process.communicate()[0].decode(errors="replace")
        assert not exited, f"redis-server refused {path.name} {service}: {output[-600:]}"


def _pong(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")
