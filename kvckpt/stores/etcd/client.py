"""The etcd client: endpoints, TLS, authentication, one call with failover, and one pipelined path.

Every call carries ``hasleader`` metadata so a member without a leader refuses at once instead of
queueing the request, and each call has one deadline across all endpoint attempts: ``timeout``, cut
to what the deadline shared by the whole save, load, listing or gc leaves (kvckpt.deadline: the
store may go ``timeout`` seconds without progress), so quorum loss or a hung member surfaces as
``StoreUnavailableError`` within ``timeout``, cleanup included. Idempotent calls move to the next
endpoint when one is down; conditional writes are sent once, to a member whose connection was
confirmed first, and never re-sent. ``pipeline`` keeps up to ``inflight`` idempotent calls on the wire
for every batched operation (reads, txns of writes, deletes).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from kvckpt.deadline import Deadline, current
from kvckpt.errors import (
    InvalidCheckpointIdError,
    KVCheckpointError,
    StoreFullError,
    StoreUnavailableError,
)
from kvckpt.stores.etcd import wire as pb
from kvckpt.urls import TLSOptions

MiB = 1 << 20
#: Below this a rejected write is not blamed on --max-request-bytes (no server sets it that low).
_SMALL_REQUEST_BYTES = 64 * 1024
#: gRPC metadata that makes a member without a leader refuse at once instead of queueing the request.
_REQUIRE_LEADER = (("hasleader", "true"),)
#: Codes after which a pipelined call is sent again through ``rpc`` (another endpoint, a new login).
_RESEND = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)

FULL_HINT = (
    "free space: delete old checkpoints, then `etcdctl compact <revision>`, `etcdctl defrag` on every "
    "member and `etcdctl alarm disarm`; or raise --quota-backend-bytes (default 2 GiB, 8 GiB at most "
    "is advised); or use Redis for checkpoints this large"
)


class ReplyTooLarge(KVCheckpointError):
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


@dataclass
class Call:
    """One pipelined request: ``done(reply)`` on success; ``refused(code)`` may take a failure over
    (True: handled, e.g. a read batch re-queued smaller) before it is raised as a kvckpt error."""

    method: str
    request: bytes
    done: Callable[[bytes], None]
    refused: Callable[[grpc.StatusCode], bool] | None = None


class EtcdClient:
    """Channels to the members, opened on first use; picklable (the channels are not kept)."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        timeout: float,
        connect_timeout: float,
        max_request_bytes: int,
        receive_limit: int,
        inflight: int,
        username: str | None,
        password: str | None,
        channel_options: Sequence[tuple[str, Any]],
        tls: TLSOptions | None,
        description: str,
    ) -> None:
        self.targets = list(targets)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_request_bytes = max_request_bytes
        self.receive_limit = receive_limit
        self.inflight = max(1, inflight)
        self.username = username
        self._password = password
        self.channel_options = list(channel_options)
        self.tls = tls
        self.description = description
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self.endpoints: list[_Endpoint] | None = None
        self._current = 0
        self._token: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_lock", "endpoints", "_token"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

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
        endpoints = self.endpoints
        if endpoints is None:
            with self._lock:
                if self.endpoints is None:
                    options = self._channel_options()
                    credentials = self._credentials()
                    self.endpoints = [
                        _Endpoint(
                            t,
                            grpc.secure_channel(t, credentials, options=options)
                            if credentials
                            else grpc.insecure_channel(t, options=options),
                        )
                        for t in self.targets
                    ]
                endpoints = self.endpoints
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
            endpoints, self.endpoints, self._token = self.endpoints, None, None
        for endpoint in endpoints or ():
            endpoint.channel.close()

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

    def rpc(
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
        shared = current()
        deadline = time.monotonic() + self._left(shared, action)
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
                shared.progress()
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

    def _left(self, shared: Deadline, action: str) -> float:
        """Seconds the next call may take: ``timeout``, cut to what ``shared`` leaves; when it left
        nothing the call fails at once (whatever a failed save had left to clean up goes to
        kvckpt.gc and expiry)."""
        left = shared.remaining(self.timeout)
        if left <= 0:
            raise StoreUnavailableError(
                f"{self.description}: no time left while {action}: etcd made no progress for "
                f"timeout={self.timeout:g}s, the deadline every operation of this save, load, listing "
                "or gc shares; check that a quorum of members is up and answering, or raise timeout=",
                action=action,
            )
        return min(self.timeout, left)

    def _unavailable_hint(self, failures: list[str]) -> str:
        text = " ".join(failures).lower()
        if "handshake" in text:
            return "the TLS handshake failed: check the ca=/cert=/key= files against the server's"
        if self.tls is None and ("socket closed" in text or "connection reset" in text):
            return "a server that requires TLS closes plain connections: add ?tls=true&ca=&cert=&key="
        return "check that a quorum of members is up, or raise timeout="

    def pipeline(self, next_call: Callable[[], Call | None], *, action: str, write: bool) -> None:
        """Keep up to ``inflight`` idempotent calls on the wire until ``next_call`` has none left.

        ``next_call`` is asked again whenever there is room, so a caller may queue more work from a
        reply (a read batch split after an overflow). A call refused with UNAVAILABLE or UNAUTHENTICATED
        is sent again through ``rpc`` (failover, a new login); any other failure cancels the rest.
        """
        window: deque[tuple[Any, Call]] = deque()
        endpoints = self._endpoint_list()
        shared = current()
        while True:
            while len(window) < self.inflight and (call := next_call()) is not None:
                endpoint = endpoints[self._current]
                if not endpoint.ready or (self.username and self._token is None):
                    self._resend(call, action, write)  # connects (and logs in) first
                    continue
                future = endpoint.call(call.method).future(
                    call.request, timeout=self._left(shared, action), metadata=self._metadata()
                )
                window.append((future, call))
            if not window:
                return
            future, call = window.popleft()
            try:
                reply = future.result()
            except grpc.RpcError as exc:
                if exc.code() in _RESEND:
                    endpoints[self._current].ready = False
                    self._resend(call, action, write)
                    continue
                if call.refused is not None and call.refused(exc.code()):
                    continue
                for other, _ in window:
                    other.cancel()
                raise self._translate(exc, action, len(call.request), write) from None
            shared.progress()
            call.done(reply)

    def _resend(self, call: Call, action: str, write: bool) -> None:
        try:
            reply = self.rpc(call.method, call.request, action=action, write=write)
        except ReplyTooLarge:
            if call.refused is None or not call.refused(grpc.StatusCode.RESOURCE_EXHAUSTED):
                raise
            return
        call.done(reply)

    def _translate(
        self, exc: grpc.RpcError, action: str, request_bytes: int, write: bool
    ) -> KVCheckpointError:
        """Map a gRPC status code (the error's class, not its text) onto kvckpt's error types."""
        code, detail = exc.code(), exc.details()
        where = f"{self.description}: while {action}"
        # A member that lost quorum but has not yet noticed its leader is gone lets the request's
        # server-side context expire; etcd sends that as UNKNOWN with the context's own message.
        server_deadline = code == grpc.StatusCode.UNKNOWN and detail == "context deadline exceeded"
        if server_deadline or code in (
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
            return ReplyTooLarge(
                f"{where}, one reply exceeded the gRPC receive limit of {self.receive_limit} bytes; "
                "raise max_reply_bytes=",
                limit=self.receive_limit,
            )
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and self.nospace():
            return StoreFullError(
                f"{where}, etcd refused the write: its database reached --quota-backend-bytes "
                f"(NOSPACE alarm); {FULL_HINT}",
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

    def nospace(self) -> bool:
        """Whether etcd's NOSPACE alarm is raised: what tells a full database from a reply too large
        for the gRPC limit, as both fail with RESOURCE_EXHAUSTED. False when alarms cannot be read."""
        try:
            return any(alarm == "NOSPACE" for _, alarm in self.alarms())
        except KVCheckpointError:
            return False

    def alarms(self) -> list[tuple[int, str]]:
        """Active alarms as (member id, "NOSPACE" | "CORRUPT")."""
        reply = self.rpc(pb.ALARM, pb.join(pb.alarm_get_request()), action="reading alarms")
        return [
            (member, pb.ALARM_NAMES.get(kind, str(kind))) for member, kind in pb.parse_alarm_response(reply)
        ]

    def status(self) -> pb.Status:
        return pb.parse_status_response(self.rpc(pb.STATUS, b"", action="reading status"))

    def grant(self, seconds: int) -> int:
        """A new lease of ``seconds``; its id."""
        request = pb.join(pb.lease_grant_request(seconds))
        reply = self.rpc(pb.LEASE_GRANT, request, action="granting a lease", write=True)
        lease, _, error = pb.parse_lease_grant_response(reply)
        if error or not lease:
            raise KVCheckpointError(f"{self.description}: etcd did not grant a lease: {error or 'no id'}")
        return lease

    def revoke_quietly(self, lease: int) -> None:
        """Best effort: an unrevoked lease only lingers until its TTL runs out."""
        try:
            self.rpc(pb.LEASE_REVOKE, pb.join(pb.lease_revoke_request(lease)), action="revoking a lease")
        except KVCheckpointError:
            pass
