"""A password in a checkpoint_id URL never shows in an error, however malformed the URL.

The parser and redaction split the credentials by one rule (kvckpt.urls.split_credentials: they run
to the last '@'), so what one takes for a password the other hides.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from urllib.parse import quote, unquote

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvckpt
from kvckpt.errors import InvalidCheckpointIdError, KVCheckpointError
from kvckpt.registry import open_store, parse_url
from kvckpt.urls import redact, redact_url
from tests.harness.servers import RedisServer, free_port
from tests.test_cli import kvckpt_cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: In every generated password; no message kvckpt writes holds it otherwise.
SECRET = "Qx7Secret"
PASSWORD_PART = st.lists(st.sampled_from([*"@/:?#%", "k", "%40", "%2F", "%zz"]), max_size=6).map("".join)
PASSWORDS = st.builds(lambda a, b: a + SECRET + b, PASSWORD_PART, PASSWORD_PART)
LOCATIONS = st.sampled_from(
    [
        "127.0.0.1:6379/0/ns",
        "h/0/run/epoch=1-step=30.ckpt",
        "h:99999/0/ns",
        "h:x/0/ns",
        "h/notanumber/ns",
        "h/0/",
        "/0/ns",
        "h/0/ns?db=1",
        "h/0/ns?tls=maybe&x=1",
        "a:7000,b:7001/ns",
        "/run/r.sock?db=0&namespace=ns",
        "h/0/ns#frag",
    ]
)
SCHEMES = st.sampled_from(["redis", "rediss", "redis+unix", "redis+cluster", "etcd", "fakeredis", "nope"])


def assert_hidden(text: str) -> None:
    assert SECRET not in text and quote(SECRET) not in text, text


@settings(max_examples=600, deadline=None)
@given(SCHEMES, st.sampled_from(["", "user"]), PASSWORDS, LOCATIONS, st.booleans())
def test_fuzz_no_password_in_errors_or_redaction(
    scheme: str, user: str, password: str, location: str, encoded: bool
) -> None:
    typed = quote(password, safe="") if encoded else password
    text = f"{scheme}://{user}:{typed}@{location}"
    assert_hidden(redact_url(text))
    assert_hidden(redact(f"failed on {text}: no such thing (see {text})"))
    try:
        url = parse_url(text)
    except KVCheckpointError as exc:
        assert isinstance(exc, InvalidCheckpointIdError), exc
        assert_hidden(str(exc))
        return
    if scheme != "fakeredis":  # which takes no credentials
        assert url.password == unquote(typed)  # the password the redaction hid is the one parsed
    assert_hidden(str(url) + repr(url) + url.display())


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://:ab/Zq9secret@host/0/ns", "redis://:***@host/0/ns"),
        ("redis://:p@ss@h:1/0/n", "redis://:***@h:1/0/n"),
        ("redis://u:a?b#c@h/0/n", "redis://u:***@h/0/n"),
    ],
)
def test_redaction_hides_what_the_parser_would_take_for_the_password(text: str, shown: str) -> None:
    assert redact_url(text) == shown and redact(f"at {text}.") == f"at {shown}."


def test_a_password_may_hold_at_and_colon_as_typed() -> None:
    url = parse_url("redis://u:p@ss:w0rd@h:1/0/n")
    assert (url.username, url.password, url.hosts) == ("u", "p@ss:w0rd", (("h", 1),))


def test_slash_question_mark_or_hash_before_the_last_at_is_refused_with_the_fix() -> None:
    for text in ["redis://:ab/Zq9secret@host/0/ns", "redis://h:1/0/run@v1"]:
        with pytest.raises(InvalidCheckpointIdError, match=r"%2F.*%40") as refused:
            parse_url(text)
        assert "Zq9secret" not in str(refused.value)
    assert parse_url("redis://h:1/0/run%40v1").namespace == "run@v1"


MALFORMED = [
    f"redis://:ab/{SECRET}@127.0.0.1:{{port}}/0/ns",
    f"redis://user:p@{SECRET}@127.0.0.1:{{port}}/notanumber/ns",
    f"redis://user:{SECRET}#x@127.0.0.1:{{port}}/0/ns",
    f"redis://user:{SECRET}@127.0.0.1:{{port}}/0/ns?bogus=1",
    f"redis://user:{SECRET}@127.0.0.1:{{port}}/0/",
    f"etcd://user:a/{SECRET}@127.0.0.1:{{port}}/ns",
    f"redis+cluster://:{SECRET}@127.0.0.1:{{port}}/ns?db=2",
]
UNREACHABLE = [
    f"redis://user:{SECRET}@127.0.0.1:{{port}}/0/ns",
    f"redis://user:p@{SECRET}@127.0.0.1:{{port}}/0/ns",
    f"rediss://:{SECRET}@127.0.0.1:{{port}}/0/ns",
]


def everything_said(exc: BaseException) -> str:
    """The message, repr, attributes and the whole chained traceback of ``exc``."""
    return "".join(traceback.format_exception(exc)) + repr(exc) + repr(vars(exc))


@pytest.mark.parametrize("template", MALFORMED + UNREACHABLE)
def test_public_entries_never_echo_the_password(template: str) -> None:
    url = template.format(port=free_port())  # nothing listens there
    state = {"w": torch.ones(2)}
    calls: list[Callable[[], object]] = [
        lambda: open_store(url).exists("k"),
        lambda: kvckpt.save(state, url, store_options={"timeout": 2}),
        lambda: kvckpt.load(state, url, store_options={"timeout": 2}),
        lambda: kvckpt.list_checkpoints(url, timeout=2),
    ]
    if template in MALFORMED:
        calls.append(lambda: kvckpt.KVStorageWriter(url))
    else:  # connects lazily
        writer = kvckpt.KVStorageWriter(url)
        assert_hidden(repr(writer) + str(writer.checkpoint_id))
    for call in calls:
        with pytest.raises(KVCheckpointError) as raised:
            call()
        assert_hidden(everything_said(raised.value))


def test_the_command_never_prints_the_password(redis_server: RedisServer) -> None:
    dead = free_port()
    runs = [
        ("ls", MALFORMED[0].format(port=redis_server.port)),
        ("info", MALFORMED[1].format(port=redis_server.port)),
        ("rm", MALFORMED[2].format(port=redis_server.port)),
        ("gc", "--json", MALFORMED[5].format(port=redis_server.port)),
        ("--debug", "verify", UNREACHABLE[1].format(port=dead)),
        ("ls", "--json", UNREACHABLE[0].format(port=dead)),
        ("cp", MALFORMED[0].format(port=redis_server.port), "/tmp/kvckpt-never-written"),
    ]
    for args in runs:
        result = kvckpt_cli(*args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert_hidden(result.stdout + result.stderr)
