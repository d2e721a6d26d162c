"""checkpoint_id URLs: parsing into a StoreURL and redacting credentials.

Forms (a public contract, see the README's URL table):
  redis://[user[:password]@]host[:port]/DB/NAMESPACE     rediss:// is the same over TLS
  redis+unix://[user[:password]@]/path/to.sock?db=0&namespace=NAMESPACE
  redis+cluster://[user[:password]@]host:port[,host:port...]/NAMESPACE
  etcd://[user[:password]@]host:port[,host:port...]/NAMESPACE
  fakeredis://NAME/NAMESPACE                               an in-process fakeredis server called NAME
TCP forms take ?tls=true&ca=PATH&cert=PATH&key=PATH (rediss:// implies tls=true).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qs, quote, unquote

from kvckpt.errors import InvalidCheckpointIdError

DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "redis+cluster": 6379, "etcd": 2379}
KNOWN_SCHEMES = ("redis", "rediss", "redis+unix", "redis+cluster", "etcd", "fakeredis")

_URL = re.compile(
    r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<netloc>[^/?#]*)(?P<path>[^?#]*)(\?(?P<query>[^#]*))?$"
)
_USAGE = (
    "use redis://[user[:password]@]host[:port]/DB/NAMESPACE, rediss://…, "
    "redis+unix:///path/to.sock?db=0&namespace=NAMESPACE, "
    "redis+cluster://host:port[,host:port]/NAMESPACE, etcd://host:port[,host:port]/NAMESPACE "
    "or fakeredis://NAME/NAMESPACE"
)


@dataclass(frozen=True)
class StoreURL:
    """A parsed checkpoint_id. ``server`` (everything but the namespace) identifies a connection."""

    scheme: str
    namespace: str
    hosts: tuple[tuple[str, int], ...] = ()
    db: int = 0
    socket_path: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    query: tuple[tuple[str, str], ...] = ()

    @property
    def server(self) -> StoreURL:
        return replace(self, namespace="")

    def with_namespace(self, namespace: str) -> StoreURL:
        return replace(self, namespace=namespace)

    def to_url(self, *, redact: bool = True) -> str:
        """Rebuild the URL; the password becomes *** unless ``redact`` is False."""
        auth = ""
        if self.username or self.password:
            auth = quote(self.username or "", safe="")
            if self.password:
                auth += ":" + ("***" if redact else quote(self.password, safe=""))
            auth += "@"
        ns = quote(self.namespace, safe="/")
        if self.scheme == "redis+unix":
            params = [("db", str(self.db)), ("namespace", self.namespace), *self.query]
            qs = "&".join(f"{k}={quote(v, safe='/')}" for k, v in params)
            return f"{self.scheme}://{auth}{quote(self.socket_path or '', safe='/')}?{qs}"
        hosts = ",".join(f"{_host(h)}:{p}" if p else h for h, p in self.hosts)
        path = f"/{self.db}/{ns}" if self.scheme in ("redis", "rediss") else f"/{ns}"
        qs = "&".join(f"{k}={quote(v, safe='/')}" for k, v in self.query)
        return f"{self.scheme}://{auth}{hosts}{path}" + (f"?{qs}" if qs else "")

    def __str__(self) -> str:
        return self.to_url(redact=True)


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
    if (files or tls) and url.scheme == "redis+unix":
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
    if not isinstance(checkpoint_id, str):
        return None
    match = _URL.match(checkpoint_id)
    return match.group("scheme") if match else None


def parse_url(url: str) -> StoreURL:
    match = _URL.match(url) if isinstance(url, str) else None
    if not match:
        raise InvalidCheckpointIdError(f"not a kvckpt URL: {redact(str(url))!r}; {_USAGE}")
    scheme = match.group("scheme")
    if scheme not in KNOWN_SCHEMES:
        raise InvalidCheckpointIdError(f"unknown scheme {scheme!r} in {redact(url)!r}; {_USAGE}")
    netloc, path = match.group("netloc"), match.group("path")
    query = parse_qs(match.group("query") or "", keep_blank_values=True)
    username = password = None
    if "@" in netloc:
        auth, netloc = netloc.rsplit("@", 1)
        user, sep, pw = auth.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if sep else None
    extra = tuple((k, v[-1]) for k, v in sorted(query.items()) if k not in ("db", "namespace"))

    if scheme == "redis+unix":
        socket_path = unquote(path)
        namespace = query.get("namespace", [""])[-1]
        if netloc or not socket_path.startswith("/"):
            raise InvalidCheckpointIdError(
                f"{redact(url)!r}: the socket path must be absolute, as in "
                "redis+unix:///run/redis.sock?db=0&namespace=NAMESPACE"
            )
        db = _db(query.get("db", ["0"])[-1], url)
        _require_namespace(namespace, url)
        return StoreURL(
            scheme,
            namespace,
            db=db,
            socket_path=socket_path,
            username=username,
            password=password,
            query=extra,
        )

    if scheme == "fakeredis":
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", netloc):
            raise InvalidCheckpointIdError(
                f"{redact(url)!r}: a fakeredis server NAME is letters, digits, '_', '.' or '-', as in "
                "fakeredis://tests/NAMESPACE"
            )
        hosts: tuple[tuple[str, int], ...] = ((netloc, 0),)
    else:
        hosts = _hosts(netloc, DEFAULT_PORTS[scheme], url)
    segments = path.split("/")[1:] if path.startswith("/") else []
    db = 0
    if scheme in ("redis", "rediss"):
        if not segments or not segments[0]:
            raise InvalidCheckpointIdError(
                f"{redact(url)!r}: missing database number; write {scheme}://host:port/0/NAMESPACE"
            )
        db = _db(segments[0], url)
        segments = segments[1:]
    namespace = unquote("/".join(segments))
    _require_namespace(namespace, url)
    return StoreURL(scheme, namespace, hosts=hosts, db=db, username=username, password=password, query=extra)


def _hosts(netloc: str, default_port: int, url: str) -> tuple[tuple[str, int], ...]:
    if not netloc:
        raise InvalidCheckpointIdError(f"{redact(url)!r}: missing host; {_USAGE}")
    hosts = []
    for part in netloc.split(","):
        m = re.fullmatch(r"(\[(?P<v6>[^\]]+)\]|(?P<name>[^:\[\]]+))(:(?P<port>\d{1,5}))?", part)
        if not m:
            raise InvalidCheckpointIdError(f"{redact(url)!r}: bad host {part!r}; {_USAGE}")
        port = int(m.group("port")) if m.group("port") else default_port
        if not 0 < port < 65536:
            raise InvalidCheckpointIdError(f"{redact(url)!r}: port {port} out of range")
        hosts.append((m.group("v6") or m.group("name"), port))
    return tuple(hosts)


def _db(text: str, url: str) -> int:
    if not text.isdigit() or len(text) > 5:
        raise InvalidCheckpointIdError(
            f"{redact(url)!r}: database must be a small integer, got {text[:20]!r}"
        )
    return int(text)


def _require_namespace(namespace: str, url: str) -> None:
    if not namespace or not namespace.strip("/"):
        raise InvalidCheckpointIdError(
            f"{redact(url)!r}: missing NAMESPACE (the checkpoint's key prefix); {_USAGE}"
        )
    if namespace.startswith("/") or namespace.endswith("/") or "//" in namespace:
        raise InvalidCheckpointIdError(f"{redact(url)!r}: NAMESPACE {namespace!r} has an empty path segment")


def redact(text: str) -> str:
    """Replace any password in URL-like text with ***; safe on arbitrary strings.

    A user name holds no bracket, so the usage text's ``redis://[user[:password]@]`` survives.
    """
    return re.sub(r"(://[^/@:\s\[\]]*:)[^@/\s]*@", r"\1***@", text)
