"""etcd v3 backend: a thin gRPC client (grpcio only, messages in ``etcd_wire``) behind the KVStore seam.

etcd limits shape everything here (see docs/etcd.md):

- a request is capped by the server's ``--max-request-bytes`` (1.5 MiB by default). The store's
  ``max_request_bytes`` option must not exceed it; ``capabilities.max_value_bytes`` leaves 8 KiB of
  it for the key and txn framing, and the DCP adapter chunks tensors below that;
- a txn holds at most ``--max-txn-ops`` (128) operations: ``put_many``/``get_many``/``delete_many``
  go out as txns of at most ``max_txn_ops`` ops and ``max_request_bytes`` bytes, a few in flight;
- gRPC replies are read in batches planned to stay near ``max_reply_bytes`` (4 MiB, the gRPC
  default); a batch whose reply still overflows the channel limit is split and retried;
- the backend database has a quota (``--quota-backend-bytes``, 2 GiB by default); past it etcd raises
  the NOSPACE alarm and refuses writes: ``StoreFullError`` says how to recover.

TTL maps to leases: a put with ``ttl`` attaches the keys to one lease granted for that call (whole
seconds, rounded up; etcd raises very short TTLs to its minimum, about 2 s with default election
settings). ``expire_many`` re-attaches keys with a value-less put (``ignore_value``); ``ttl=None``
detaches them. Each such re-put is a new MVCC revision of the whole value, so it costs backend space
(the value is stored again) until the next compaction + defrag.

``capabilities.cheap_expiry`` is False for that reason: the DCP writer then writes final expiries
directly instead of pending ones (a crashed save's data is removed by the failing rank, not by expiry).
``max_total_bytes`` (None = no cap) backs ``check_total_bytes(nbytes)``, which raises
``CheckpointTooLargeError`` before a save starts when the checkpoint would not fit what etcd is
sensibly configured to hold. Also ``status()`` and ``alarms()`` for operations and tests.

Every call carries ``hasleader`` metadata so a member without a leader refuses at once instead of
queueing the request, and each call has one deadline (``timeout``) across all endpoint attempts:
quorum loss surfaces as ``StoreUnavailableError`` in seconds. Idempotent calls move to the next
endpoint when one is down; conditional writes (``put(create=True)``, ``swap``) are sent once, to a
member whose connection was confirmed first, and never re-sent.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from kvckpt.errors import (
    CheckpointTooLargeError,
    InvalidCheckpointIdError,
    KVCheckpointError,
    StoreFullError,
    StoreUnavailableError,
)
from kvckpt.store import Buffer, Capabilities, KVStore, RangeRead
from kvckpt.stores import etcd_wire as pb
from kvckpt.urls import StoreURL, TLSOptions, tls_of

MiB = 1 << 20
#: etcd's default ``--max-request-bytes``.
DEFAULT_MAX_REQUEST_BYTES = 1536 * 1024
#: etcd's default ``--max-txn-ops``.
DEFAULT_MAX_TXN_OPS = 128
#: Part of a request kept for the key and txn framing when sizing ``max_value_bytes``.
KEY_AND_FRAMING_BYTES = 8 * 1024
#: Room kept in every txn for etcd's own raft request header (id, user name, auth revision).
_RAFT_HEADER_BYTES = 1024
#: Default cap on one checkpoint: half of etcd's default 2 GiB quota, so a new generation fits
#: beside the previous one during an overwrite.
DEFAULT_MAX_TOTAL_BYTES = 1 << 30
PASSWORD_ENV = "ETCDCTL_PASSWORD"
#: Below this a rejected write is not blamed on --max-request-bytes (no server sets it that low).
_SMALL_REQUEST_BYTES = 64 * 1024

_FULL_HINT = (
    "free space: delete old checkpoints, then `etcdctl compact <revision>`, `etcdctl defrag` on every "
    "member and `etcdctl alarm disarm`; or raise --quota-backend-bytes (default 2 GiB, 8 GiB at most "
    "is advised); or use Redis for checkpoints this large"
)


def _key_bytes(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def _key_str(key: memoryview | bytes) -> str:
    return bytes(key).decode("utf-8", "surrogateescape")


def _byte_view(value: Buffer) -> memoryview:
    """A flat byte view: sizes are counted in bytes even for a memoryview of wide items."""
    view = value if isinstance(value, memoryview) else memoryview(value)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix`` (b"\\0" = no upper bound)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\x00"
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


def _ignore(reply: bytes) -> None:
    pass


def _ttl_seconds(ttl: float) -> int:
    """etcd leases are whole seconds; round up so a key never expires early."""
    return max(1, math.ceil(ttl))


#: gRPC metadata that makes a member without a leader refuse at once instead of queueing the request.
_REQUIRE_LEADER = (("hasleader", "true"),)


class _ReplyTooLarge(KVCheckpointError):
    """A read reply exceeded the channel's receive limit; the reader splits its batch."""


@dataclass
class _Endpoint:
    target: str
    channel: Any = None
    ready: bool = False
    calls: dict[str, Any] = field(default_factory=dict)

    def call(self, method: str) -> Any:
        stub = self.calls.get(method)
        if stub is None:
            stub = self.channel.unary_unary(method)  # no serializers: requests and replies are bytes
            self.calls[method] = stub
        return stub


class EtcdStore(KVStore):
    """KVStore over an etcd v3 cluster, addressed by one or more client endpoints."""

    default_port = 2379  # parse_url: KVStore's plain grammar, etcd://host[:port][,...]/NAMESPACE

    def __init__(
        self,
        endpoints: Sequence[tuple[str, int]],
        *,
        timeout: float = 10.0,
        connect_timeout: float = 3.0,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_txn_ops: int = DEFAULT_MAX_TXN_OPS,
        max_reply_bytes: int = 4 * MiB,
        max_total_bytes: int | None = DEFAULT_MAX_TOTAL_BYTES,
        inflight: int = 4,
        scan_page: int = 1000,
        username: str | None = None,
        password: str | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        tls: TLSOptions | None = None,
        description: str = "",
    ) -> None:
        if not endpoints:
            raise ValueError("EtcdStore needs at least one endpoint")
        if max_request_bytes <= 2 * KEY_AND_FRAMING_BYTES:
            raise ValueError(f"max_request_bytes={max_request_bytes} is too small for any value")
        if not 1 <= max_txn_ops:
            raise ValueError("max_txn_ops must be at least 1")
        self.targets = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in endpoints]
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_request_bytes = max_request_bytes
        self.max_txn_ops = max_txn_ops
        self.max_reply_bytes = max_reply_bytes
        self.max_total_bytes = max_total_bytes
        self.inflight = max(1, inflight)
        self.scan_page = max(1, scan_page)
        self.username = username
        self._password = password
        self.channel_options = list(channel_options)
        self.tls = tls
        self.description = description or f"etcd://{','.join(self.targets)}"
        self.capabilities = Capabilities(
            max_value_bytes=max_request_bytes - KEY_AND_FRAMING_BYTES,
            native_ranges=False,
            ttl=True,
            max_batch_ops=max_txn_ops,
            cheap_expiry=False,
        )
        #: Hard per-reply limit: well above the planning budget so a misjudged batch rarely overflows,
        #: and always above the largest value this store can write.
        self.receive_limit = max(4 * max_reply_bytes, max_request_bytes + MiB)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._endpoints: list[_Endpoint] | None = None
        self._current = 0
        self._token: str | None = None
        #: Bytes one key's reply took in the last read batch; sizes the next batch.
        self._reply_estimate: int | None = None

    @classmethod
    def from_url(
        cls,
        url: StoreURL,
        *,
        timeout: float = 10.0,
        connect_timeout: float = 3.0,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_total_bytes: int | None = DEFAULT_MAX_TOTAL_BYTES,
        password: str | None = None,
        tls: TLSOptions | None = None,
        **options: Any,
    ) -> EtcdStore:
        """``timeout`` bounds each call (all endpoint attempts together); ``max_request_bytes`` must
        not exceed the servers' ``--max-request-bytes``. The password may also come from
        ``$ETCDCTL_PASSWORD``; TLS from ``tls=TLSOptions(...)`` when the URL does not turn it on."""
        return cls(
            url.hosts,
            timeout=timeout,
            connect_timeout=connect_timeout,
            max_request_bytes=max_request_bytes,
            max_total_bytes=max_total_bytes,
            username=url.username,
            password=password or url.password or (os.environ.get(PASSWORD_ENV) if url.username else None),
            tls=tls_of(url) or tls,  # checks the URL's query even when TLS comes as an option
            description=str(url.server),
            **options,
        )

    # Connection lifecycle -------------------------------------------------------------------

    def _channel_options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_send_message_length", self.max_request_bytes + MiB),
            ("grpc.max_receive_message_length", self.receive_limit),
            ("grpc.enable_retries", 0),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            *self.channel_options,
        ]

    def _endpoint_list(self) -> list[_Endpoint]:
        endpoints = self._endpoints
        if endpoints is None:
            with self._lock:
                if self._endpoints is None:
                    options = self._channel_options()
                    credentials = self._credentials()
                    self._endpoints = [
                        _Endpoint(
                            t,
                            grpc.secure_channel(t, credentials, options=options)
                            if credentials
                            else grpc.insecure_channel(t, options=options),
                        )
                        for t in self.targets
                    ]
                endpoints = self._endpoints
        return endpoints

    def _credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials, read from the files when the first channel opens (paths survive pickling)."""
        if self.tls is None:
            return None

        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            try:
                with open(path, "rb") as file:
                    return file.read()
            except OSError as exc:
                raise InvalidCheckpointIdError(
                    f"{self.description}: cannot read the TLS file {path!r} ({exc.strerror}); "
                    "check the ca=/cert=/key= paths in the URL"
                ) from None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.tls.ca),
            private_key=read(self.tls.key),
            certificate_chain=read(self.tls.cert),
        )

    def close(self) -> None:
        with self._lock:
            endpoints, self._endpoints, self._token = self._endpoints, None, None
        for endpoint in endpoints or ():
            endpoint.channel.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_lock", "_endpoints", "_token"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"

    def _probe(self, endpoint: _Endpoint, timeout: float, *, patient: bool = False) -> str | None:
        """Confirm the member answers and has a leader (a Status call); None if so, else why not.

        A probe rather than a connectivity watch: it also catches a member cut off from its leader, and
        a refused connection fails at once so the caller can try the next endpoint. ``patient`` (the
        last endpoint left) keeps probing until ``timeout``, for a member that is restarting.
        """
        deadline = time.monotonic() + timeout
        while not endpoint.ready:
            try:
                endpoint.call(pb.STATUS)(
                    b"", timeout=max(0.05, deadline - time.monotonic()), metadata=_REQUIRE_LEADER
                )  # Status needs no auth token, so a probe never depends on logging in
                endpoint.ready = True
            except grpc.RpcError as exc:
                if not patient or time.monotonic() + 0.1 >= deadline:
                    return f"{endpoint.target}: {exc.code().name} ({exc.details()})"
                time.sleep(0.1)  # the channel backs off after a failed connection attempt
        return None

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        token = self._token
        return (*_REQUIRE_LEADER, ("token", token)) if token else _REQUIRE_LEADER

    def _authenticate(self, endpoint: _Endpoint, timeout: float) -> None:
        if self.username is None or self._token is not None:
            return
        request = pb.join(pb.authenticate_request(self.username, self._password or ""))
        try:
            reply = endpoint.call(pb.AUTHENTICATE)(request, timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:  # auth is not enabled on the server
                self._token = ""
                return
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            raise StoreUnavailableError(
                f"{self.description}: authentication as {self.username!r} failed "
                f"({exc.code().name}); check user and password"
            ) from None
        self._token = pb.parse_authenticate_response(reply)

    # One call with failover, and error translation ------------------------------------------

    def _rpc(
        self,
        method: str,
        request: bytes,
        *,
        action: str,
        idempotent: bool = True,
        write: bool = False,
    ) -> bytes:
        """Send one request; move to the next endpoint when one is down (idempotent calls only)."""
        endpoints = self._endpoint_list()
        deadline = time.monotonic() + self.timeout
        failures: list[str] = []
        order = [(self._current + i) % len(endpoints) for i in range(len(endpoints))]
        reauthenticated = False
        i = 0
        while i < len(order):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failures.append("deadline reached")
                break
            endpoint = endpoints[order[i]]
            last = i == len(order) - 1
            failure = self._probe(endpoint, min(remaining, self.connect_timeout), patient=last)
            if failure is not None:
                failures.append(failure)
                i += 1
                continue
            try:
                self._authenticate(endpoint, remaining)
                self._current = order[i]
                reply: bytes = endpoint.call(method)(
                    request, timeout=deadline - time.monotonic(), metadata=self._metadata()
                )
                return reply
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNAUTHENTICATED and self.username and not reauthenticated:
                    self._token, reauthenticated = None, True  # the token expired: log in again
                    continue
                if code == grpc.StatusCode.UNAVAILABLE:
                    endpoint.ready = False
                    failures.append(f"{endpoint.target}: {code.name} ({exc.details()})")
                    if idempotent:
                        i += 1
                        continue
                raise self._translate(exc, action, len(request), write) from None
        raise StoreUnavailableError(
            f"{self.description}: no etcd endpoint answered while {action} within {self.timeout:g}s "
            f"({'; '.join(failures)}); {self._unavailable_hint(failures)}",
            action=action,
        )

    def _unavailable_hint(self, failures: list[str]) -> str:
        text = " ".join(failures).lower()
        if "handshake" in text:
            return "the TLS handshake failed: check the ca=/cert=/key= files against the server's"
        if self.tls is None and ("socket closed" in text or "connection reset" in text):
            return "a server that requires TLS closes plain connections: add ?tls=true&ca=&cert=&key="
        return "check that a quorum of members is up, or raise timeout="

    def _pipelined(
        self,
        method: str,
        requests: Iterator[tuple[bytes, Callable[[bytes], None]]],
        *,
        action: str,
        write: bool,
    ) -> None:
        """Keep up to ``inflight`` idempotent requests on the wire; a failed one is retried via _rpc."""
        window: deque[tuple[Any, bytes, Callable[[bytes], None]]] = deque()
        endpoints = self._endpoint_list()
        pending = iter(requests)
        exhausted = False
        while True:
            while not exhausted and len(window) < self.inflight:
                item = next(pending, None)
                if item is None:
                    exhausted = True
                    break
                request, done = item
                endpoint = endpoints[self._current]
                if not endpoint.ready or (self.username and self._token is None):
                    done(self._rpc(method, request, action=action, write=write))
                    continue
                future = endpoint.call(method).future(
                    request, timeout=self.timeout, metadata=self._metadata()
                )
                window.append((future, request, done))
            if not window:
                return
            future, request, done = window.popleft()
            try:
                reply = future.result()
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED):
                    for other, _, _ in window:
                        other.cancel()
                    raise self._translate(exc, action, len(request), write) from None
                endpoints[self._current].ready = False
                reply = self._rpc(method, request, action=action, write=write)
            done(reply)

    def _translate(
        self, exc: grpc.RpcError, action: str, request_bytes: int, write: bool
    ) -> KVCheckpointError:
        """Map a gRPC status code (the error's class, not its text) onto kvckpt's error types."""
        code, detail = exc.code(), exc.details()
        where = f"{self.description}: while {action}"
        if code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.CANCELLED,
        ):
            return StoreUnavailableError(
                f"{where}, etcd did not answer ({code.name}: {detail}); check that a quorum of members "
                "is up and has a leader, or raise timeout=",
                action=action,
            )
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return StoreUnavailableError(
                f"{where}, etcd refused the credentials ({code.name}); check user, password and "
                "the user's role on this key range",
                action=action,
            )
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not write:
            return _ReplyTooLarge(
                f"{where}, one reply exceeded the gRPC receive limit of {self.receive_limit} bytes; "
                "raise max_reply_bytes=",
                limit=self.receive_limit,
            )
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and self._nospace():
            return StoreFullError(
                f"{where}, etcd refused the write: its database reached --quota-backend-bytes "
                f"(NOSPACE alarm); {_FULL_HINT}",
                action=action,
            )
        if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT) and (
            write and request_bytes > _SMALL_REQUEST_BYTES
        ):
            return KVCheckpointError(
                f"{where}, etcd rejected a {request_bytes}-byte request ({code.name}: {detail}); most "
                "often the server's --max-request-bytes is below this store's "
                f"max_request_bytes={self.max_request_bytes}: pass the server's value as "
                "max_request_bytes= or raise --max-request-bytes on every member",
                limit=self.max_request_bytes,
                size=request_bytes,
            )
        return KVCheckpointError(f"{where}, etcd error {code.name}: {detail}", action=action)

    def _nospace(self) -> bool:
        try:
            return any(alarm == "NOSPACE" for _, alarm in self.alarms())
        except KVCheckpointError:
            return False

    # Operations helpers (not part of KVStore) ------------------------------------------------

    def status(self) -> pb.Status:
        """Maintenance.Status of the member currently in use (version, db size, leader, revision)."""
        reply = self._rpc(pb.STATUS, b"", action="reading status")
        return pb.parse_status_response(reply)

    def alarms(self) -> list[tuple[int, str]]:
        """Active alarms as (member id, "NOSPACE" | "CORRUPT")."""
        reply = self._rpc(pb.ALARM, pb.join(pb.alarm_get_request()), action="reading alarms")
        return [
            (member, pb.ALARM_NAMES.get(kind, str(kind))) for member, kind in pb.parse_alarm_response(reply)
        ]

    def check_total_bytes(self, nbytes: int) -> None:
        """Raise CheckpointTooLargeError when a checkpoint of ``nbytes`` exceeds ``max_total_bytes``."""
        if self.max_total_bytes is not None and nbytes > self.max_total_bytes:
            raise CheckpointTooLargeError(
                f"{self.description}: a checkpoint of {nbytes} bytes exceeds max_total_bytes="
                f"{self.max_total_bytes}; etcd keeps every byte in one database capped by "
                "--quota-backend-bytes (2 GiB by default, 8 GiB at most is advised). Raise "
                "--quota-backend-bytes and pass max_total_bytes= (None for no cap), or use Redis",
                nbytes=nbytes,
                limit=self.max_total_bytes,
            )

    # Leases ---------------------------------------------------------------------------------

    def _grant(self, ttl: float) -> int:
        reply = self._rpc(
            pb.LEASE_GRANT,
            pb.join(pb.lease_grant_request(_ttl_seconds(ttl))),
            action="granting a lease",
            write=True,
        )
        lease, _, error = pb.parse_lease_grant_response(reply)
        if error or not lease:
            raise KVCheckpointError(f"{self.description}: etcd did not grant a lease: {error or 'no id'}")
        return lease

    def _revoke_quietly(self, lease: int) -> None:
        """Best effort: an unrevoked lease only lingers until its TTL runs out."""
        try:
            self._rpc(pb.LEASE_REVOKE, pb.join(pb.lease_revoke_request(lease)), action="revoking a lease")
        except KVCheckpointError:
            pass

    # Size guard ------------------------------------------------------------------------------

    def _too_large(self, key: str, nbytes: int) -> KVCheckpointError:
        return KVCheckpointError(
            f"{self.description}: the value for {key!r} is {nbytes} bytes, over this store's "
            f"max_value_bytes={self.capabilities.max_value_bytes} (max_request_bytes="
            f"{self.max_request_bytes} less room for the key). Split the value into smaller chunks, "
            "or raise --max-request-bytes on every etcd member and pass the same max_request_bytes=",
            limit=self.capabilities.max_value_bytes,
            size=nbytes,
        )

    def _check_value(self, key: str, view: memoryview) -> None:
        if view.nbytes > self.capabilities.max_value_bytes:
            raise self._too_large(key, view.nbytes)

    def _txn_batches(self, ops: Sequence[tuple[str, pb.Parts]], weight: int = 1) -> Iterator[list[pb.Parts]]:
        """Group request ops into txns of at most max_txn_ops ops and max_request_bytes bytes.

        ``weight`` counts each op as that many against max_txn_ops: etcd also counts the ops of nested
        txns (a txn of 128 one-op nested txns is refused), so expire_many sends half as many.
        """
        budget = self.max_request_bytes - _RAFT_HEADER_BYTES
        max_ops = max(1, self.max_txn_ops // weight)
        batch: list[pb.Parts] = []
        used = 0
        for key, op in ops:
            cost = pb.size(op) + 6  # the success-branch tag and length around the op
            if cost > budget:
                raise self._too_large(key, cost)
            if batch and (len(batch) >= max_ops or used + cost > budget):
                yield batch
                batch, used = [], 0
            batch.append(op)
            used += cost
        if batch:
            yield batch

    def _run_txns(
        self,
        ops: Sequence[tuple[str, pb.Parts]],
        action: str,
        on_reply: Callable[[int, pb.TxnResponse], None] | None = None,
        weight: int = 1,
    ) -> None:
        """Send ops as batched, pipelined txns; ``on_reply(first op index, reply)`` per txn."""

        def requests() -> Iterator[tuple[bytes, Callable[[bytes], None]]]:
            start = 0
            for batch in self._txn_batches(ops, weight):
                first = start
                start += len(batch)

                def done(reply: bytes, first: int = first) -> None:
                    if on_reply is not None:
                        on_reply(first, pb.parse_txn_response(reply))

                yield pb.join(pb.txn_request((), batch)), done

        self._pipelined(pb.TXN, requests(), action=action, write=True)

    # KVStore: reads -------------------------------------------------------------------------

    def _read_batch_len(self) -> int:
        estimate = self._reply_estimate
        if estimate is None:
            return 4  # a probe: four maximal values still fit the hard receive limit
        return max(1, min(self.max_txn_ops, self.max_reply_bytes // max(estimate, 1)))

    def _fetch(self, keys: Sequence[str]) -> dict[str, memoryview]:
        """Values of the keys that exist, as views into the replies.

        Keys go out as read-only txns of ranges sized from the last batch's values, a few in flight;
        a batch of one is a plain Range. RESOURCE_EXHAUSTED on a read means either the reply overflowed
        the receive limit (split the batch) or the NOSPACE alarm is up: etcd then refuses every txn,
        reads included, but not plain Ranges, so the rest of the keys are read one Range each.
        """
        found: dict[str, memoryview] = {}
        todo: deque[str] = deque(dict.fromkeys(keys))
        window: deque[tuple[Any, list[str], str, bytes]] = deque()
        endpoints = self._endpoint_list()
        singles = False

        def request(batch: list[str]) -> tuple[str, bytes]:
            if len(batch) == 1:
                return pb.RANGE, pb.join(pb.range_request(_key_bytes(batch[0])))
            ops = [pb.request_op(pb.OP_RANGE, pb.range_request(_key_bytes(k))) for k in batch]
            return pb.TXN, pb.join(pb.txn_request((), ops))

        def accept(batch: list[str], method: str, reply: bytes) -> None:
            if method == pb.RANGE:
                ranges = [memoryview(reply)]
            else:
                ranges = [inner for _, inner in pb.parse_txn_response(reply).responses]
            largest = 0
            for key, inner in zip(batch, ranges, strict=True):
                result = pb.parse_range_response(inner)
                if result.kvs:
                    kv = result.kvs[0]
                    found[key] = kv.value
                    largest = max(largest, kv.value.nbytes + kv.key.nbytes + 64)
                else:
                    largest = max(largest, len(key) + 64)
            self._reply_estimate = largest

        def exhausted(batch: list[str]) -> None:
            nonlocal singles
            if len(batch) == 1:
                raise _ReplyTooLarge(
                    f"{self.description}: the value of {batch[0]!r} exceeds the gRPC receive limit of "
                    f"{self.receive_limit} bytes; raise max_reply_bytes=",
                    limit=self.receive_limit,
                )
            if not singles and self._nospace():
                singles = True
            else:
                self._reply_estimate = max(self._reply_estimate or 0, self.receive_limit // len(batch) + 1)
            todo.extendleft(reversed(batch))

        def read_now(batch: list[str], method: str, request_bytes: bytes) -> None:
            try:
                accept(batch, method, self._rpc(method, request_bytes, action="reading"))
            except _ReplyTooLarge:
                exhausted(batch)

        while todo or window:
            while todo and len(window) < self.inflight:
                size = 1 if singles else min(self._read_batch_len(), len(todo))
                batch = [todo.popleft() for _ in range(size)]
                method, req = request(batch)
                endpoint = endpoints[self._current]
                if not endpoint.ready or (self.username and self._token is None):
                    read_now(batch, method, req)
                    continue
                future = endpoint.call(method).future(req, timeout=self.timeout, metadata=self._metadata())
                window.append((future, batch, method, req))
            if not window:
                continue
            future, batch, method, req = window.popleft()
            try:
                accept(batch, method, future.result())
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    exhausted(batch)
                elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED):
                    endpoints[self._current].ready = False
                    read_now(batch, method, req)
                else:
                    for other, *_ in window:
                        other.cancel()
                    raise self._translate(exc, "reading", len(req), False) from None
        return found

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        found = self._fetch(keys)
        return [bytes(found[k]) if k in found else None for k in keys]

    def read_into_many(self, reads: Sequence[RangeRead]) -> list[int]:
        """etcd has no byte ranges: fetch each distinct key's value once and copy the slices."""
        copied = [0] * len(reads)
        wanted = [r.key for r in reads if r.into.nbytes]
        if not wanted:
            return copied
        found = self._fetch(wanted)
        for i, r in enumerate(reads):
            value = found.get(r.key)
            if value is None or not r.into.nbytes:
                continue
            into = _byte_view(r.into)
            chunk = value[r.offset : r.offset + into.nbytes]
            into[: chunk.nbytes] = chunk
            copied[i] = chunk.nbytes
        return copied

    def scan_prefix(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix`` (a literal byte prefix), fetched keys-only in pages of ``scan_page``."""
        start, end = _key_bytes(prefix) or b"\x00", prefix_end(_key_bytes(prefix))
        while True:
            request = pb.join(pb.range_request(start, end, limit=self.scan_page, keys_only=True))
            page = pb.parse_range_response(self._rpc(pb.RANGE, request, action="listing keys"))
            for kv in page.kvs:
                yield _key_str(kv.key)
            if not page.more or not page.kvs:
                return
            start = bytes(page.kvs[-1].key) + b"\x00"

    # KVStore: writes ------------------------------------------------------------------------

    def put_many(self, items: Sequence[tuple[str, Buffer]], *, ttl: float | None = None) -> None:
        if not items:
            return
        latest = {key: _byte_view(value) for key, value in items}  # a txn may not name a key twice
        for key, view in latest.items():
            self._check_value(key, view)
        lease = self._grant(ttl) if ttl is not None else 0
        ops = [
            (key, pb.request_op(pb.OP_PUT, pb.put_request(_key_bytes(key), view, lease=lease)))
            for key, view in latest.items()
        ]
        self._run_txns(ops, "writing")

    def put(self, key: str, value: Buffer, *, create: bool = False, ttl: float | None = None) -> bool:
        view = _byte_view(value)
        self._check_value(key, view)
        lease = self._grant(ttl) if ttl is not None else 0
        raw = _key_bytes(key)
        if not create:
            self._rpc(pb.PUT, pb.join(pb.put_request(raw, view, lease=lease)), action="writing", write=True)
            return True
        request = pb.txn_request(
            [pb.compare(raw, pb.CREATE, pb.EQUAL, 0)],
            [pb.request_op(pb.OP_PUT, pb.put_request(raw, view, lease=lease))],
        )
        reply = self._rpc(pb.TXN, pb.join(request), action="writing", idempotent=False, write=True)
        written = pb.parse_txn_response(reply).succeeded
        if not written and lease:
            self._revoke_quietly(lease)
        return written

    def swap(self, key: str, value: Buffer, *, ttl: float | None = None) -> bytes | None:
        view = _byte_view(value)
        self._check_value(key, view)
        lease = self._grant(ttl) if ttl is not None else 0
        request = pb.put_request(_key_bytes(key), view, lease=lease, prev_kv=True)
        reply = self._rpc(pb.PUT, pb.join(request), action="writing", idempotent=False, write=True)
        previous = pb.parse_put_response(reply)
        return bytes(previous.value) if previous is not None else None

    def take(self, key: str) -> bytes | None:
        """DeleteRange with prev_kv: one atomic request, sent once (a resend would find nothing)."""
        request = pb.join(pb.delete_range_request(_key_bytes(key), prev_kv=True))
        reply = self._rpc(pb.DELETE_RANGE, request, action="deleting", idempotent=False, write=True)
        previous = pb.parse_delete_range_prev_kvs(reply)
        return bytes(previous[0].value) if previous else None

    def expire_many(self, keys: Sequence[str], ttl: float | None) -> list[bool]:
        """Re-attach existing keys to a new lease (or to none) with a value-less put per key."""
        if not keys:
            return []
        unique = list(dict.fromkeys(keys))
        lease = self._grant(ttl) if ttl is not None else 0
        ops = []
        for key in unique:
            raw = _key_bytes(key)
            touch = pb.request_op(pb.OP_PUT, pb.put_request(raw, lease=lease, ignore_value=True))
            if lease:  # only if the key exists (an ignore_value put on a missing key is an error)
                inner = pb.txn_request([pb.compare(raw, pb.VERSION, pb.GREATER, 0)], [touch])
            else:  # only if it has a lease (spares a revision); otherwise report whether it exists
                count = pb.request_op(pb.OP_RANGE, pb.range_request(raw, count_only=True))
                inner = pb.txn_request([pb.compare(raw, pb.LEASE, pb.NOT_EQUAL, 0)], [touch], [count])
            ops.append((key, pb.request_op(pb.OP_TXN, inner)))
        exists: dict[str, bool] = {}

        def on_reply(first: int, reply: pb.TxnResponse) -> None:
            for key, (_, inner_reply) in zip(unique[first:], reply.responses, strict=False):
                txn = pb.parse_txn_response(inner_reply)
                if txn.succeeded:
                    exists[key] = True
                else:
                    counted = [pb.parse_range_response(r).count for _, r in txn.responses]
                    exists[key] = bool(counted and counted[0])

        self._run_txns(ops, "setting expiry", on_reply, weight=2)
        return [exists.get(key, False) for key in keys]

    def delete_many(self, keys: Sequence[str]) -> None:
        """Txns of deletes; under the NOSPACE alarm (which refuses all txns) one DeleteRange per key,
        since deleting is how space is freed."""
        if not keys:
            return
        unique = list(dict.fromkeys(keys))
        ops = [(k, pb.request_op(pb.OP_DELETE, pb.delete_range_request(_key_bytes(k)))) for k in unique]
        try:
            self._run_txns(ops, "deleting")
        except StoreFullError:
            requests = ((pb.join(pb.delete_range_request(_key_bytes(k))), _ignore) for k in unique)
            self._pipelined(pb.DELETE_RANGE, requests, action="deleting", write=True)

    def delete_prefix(self, prefix: str, batch: int = 1000) -> int:
        """One DeleteRange over the prefix (atomic, allowed under NOSPACE); returns how many went."""
        raw = _key_bytes(prefix)
        request = pb.join(pb.delete_range_request(raw or b"\x00", prefix_end(raw)))
        reply = self._rpc(pb.DELETE_RANGE, request, action="deleting", write=True)
        return pb.parse_delete_range_response(reply)
