"""The store options every Redis URL takes, and the connection settings they give with the URL."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from kvckpt.errors import InvalidStoreOptionError
from kvckpt.stores.redis.retry import RetryPolicy
from kvckpt.stores.redis.transport import Endpoint
from kvckpt.urls import StoreURL, tls_of

PASSWORD_ENV = "REDISCLI_AUTH"


def password_of(url: StoreURL, password: str | None) -> str | None:
    """The password: given explicitly, else in the URL, else in REDISCLI_AUTH (as redis-cli reads it)."""
    return password or url.password or os.environ.get(PASSWORD_ENV) or None


@dataclass(frozen=True)
class Options:
    """The store options every Redis URL takes (``open_store(url, **options)``, ``store_options=``).

    ``timeout`` bounds each reply; ``retries`` re-sends idempotent commands on a dropped link, waiting
    ``backoff`` seconds, doubling up to ``backoff_cap``; no retry starts that could not end within
    ``total_timeout`` (kvckpt.stores.redis.retry). Commits are never re-sent. The ``ssl_*`` keywords
    (redis-py's names) give TLS files the URL's ``?ca=&cert=&key=`` do not.
    """

    timeout: float = RetryPolicy.timeout
    connect_timeout: float = RetryPolicy.connect_timeout
    total_timeout: float = RetryPolicy.total_timeout
    retries: int = RetryPolicy.retries
    backoff: float = RetryPolicy.backoff
    backoff_cap: float = RetryPolicy.backoff_cap
    password: str | None = None
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def __post_init__(self) -> None:
        """Refuse a wrong type now, named; ``policy()``, which every ``from_url`` builds at once,
        checks the numbers."""
        for name in ("password", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            if not isinstance(getattr(self, name), str | None):
                raise InvalidStoreOptionError(f"store option {name}: expected a string", options=[name])

    def policy(self) -> RetryPolicy:
        return RetryPolicy(
            self.retries,
            self.backoff,
            self.backoff_cap,
            self.timeout,
            self.connect_timeout,
            self.total_timeout,
        )

    def endpoint(self, url: StoreURL, **where: Any) -> Endpoint:
        """Connection settings from ``url`` and these options; ``where`` sets host, port, socket or DB."""
        tls = tls_of(url)
        given = {"ca": self.ssl_ca_certs, "cert": self.ssl_certfile, "key": self.ssl_keyfile}
        if tls is not None and any(given.values()):
            tls = replace(tls, **{k: v for k, v in given.items() if v and not getattr(tls, k)})
        return Endpoint(
            username=url.username,
            password=password_of(url, self.password),
            timeout=self.timeout,
            connect_timeout=self.connect_timeout,
            tls=tls is not None,
            ca=tls.ca if tls else None,
            cert=tls.cert if tls else None,
            key=tls.key if tls else None,
            **where,
        )
