"""The test harness's TLS proxy behaves like a redis-server speaking TLS with ``tls-auth-clients yes``.

The TLS tests run through it on every machine, so it must carry large values both ways, serve
several clients at once, refuse what the real server refuses, and end connections cleanly.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.harness.servers import RedisServer, TLSFiles, make_tls_files
from tests.harness.tls_proxy import TLSProxy


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls-proxy"))


@pytest.fixture
def proxy(redis_server: RedisServer, tls_files: TLSFiles) -> Iterator[TLSProxy]:
    with TLSProxy(redis_server.socket_path, tls_files) as started:
        yield started


def tls_client(proxy: TLSProxy, files: TLSFiles, *, cert: bool = True, **options: Any) -> Any:
    certificate: dict[str, Any] = (
        {"ssl_certfile": files.client_cert, "ssl_keyfile": files.client_key} if cert else {}
    )
    return redis.Redis(
        host="127.0.0.1",
        port=proxy.port,
        ssl=True,
        ssl_ca_certs=files.ca,
        socket_timeout=30,
        **certificate,
        **options,
    )


def test_large_values_pass_both_ways(proxy: TLSProxy, tls_files: TLSFiles, namespace: str) -> None:
    value = bytes(range(256)) * (24 << 12)  # 24 MiB, every byte value
    client = tls_client(proxy, tls_files)
    assert client.set(f"{namespace}/big", value)
    assert client.get(f"{namespace}/big") == value
    assert (
        client.getrange(f"{namespace}/big", (7 << 20) + 3, (9 << 20) + 2)
        == value[(7 << 20) + 3 : (9 << 20) + 3]
    )
    client.close()


def test_clients_are_served_concurrently(proxy: TLSProxy, tls_files: TLSFiles, namespace: str) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        client = tls_client(proxy, tls_files)
        try:
            for i in range(20):
                payload = bytes([n]) * (100_000 + i)
                client.set(f"{namespace}/{n}/{i}", payload)
                assert client.get(f"{namespace}/{n}/{i}") == payload
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and proxy.sessions >= 4


def test_a_client_without_a_certificate_is_refused(
    proxy: TLSProxy, tls_files: TLSFiles, redis_server: RedisServer, namespace: str
) -> None:
    client = tls_client(proxy, tls_files, cert=False)
    with pytest.raises(redis.ConnectionError):
        client.set(f"{namespace}/nocert", b"1")
    assert redis.Redis(unix_socket_path=redis_server.socket_path).exists(f"{namespace}/nocert") == 0


def test_a_certificate_from_another_ca_is_refused(
    proxy: TLSProxy, tls_files: TLSFiles, tmp_path: Path, namespace: str
) -> None:
    other = make_tls_files(tmp_path)
    client = redis.Redis(
        host="127.0.0.1",
        port=proxy.port,
        ssl=True,
        ssl_ca_certs=tls_files.ca,  # trusts the proxy, but presents a certificate it does not trust
        ssl_certfile=other.client_cert,
        ssl_keyfile=other.client_key,
        socket_timeout=30,
    )
    with pytest.raises(redis.ConnectionError):
        client.ping()


def test_plain_text_gets_no_reply(proxy: TLSProxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as raw:
        raw.sendall(b"PING\r\n")
        received = b""
        while chunk := raw.recv(4096):
            received += chunk
    assert b"PONG" not in received  # at most a TLS alert, then the connection closes


def test_the_server_closing_a_connection_reaches_the_client(
    proxy: TLSProxy, tls_files: TLSFiles, redis_server: RedisServer
) -> None:
    context = ssl.create_default_context(cafile=tls_files.ca)
    context.load_cert_chain(tls_files.client_cert, tls_files.client_key)
    with (
        socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"CLIENT SETNAME to-kill\r\nCLIENT ID\r\n")
        reply = b""
        while reply.count(b"\r\n") < 2:
            reply += tls.recv(4096)
        assert reply.startswith(b"+OK\r\n:")
        admin: Any = redis.Redis(unix_socket_path=redis_server.socket_path)
        assert admin.execute_command("CLIENT KILL", "ID", int(reply.split(b":")[1].split(b"\r\n")[0])) == 1
        assert tls.recv(4096) == b""  # close_notify, then end of stream


def test_close_ends_every_connection_and_thread(redis_server: RedisServer, tls_files: TLSFiles) -> None:
    proxy = TLSProxy(redis_server.socket_path, tls_files).start()
    clients = [tls_client(proxy, tls_files) for _ in range(3)]
    for client in clients:
        assert client.ping()
    assert proxy.alive_threads() == 4  # the accept loop and one per connection
    proxy.close()
    assert proxy.alive_threads() == 0
    for client in clients:
        with pytest.raises(redis.ConnectionError):
            client.ping()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
