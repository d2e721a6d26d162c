"""What every checkpoint_id URL shares: the parsed form, the namespace, credential redaction, TLS options.

A URL is ``SCHEME://[user[:password]@]HOSTS/PATH[?query]``; each backend parses its own grammar
(``KVStore.parse_url``: which path segments and query options it takes, its default port) with the
helpers here, and kvckpt.registry picks the backend by scheme. The built-in forms (a public
contract, see the README's URL table):
  redis://[user[:password]@]host[:port]/DB/NAMESPACE     rediss:// is the same over TLS
  redis+unix://[user[:password]@]/path/to.sock?db=0&namespace=NAMESPACE
  redis+cluster://[user[:password]@]host:port[,host:port...]/NAMESPACE
  etcd://[user[:password]@]host:port[,host:port...]/NAMESPACE
TCP forms take ?tls=true&ca=PATH&cert=PATH&key=PATH (rediss:// implies tls=true).

The credentials run from ``://`` to the LAST '@' (split_credentials): the one rule by which the parser
reads them and redaction hides them, even in a URL too malformed to parse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qs, quote, unquote

from kvckpt.errors import InvalidCheckpointIdError

_SCHEME = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*)://")
#: What follows the credentials: hosts, path, query (a fragment has no meaning here).
_LOCATION = re.compile(r"(?P<netloc>[^/?#]*)(?P<path>[^?#]*)(\?(?P<query>[^#]*))?")
#: The usage texts' placeholder ``SCHEME://[user[:password]@]host``, which holds no password.
_PLACEHOLDER = "[user[:password]"


@dataclass(frozen=True)
class StoreURL:
    """A parsed checkpoint_id. ``server`` (everything but the namespace) identifies a connection."""

    scheme: str
    namespace: str
    hosts: tuple[tuple[str, int], ...] = ()
    #: A database number written as the path's first segment (redis://), or None where none is.
    db: int | None = None
    #: A unix socket path: the URL then reads scheme:///path?db=&namespace= (redis+unix://).
    socket_path: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    query: tuple[tuple[str, str], ...] = ()

    @property
    def server(self) -> StoreURL:
        return replace(self, namespace="")

    def with_namespace(self, namespace: str) -> StoreURL:
        return replace(self, namespace=namespace)

    def to_url(self, *, redact: bool = True, escape: bool = True) -> str:
        """Rebuild the URL; the password becomes *** unless ``redact`` is False. ``escape=False``
        leaves the namespace's characters as they are (see display)."""
        auth = ""
        if self.username or self.password:
            auth = quote(self.username or "", safe="")
            if self.password:
                auth += ":" + ("***" if redact else quote(self.password, safe=""))
            auth += "@"
        ns = quote(self.namespace, safe="/") if escape else self.namespace
        if self.socket_path is not None:
            params = [("db", str(self.db or 0)), ("namespace", self.namespace), *self.query]
            qs = "&".join(f"{k}={quote(v, safe='/') if escape or k != 'namespace' else v}" for k, v in params)
            return f"{self.scheme}://{auth}{quote(self.socket_path, safe='/')}?{qs}"
        hosts = ",".join(f"{_host(h)}:{p}" if p else _host(h) for h, p in self.hosts)  # 0: no port
        path = f"/{self.db}/{ns}" if self.db is not None else f"/{ns}"
        qs = "&".join(f"{k}={quote(v, safe='/')}" for k, v in self.query)
        return f"{self.scheme}://{auth}{hosts}{path}" + (f"?{qs}" if qs else "")

    def __str__(self) -> str:
        return self.to_url(redact=True)

    def display(self) -> str:
        """The URL as a person reads it (the kvckpt command's listings): the password hidden and the
        namespace as the characters it is (``epoch=1-step=30.ckpt``, ``run/étape``), not
        percent-escaped. For showing only: str() is the form that parses back."""
        return self.to_url(redact=True, escape=False)


#: URL query options naming TLS files, by the name each goes by (redis-py's names are aliases).
TLS_FILE_OPTIONS = {
    "ca": "ca", "cert": "cert", "key": "key",
    "ssl_ca_certs": "ca", "ssl_certfile": "cert", "ssl_keyfile": "key",
}  # fmt: skip
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class TLSOptions:
    """TLS for a store connection. Paths only: certificates are files, so no secret sits in a URL."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None


def tls_of(url: StoreURL) -> TLSOptions | None:
    """The URL's TLS settings (None: plain): on with ``rediss://`` or ``?tls=true``, files from
    ``?ca=&cert=&key=``. Any other query option is refused, because a stray ``?`` in a namespace
    lands here and would otherwise cut the namespace short without a word."""
    query = dict(url.query)
    unknown = sorted(set(query) - set(TLS_FILE_OPTIONS) - {"tls"})
    if unknown:
        raise InvalidCheckpointIdError(
            f"{url}: unknown URL option(s) {', '.join(map(repr, unknown))}; the options are "
            f"{', '.join(sorted(TLS_FILE_OPTIONS))}, tls. Percent-encode '?' in a namespace as %3F"
        )
    files = {TLS_FILE_OPTIONS[k]: v for k, v in query.items() if k in TLS_FILE_OPTIONS}
    tls = url.scheme == "rediss" or query.get("tls", "").lower() in _TRUE
    if (files or tls) and url.socket_path is not None:
        raise InvalidCheckpointIdError(f"{url}: TLS options do not apply to a unix socket")
    if files and not tls:
        raise InvalidCheckpointIdError(
            f"{url}: ca=/cert=/key= configure TLS; add tls=true to the query"
            + (" (or use rediss://)" if url.scheme == "redis" else "")
        )
    if ("cert" in files) != ("key" in files):
        raise InvalidCheckpointIdError(f"{url}: a client certificate needs both cert= and key=")
    return TLSOptions(**files) if tls else None


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def scheme_of(checkpoint_id: object) -> str | None:
    """The scheme of text that starts ``SCHEME://`` (then its grammar says what is wrong with the
    rest), else None: a path."""
    if not isinstance(checkpoint_id, str):
        return None
    match = _SCHEME.match(checkpoint_id)
    return match.group("scheme") if match else None


def split_credentials(rest: str) -> tuple[str | None, str | None, str]:
    """(user, password, location) of ``rest``, the text after ``SCHEME://``, none of them decoded.

    The credentials run to the LAST '@', so a password may hold '@' and ':' as typed; user or
    password is None where there is none. Parsing and redaction both split here, so whatever the
    parser could take for a password is what redaction hides, however malformed the rest is.
    """
    userinfo, at, location = rest.rpartition("@")
    if not at:
        return None, None, rest
    user, colon, password = userinfo.partition(":")
    return user, (password if colon else None), location


@dataclass(frozen=True)
class URLParts:
    """A URL split into what every grammar shares; ``query`` keeps every value of each option."""

    text: str
    scheme: str
    netloc: str
    path: str
    query: dict[str, list[str]]
    username: str | None
    password: str | None

    def options(self, *taken: str) -> tuple[tuple[str, str], ...]:
        """The query options a grammar does not consume itself (checked later, e.g. by tls_of)."""
        return tuple((k, v[-1]) for k, v in sorted(self.query.items()) if k not in taken)

    def segments(self) -> list[str]:
        return self.path.split("/")[1:] if self.path.startswith("/") else []


def split_url(text: str, usage: str) -> URLParts:
    """Scheme, credentials, hosts, path and query of ``text``; ``usage`` ends the error message.

    A '/', '?' or '#' before the last '@' is refused rather than guessed at: it is either typed into
    a password (which needs %2F, %3F, %23) or an '@' in a namespace or option (which needs %40).
    """
    match = _SCHEME.match(text) if isinstance(text, str) else None
    if not match:
        raise InvalidCheckpointIdError(f"not a kvckpt URL: {redact_url(str(text))!r}; {usage}")
    user, password, rest = split_credentials(text[match.end() :])
    if any(c in (user or "") + (password or "") for c in "/?#"):
        raise InvalidCheckpointIdError(
            f"{redact_url(text)!r}: a '/', '?' or '#' comes before the URL's last '@', which ends the "
            "user name and password: percent-encode them in a password (%2F, %3F, %23), or write an "
            "'@' in a namespace or option as %40"
        )
    location = _LOCATION.fullmatch(rest)
    if not location:
        raise InvalidCheckpointIdError(
            f"{redact_url(text)!r}: '#' has no meaning in a kvckpt URL; percent-encode it as %23"
        )
    query = parse_qs(location.group("query") or "", keep_blank_values=True)
    return URLParts(
        text,
        match.group("scheme"),
        location.group("netloc"),
        location.group("path"),
        query,
        None if user is None else unquote(user) or None,
        None if password is None else unquote(password),
    )


def parse_host_url(text: str, default_port: int, usage: str) -> StoreURL:
    """The plain grammar ``SCHEME://[user[:password]@]host[:port][,host[:port]...]/NAMESPACE[?options]``."""
    parts = split_url(text, usage)
    hosts = parse_hosts(parts.netloc, default_port, text, usage)
    namespace = unquote("/".join(parts.segments()))
    url = StoreURL(
        parts.scheme,
        namespace,
        hosts=hosts,
        username=parts.username,
        password=parts.password,
        query=parts.options(),
    )
    refuse_db_and_namespace_options(url, parts)
    require_namespace(namespace, text, usage)
    return url


def refuse_db_and_namespace_options(url: StoreURL, parts: URLParts) -> None:
    """``?db=`` or ``?namespace=`` on a grammar without them: ignoring them would save elsewhere.

    A Redis Cluster serves database 0 only and etcd has no databases; the namespace is the path.
    """
    given = [k for k in ("db", "namespace") if k in parts.query]
    if not given:
        return
    namespace = url.namespace or parts.query.get("namespace", ["NAMESPACE"])[-1] or "NAMESPACE"
    query = tuple((k, v) for k, v in url.query if k not in given)
    fixed = replace(url, namespace=namespace, query=query)
    raise InvalidCheckpointIdError(
        f"{url}: {url.scheme}:// takes no {' or '.join(f'{k}=' for k in given)} option: it has no "
        f"database number to choose and the namespace is the URL's path; write {fixed}"
    )


def parse_hosts(netloc: str, default_port: int, url: str, usage: str) -> tuple[tuple[str, int], ...]:
    if not netloc:
        raise InvalidCheckpointIdError(f"{redact_url(url)!r}: missing host; {usage}")
    hosts = []
    for part in netloc.split(","):
        m = re.fullmatch(r"(\[(?P<v6>[^\]]+)\]|(?P<name>[^:\[\]]+))(:(?P<port>\d{1,5}))?", part)
        if not m:
            raise InvalidCheckpointIdError(f"{redact_url(url)!r}: bad host {part!r}; {usage}")
        port = int(m.group("port")) if m.group("port") else default_port
        if m.group("port") and not 0 < port < 65536:
            raise InvalidCheckpointIdError(f"{redact_url(url)!r}: port {port} out of range")
        hosts.append((m.group("v6") or m.group("name"), port))
    return tuple(hosts)


def parse_db(text: str, url: str) -> int:
    if not text.isdigit() or len(text) > 5:
        raise InvalidCheckpointIdError(
            f"{redact_url(url)!r}: database must be a small integer, got {text[:20]!r}"
        )
    return int(text)


def require_namespace(namespace: str, url: str, usage: str) -> None:
    if not namespace or not namespace.strip("/"):
        raise InvalidCheckpointIdError(
            f"{redact_url(url)!r}: missing NAMESPACE (the checkpoint's key prefix); {usage}"
        )
    if namespace.startswith("/") or namespace.endswith("/") or "//" in namespace:
        raise InvalidCheckpointIdError(
            f"{redact_url(url)!r}: NAMESPACE {namespace!r} has an empty path segment"
        )


def redact(text: str) -> str:
    """Replace the password of every URL in free text with ***; safe on arbitrary strings.

    In free text a URL runs from ``://`` to the next whitespace; within it split_credentials decides
    what the password is. The usage texts' ``SCHEME://[user[:password]@]host`` placeholder stays.
    """
    return re.sub(r"://(\S*)", lambda m: "://" + _hide_password(m.group(1)), text)


def redact_url(text: str) -> str:
    """``text``, one URL however malformed (whitespace included), with its password as ***."""
    scheme, sep, rest = text.partition("://")
    return scheme + sep + _hide_password(rest) if sep else text


def _hide_password(rest: str) -> str:
    user, password, location = split_credentials(rest)
    if password is None or f"{user}:{password}" == _PLACEHOLDER:
        return rest
    return f"{user}:***@{location}"
