"""etcd v3 as a KVStore: keys, values, txns and leases over kvckpt.stores.etcd.client.

etcd's limits shape everything here; docs/etcd.md has the table. In short: a request is capped by the
server's ``--max-request-bytes`` (``max_value_bytes`` keeps 8 KiB of it for the key and framing); a
txn holds at most ``--max-txn-ops`` ops, so the ``*_many`` calls go out as txns within both limits, a
few in flight; reads are batched to keep a reply near ``max_reply_bytes`` and split when one still
overflows; past ``--quota-backend-bytes`` etcd refuses writes (``StoreFullError`` says how to recover).

TTL maps to leases (whole seconds, rounded up). ``expire_many`` re-puts each key without its value
(``ignore_value``), a new MVCC revision of the whole value, so ``capabilities.cheap_expiry`` is False
and the DCP writer writes final expiries directly. ``check_total_bytes`` refuses a checkpoint larger
than ``max_total_bytes`` before a save starts.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from kvckpt._buffers import flat_view, key_bytes, key_str
from kvckpt.arguments import seconds, whole
from kvckpt.errors import CheckpointTooLargeError, InvalidArgumentError, KVCheckpointError, StoreFullError
from kvckpt.store import Buffer, Capabilities, Commit, KVStore, RangeRead
from kvckpt.stores.etcd import wire as pb
from kvckpt.stores.etcd.client import Call, EtcdClient, MiB, ReplyTooLarge
from kvckpt.stores.etcd.txns import too_large, txn_batches
from kvckpt.urls import StoreURL, TLSOptions, tls_of

#: etcd's default ``--max-request-bytes``.
DEFAULT_MAX_REQUEST_BYTES = 1536 * 1024
#: etcd's default ``--max-txn-ops``.
DEFAULT_MAX_TXN_OPS = 128
#: Part of a request kept for the key and txn framing when sizing ``max_value_bytes``.
KEY_AND_FRAMING_BYTES = 8 * 1024
#: Default cap on one checkpoint: half of etcd's default 2 GiB quota, so a new generation fits
#: beside the previous one during an overwrite.
DEFAULT_MAX_TOTAL_BYTES = 1 << 30
PASSWORD_ENV = "ETCDCTL_PASSWORD"


def _ignore(reply: bytes) -> None:
    pass


def _ttl_seconds(ttl: float) -> int:
    """etcd leases are whole seconds; round up so a key never expires early."""
    return max(1, math.ceil(ttl))


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
            raise InvalidArgumentError("EtcdStore: endpoints=[]: name a (host, port)", options=["endpoints"])
        seconds("EtcdStore", timeout=timeout, connect_timeout=connect_timeout)
        whole("EtcdStore", 2 * KEY_AND_FRAMING_BYTES + 1, max_request_bytes=max_request_bytes)
        whole("EtcdStore", 1, max_txn_ops=max_txn_ops, inflight=inflight, scan_page=scan_page)
        whole("EtcdStore", 1, none=True, max_total_bytes=max_total_bytes)
        self.targets = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in endpoints]
        self.timeout = timeout
        self.max_request_bytes = max_request_bytes
        self.max_txn_ops = max_txn_ops
        self.max_reply_bytes = max_reply_bytes
        self.max_total_bytes = max_total_bytes
        self.scan_page = scan_page
        self.description = description or f"etcd://{','.join(self.targets)}"
        self.capabilities = Capabilities(
            max_value_bytes=max_request_bytes - KEY_AND_FRAMING_BYTES,
            native_ranges=False,
            ttl=True,
            max_batch_ops=max_txn_ops,
            cheap_expiry=False,
            conditional_commit=True,
        )
        #: Hard per-reply limit: well above the planning budget so a misjudged batch rarely overflows,
        #: and always above the largest value this store can write.
        self.receive_limit = max(4 * max_reply_bytes, max_request_bytes + MiB)
        self.client = EtcdClient(
            self.targets,
            timeout=timeout,
            connect_timeout=connect_timeout,
            max_request_bytes=max_request_bytes,
            receive_limit=self.receive_limit,
            inflight=inflight,
            username=username,
            password=password,
            channel_options=channel_options,
            tls=tls,
            description=self.description,
        )
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

    def close(self) -> None:
        self.client.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"

    # Operations helpers (not part of KVStore) ------------------------------------------------

    def status(self) -> pb.Status:
        """Maintenance.Status of the member currently in use (version, db size, leader, revision)."""
        return self.client.status()

    def alarms(self) -> list[tuple[int, str]]:
        """Active alarms as (member id, "NOSPACE" | "CORRUPT")."""
        return self.client.alarms()

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

    # Size guard ------------------------------------------------------------------------------

    def _too_large(self, key: str, nbytes: int) -> KVCheckpointError:
        return too_large(
            self.description, key, nbytes, self.capabilities.max_value_bytes, self.max_request_bytes
        )

    def _check_value(self, key: str, view: memoryview) -> None:
        if view.nbytes > self.capabilities.max_value_bytes:
            raise self._too_large(key, view.nbytes)

    def _run_txns(
        self,
        ops: Sequence[tuple[str, pb.Parts]],
        action: str,
        on_reply: Callable[[int, pb.TxnResponse], None] | None = None,
        weight: int = 1,
    ) -> None:
        """Send ops as batched, pipelined txns; ``on_reply(first op index, reply)`` per txn.

        ``weight`` counts each op as that many against max_txn_ops: etcd also counts the ops of nested
        txns (a txn of 128 one-op nested txns is refused), so expire_many sends half as many."""

        def calls() -> Iterator[Call]:
            start = 0
            max_ops = max(1, self.max_txn_ops // weight)
            for batch in txn_batches(ops, self.max_request_bytes, max_ops, self._too_large):
                first = start
                start += len(batch)

                def done(reply: bytes, first: int = first) -> None:
                    if on_reply is not None:
                        on_reply(first, pb.parse_txn_response(reply))

                yield Call(pb.TXN, pb.join(pb.txn_request((), batch)), done)

        pending = calls()
        self.client.pipeline(lambda: next(pending, None), action=action, write=True)

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
        singles = False

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

        def exhausted(batch: list[str], code: grpc.StatusCode) -> bool:
            nonlocal singles
            if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                return False
            if len(batch) == 1:
                raise ReplyTooLarge(
                    f"{self.description}: the value of {batch[0]!r} exceeds the gRPC receive limit of "
                    f"{self.receive_limit} bytes; raise max_reply_bytes=",
                    limit=self.receive_limit,
                )
            if not singles and self.client.nospace():
                singles = True
            else:
                self._reply_estimate = max(self._reply_estimate or 0, self.receive_limit // len(batch) + 1)
            todo.extendleft(reversed(batch))
            return True

        def next_call() -> Call | None:
            if not todo:
                return None
            size = 1 if singles else min(self._read_batch_len(), len(todo))
            batch = [todo.popleft() for _ in range(size)]
            if len(batch) == 1:
                method, request = pb.RANGE, pb.join(pb.range_request(key_bytes(batch[0])))
            else:
                ops = [pb.request_op(pb.OP_RANGE, pb.range_request(key_bytes(k))) for k in batch]
                method, request = pb.TXN, pb.join(pb.txn_request((), ops))
            return Call(
                method,
                request,
                lambda reply: accept(batch, method, reply),
                lambda code: exhausted(batch, code),
            )

        self.client.pipeline(next_call, action="reading", write=False)
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
            into = flat_view(r.into)
            chunk = value[r.offset : r.offset + into.nbytes]
            into[: chunk.nbytes] = chunk
            copied[i] = chunk.nbytes
        return copied

    def scan_prefix(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix`` (a literal byte prefix), fetched keys-only in pages of ``scan_page``."""
        start, end = key_bytes(prefix) or b"\x00", pb.prefix_end(key_bytes(prefix))
        while True:
            request = pb.join(pb.range_request(start, end, limit=self.scan_page, keys_only=True))
            page = pb.parse_range_response(self.client.rpc(pb.RANGE, request, action="listing keys"))
            for kv in page.kvs:
                yield key_str(kv.key)
            if not page.more or not page.kvs:
                return
            start = bytes(page.kvs[-1].key) + b"\x00"

    # KVStore: writes ------------------------------------------------------------------------

    def put_many(self, items: Sequence[tuple[str, Buffer]], *, ttl: float | None = None) -> None:
        if not items:
            return
        latest = {key: flat_view(value) for key, value in items}  # a txn may not name a key twice
        for key, view in latest.items():
            self._check_value(key, view)
        lease = self.client.grant(_ttl_seconds(ttl)) if ttl is not None else 0
        ops = [
            (key, pb.request_op(pb.OP_PUT, pb.put_request(key_bytes(key), view, lease=lease)))
            for key, view in latest.items()
        ]
        self._run_txns(ops, "writing")

    def put(self, key: str, value: Buffer, *, create: bool = False, ttl: float | None = None) -> bool:
        view = flat_view(value)
        self._check_value(key, view)
        lease = self.client.grant(_ttl_seconds(ttl)) if ttl is not None else 0
        raw = key_bytes(key)
        if not create:
            self.client.rpc(
                pb.PUT, pb.join(pb.put_request(raw, view, lease=lease)), action="writing", write=True
            )
            return True
        request = pb.txn_request(
            [pb.compare(raw, pb.CREATE, pb.EQUAL, 0)],
            [pb.request_op(pb.OP_PUT, pb.put_request(raw, view, lease=lease))],
        )
        reply = self.client.rpc(pb.TXN, pb.join(request), action="writing", idempotent=False, write=True)
        written = pb.parse_txn_response(reply).succeeded
        if not written and lease:
            self.client.revoke_quietly(lease)
        return written

    def swap(self, key: str, value: Buffer, *, ttl: float | None = None) -> bytes | None:
        view = flat_view(value)
        self._check_value(key, view)
        lease = self.client.grant(_ttl_seconds(ttl)) if ttl is not None else 0
        request = pb.put_request(key_bytes(key), view, lease=lease, prev_kv=True)
        reply = self.client.rpc(pb.PUT, pb.join(request), action="writing", idempotent=False, write=True)
        previous = pb.parse_put_response(reply)
        return bytes(previous.value) if previous is not None else None

    def commit(
        self, key: str, value: Buffer, *, live_key: str, create: bool, ttl: float | None = None
    ) -> Commit:
        """One txn (kvckpt.stores.etcd.wire.commit_request): put the record and delete the marker
        only while the marker exists (and, with ``create``, the record does not)."""
        view = flat_view(value)
        self._check_value(key, view)
        lease = self.client.grant(_ttl_seconds(ttl)) if ttl is not None else 0
        request = pb.commit_request(key_bytes(key), view, key_bytes(live_key), create=create, lease=lease)
        reply = self.client.rpc(pb.TXN, pb.join(request), action="committing", idempotent=False, write=True)
        written, alive, previous = pb.parse_commit_response(reply)
        if not written and lease:
            self.client.revoke_quietly(lease)
        return Commit(written, alive, None if create else previous)

    def delete_if(self, key: str, expected: Buffer) -> bool:
        request = pb.join(pb.delete_if_request(key_bytes(key), flat_view(expected)))
        reply = self.client.rpc(pb.TXN, request, action="deleting", idempotent=False, write=True)
        return pb.parse_txn_response(reply).succeeded

    def clock(self, key: str) -> float:
        """The cluster's revision: every write raises it by one, on every member alike."""
        request = pb.join(pb.range_request(key_bytes(key), count_only=True))
        reply = self.client.rpc(pb.RANGE, request, action="reading the revision")
        return float(pb.parse_range_response(reply).revision)

    def take(self, key: str) -> bytes | None:
        """DeleteRange with prev_kv: one atomic request, sent once (a resend would find nothing)."""
        request = pb.join(pb.delete_range_request(key_bytes(key), prev_kv=True))
        reply = self.client.rpc(pb.DELETE_RANGE, request, action="deleting", idempotent=False, write=True)
        previous = pb.parse_delete_range_prev_kvs(reply)
        return bytes(previous[0].value) if previous else None

    def expire_many(self, keys: Sequence[str], ttl: float | None) -> list[bool]:
        """Re-attach existing keys to a new lease (or to none) with a value-less put per key."""
        if not keys:
            return []
        unique = list(dict.fromkeys(keys))
        lease = self.client.grant(_ttl_seconds(ttl)) if ttl is not None else 0
        ops = []
        for key in unique:
            raw = key_bytes(key)
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
        ops = [(k, pb.request_op(pb.OP_DELETE, pb.delete_range_request(key_bytes(k)))) for k in unique]
        try:
            self._run_txns(ops, "deleting")
        except StoreFullError:
            calls = (
                Call(pb.DELETE_RANGE, pb.join(pb.delete_range_request(key_bytes(k))), _ignore) for k in unique
            )
            self.client.pipeline(lambda: next(calls, None), action="deleting", write=True)

    def delete_prefix(self, prefix: str, batch: int = 1000) -> int:
        """One DeleteRange over the prefix (atomic, allowed under NOSPACE); returns how many went."""
        raw = key_bytes(prefix)
        request = pb.join(pb.delete_range_request(raw or b"\x00", pb.prefix_end(raw)))
        reply = self.client.rpc(pb.DELETE_RANGE, request, action="deleting", write=True)
        return pb.parse_delete_range_response(reply)
