"""The URL contract: forms, defaults, errors that say what to write, and redaction."""

from __future__ import annotations

import pytest

from kvckpt.errors import InvalidCheckpointIdError
from kvckpt.registry import parse_url
from kvckpt.urls import redact


def test_redis_tcp_form() -> None:
    url = parse_url("redis://alice:s3cr%40t@cache.local:6380/2/runs/exp1/step-100")
    assert (url.scheme, url.hosts, url.db, url.namespace) == (
        "redis",
        (("cache.local", 6380),),
        2,
        "runs/exp1/step-100",
    )
    assert (url.username, url.password) == ("alice", "s3cr@t")
    assert "s3cr" not in str(url) and "s3cr" not in repr(url)
    assert str(url) == "redis://alice:***@cache.local:6380/2/runs/exp1/step-100"


def test_defaults_and_percent_encoding() -> None:
    url = parse_url("rediss://h/0/a%20b%3Fc")
    assert (url.hosts, url.namespace) == ((("h", 6379),), "a b?c")
    assert parse_url(url.to_url(redact=False)) == url


def test_unix_form() -> None:
    url = parse_url("redis+unix:///run/redis/redis.sock?db=3&namespace=run1/step2")
    assert (url.socket_path, url.db, url.namespace) == ("/run/redis/redis.sock", 3, "run1/step2")
    assert parse_url(url.to_url(redact=False)) == url


def test_cluster_and_etcd_host_lists() -> None:
    url = parse_url("redis+cluster://a:7000,b:7001,[::1]:7002/ns")
    assert url.hosts == (("a", 7000), ("b", 7001), ("::1", 7002))
    assert parse_url("etcd://e1,e2:2380/x/y").hosts == (("e1", 2379), ("e2", 2380))


def test_same_server_different_namespace() -> None:
    assert parse_url("redis://h:1/0/a").server == parse_url("redis://h:1/0/b").server
    assert parse_url("redis://h:1/0/a").server != parse_url("redis://h:1/1/a").server


@pytest.mark.parametrize(
    ("url", "hint"),
    [
        ("redis://h:1/ns", "database must be a small integer"),
        ("redis://h:1/0", "missing database number|missing NAMESPACE"),
        ("redis://h:1/0/", "missing NAMESPACE"),
        ("redis://h:1/0/a//b", "empty path segment"),
        ("redis:///0/ns", "missing host"),
        ("redis://h:99999/0/ns", "out of range"),
        ("redis+unix://relative.sock?namespace=x", "absolute"),
        ("redis+unix:///s.sock", "missing NAMESPACE"),
        ("memcached://h/0/ns", "unknown scheme"),
        ("/tmp/checkpoint", "not a kvckpt URL"),
    ],
)
def test_bad_urls_say_what_to_write(url: str, hint: str) -> None:
    with pytest.raises(InvalidCheckpointIdError, match=hint):
        parse_url(url)


def test_password_never_in_error_text() -> None:
    with pytest.raises(InvalidCheckpointIdError) as info:
        parse_url("redis://bob:hunter2@h:1/notanumber/ns")
    assert "hunter2" not in str(info.value)


def test_redact_free_text() -> None:
    text = "failed on redis://u:pa55@h:1/0/x and etcd://:p@e:2379/y"
    assert redact(text) == "failed on redis://u:***@h:1/0/x and etcd://:***@e:2379/y"


def test_unencoded_question_mark_in_namespace_is_refused_not_truncated() -> None:
    from kvckpt.registry import open_store

    with pytest.raises(InvalidCheckpointIdError, match="%3F"):
        open_store("redis://127.0.0.1:1/0/run?1")
    assert parse_url("redis://127.0.0.1:1/0/run%3F1").namespace == "run?1"


@pytest.mark.parametrize(
    ("url", "fixed"),
    [
        ("redis+cluster://127.0.0.1:7000/run6/j?db=1", "redis+cluster://127.0.0.1:7000/run6/j"),
        (
            "redis+cluster://:pw@a:7000,b:7001/run6/j?db=0&tls=true",
            "redis+cluster://:***@a:7000,b:7001/run6/j?tls=true",
        ),
        ("etcd://e1:2379/ns?db=1", "etcd://e1:2379/ns"),
        ("etcd://e1:2379?namespace=run/1", "etcd://e1:2379/run/1"),
        ("etcd://e1:2379/ns?db=2&namespace=other", "etcd://e1:2379/ns"),
    ],
)
def test_db_and_namespace_options_are_refused_where_there_are_none(url: str, fixed: str) -> None:
    """A Cluster has only database 0 and etcd none: a silently ignored db= would save elsewhere."""
    with pytest.raises(InvalidCheckpointIdError) as refused:
        parse_url(url)
    message = str(refused.value)
    assert message.endswith(f"; write {fixed}")
    assert "takes no" in message and "the namespace is the URL's path" in message
    assert "pw" not in message


@pytest.mark.parametrize("query", ["?db=3", "?namespace=other", "?db=1&namespace=x"])
def test_a_redis_url_takes_db_and_namespace_from_its_path_only(query: str) -> None:
    """``redis://h/0/ns?db=3`` would otherwise save to database 0 while the user meant 3."""
    for scheme in ("redis", "rediss"):
        with pytest.raises(
            InvalidCheckpointIdError, match=r"from the path.*write .*://host:port/DB/NAMESPACE"
        ) as info:
            parse_url(f"{scheme}://u:pw@127.0.0.1:6379/0/ns{query}")
        assert "pw" not in str(info.value)
    assert parse_url("redis+unix:///run/r.sock?db=3&namespace=ns").db == 3  # the socket form's own options
