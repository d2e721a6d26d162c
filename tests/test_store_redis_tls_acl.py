"""RedisStore over TLS with client certificates (``rediss://…?ca=&cert=&key=``) as an ACL user.

Passwords never show in repr, str, exception text or logs.
"""

from __future__ import annotations

import logging
import pickle
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kvckpt.errors import InvalidCheckpointIdError, StoreUnavailableError
from kvckpt.registry import open_store, parse_url
from kvckpt.store import Commit, KVStore, RangeRead
from kvckpt.stores.redis.commands import ACL_RULES
from kvckpt.stores.redis.options import PASSWORD_ENV
from kvckpt.stores.redis.standalone import RedisStore
from kvckpt.testing.conformance import StoreTests
from tests.harness.raw import RedisRaw
from tests.harness.servers import RedisTLSServer, make_tls_files

USER = "ckpt-writer"
PASSWORD = "Pw-9f2c!kvckpt-secret"  # distinctive, so a leak anywhere is easy to grep for


@pytest.fixture(scope="module")
def tls_server(redis_tls_server: RedisTLSServer) -> RedisTLSServer:
    """The session TLS server with an ACL user that may do everything but @dangerous (CONFIG, KEYS...)."""
    admin = redis_tls_server.admin()
    admin.execute_command(
        "ACL", "SETUSER", USER, "reset", "on", f">{PASSWORD}", "~*", "&*", "+@all", "-@dangerous"
    )
    admin.close()
    return redis_tls_server


class TestRedisTLSAsACLUser(StoreTests):
    @pytest.fixture
    def raw(self, tls_server: RedisTLSServer) -> RedisRaw:
        return RedisRaw(redis.Redis(unix_socket_path=tls_server.socket_path))

    @pytest.fixture
    def store(self, tls_server: RedisTLSServer) -> Iterator[KVStore]:
        store = open_store(tls_server.url("conformance", user=f"{USER}:{PASSWORD}"))
        yield store
        store.close()


def assert_secret_absent(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text


def test_store_and_url_never_show_the_password(tls_server: RedisTLSServer) -> None:
    url = parse_url(tls_server.url("ns", user=f"{USER}:{PASSWORD}"))
    store = RedisStore.from_url(url)
    assert_secret_absent(repr(store), str(store.description), str(url), repr(url), url.to_url())
    assert f"{USER}:***@" in str(url)


def test_wrong_password_is_unavailable_and_secret(
    tls_server: RedisTLSServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = PASSWORD[::-1]
    store = open_store(tls_server.url("ns", user=f"{USER}:{wrong}"))
    with pytest.raises(StoreUnavailableError, match="authentication failed") as info:
        store.put("k", b"v")
    texts = [
        "".join(traceback.format_exception(info.value)),  # with the chained redis-py errors
        repr(info.value),
        str(pickle.loads(pickle.dumps(info.value))),
        caplog.text,
    ]
    assert not [t for t in texts if PASSWORD in t or wrong in t]


def test_logs_of_a_working_session_hold_no_password(
    tls_server: RedisTLSServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    store = open_store(tls_server.url("ns", user=f"{USER}:{PASSWORD}"))
    store.put_many([("ns/a", b"1")])
    assert store.get("ns/a") == b"1"
    assert store.check_server_settings() == {}  # CONFIG is @dangerous: skipped, not an error
    assert "cannot read maxmemory-policy (NoPermissionError)" in caplog.text
    store.close()
    assert_secret_absent(caplog.text)


def test_password_from_option_and_env(tls_server: RedisTLSServer, monkeypatch: pytest.MonkeyPatch) -> None:
    url = tls_server.url("ns", user=USER)  # user only: the password comes from elsewhere
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    assert open_store(url).put("ns/env", b"1")
    monkeypatch.setenv(PASSWORD_ENV, "not-it")
    assert open_store(url, password=PASSWORD).get("ns/env") == b"1"  # the option wins over the env
    with pytest.raises(StoreUnavailableError, match="authentication failed"):
        open_store(url).get("ns/env")


def test_client_certificate_required(tls_server: RedisTLSServer) -> None:
    store = open_store(tls_server.url("ns", user=f"{USER}:{PASSWORD}", client_cert=False))
    with pytest.raises(StoreUnavailableError):
        store.get("k")


def test_server_certificate_from_another_ca_is_refused(tls_server: RedisTLSServer, tmp_path: Path) -> None:
    assert tls_server.tls is not None
    other_ca = make_tls_files(tmp_path).ca
    url = tls_server.url("ns", user=f"{USER}:{PASSWORD}").replace(tls_server.tls.ca, other_ca)
    with pytest.raises(StoreUnavailableError):
        open_store(url).get("k")


def test_tls_options_by_keyword(tls_server: RedisTLSServer) -> None:
    """redis-py's own ssl_* keywords pass through from_url(**client_kwargs)."""
    assert tls_server.tls is not None
    url = f"rediss://{USER}@127.0.0.1:{tls_server.port}/0/ns"
    store = open_store(
        url,
        password=PASSWORD,
        ssl_ca_certs=tls_server.tls.ca,
        ssl_certfile=tls_server.tls.client_cert,
        ssl_keyfile=tls_server.tls.client_key,
    )
    assert store.put("ns/kw", b"ok") and store.get("ns/kw") == b"ok"


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0/ns?ca=/etc/ca.pem",
        "redis+cluster://127.0.0.1:7000/ns?cert=/c.pem&key=/k.pem",
        "redis+unix:///run/redis.sock?db=0&namespace=ns&tls=true",
    ],
)
def test_tls_options_without_tls_are_refused(url: str) -> None:
    with pytest.raises(InvalidCheckpointIdError):
        open_store(url)


def test_least_privilege_acl_user_can_do_everything_the_store_needs(tls_server: RedisTLSServer) -> None:
    """The documented ACL_RULES, keys limited to the namespace, are enough for every store method."""
    admin = tls_server.admin()
    admin.execute_command(
        "ACL", "SETUSER", "ckpt-min", "reset", "on", ">min-pw", "~least/*", "-@all", *ACL_RULES
    )
    admin.close()
    store = open_store(tls_server.url("least", user="ckpt-min:min-pw"))
    store.put_many([("least/a", b"12345")], ttl=30)
    assert store.get_many(["least/a", "least/b"]) == [b"12345", None]
    assert store.value_sizes(["least/a", "least/b"]) == [5, 0]
    into = bytearray(2)
    assert store.read_into_many([RangeRead("least/a", 1, memoryview(into))]) == [2] and into == b"23"
    assert store.expire_many(["least/a"], None) == [True] and store.expire_many(["least/a"], 30) == [True]
    assert store.put("least/rec", b"1", create=True) and store.swap("least/rec", b"2") == b"1"
    store.put("least/.live/g", b"alive", ttl=30)
    assert store.commit("least/rec", b"3", live_key="least/.live/g", create=False) == Commit(True, True, b"2")
    assert store.clock("least/rec") > 0
    assert sorted(store.scan_prefix("least/")) == ["least/a", "least/rec"]
    assert store.delete_prefix("least/") == 2
    assert store.wait_for_replicas(0, 1.0) == 0
    assert isinstance(store, RedisStore)
    assert store.check_server_settings() == {store.description: "noeviction"}
