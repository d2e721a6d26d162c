"""Which Redis Cluster node serves a key: hash slots and the slot table read from CLUSTER SLOTS.

A table is immutable; a store swaps in a new one after a refresh, so I/O threads routing a batch never
see it half-updated. Nodes are named ``host:port`` after the caller's ``address_remap``, the name every
other part of the Cluster store uses.
"""

from __future__ import annotations

import binascii
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvckpt._buffers import key_bytes
from kvckpt.errors import InvalidCheckpointIdError

SLOTS = 16384

Address = tuple[str, int]
#: Maps the address a node announces to the one to connect to (NAT, port forwarding, proxies).
AddressRemap = Callable[[Address], Address]


def key_slot(key: str | bytes) -> int:
    """The cluster hash slot of ``key`` (CRC16/XMODEM of the hash tag or key, in C via binascii)."""
    data = key_bytes(key) if isinstance(key, str) else key
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % SLOTS


@functools.cache
def slot_tags() -> tuple[str, ...]:
    """For every slot, the shortest decimal hash tag that lands in it.

    Built by counting until every slot is covered (110,000 numbers; about 50 ms, once per process):
    a search over a fixed range of numbers misses some slots, and a namespace whose record sits in
    one of those could not be committed on a Cluster."""
    tags: list[str | None] = [None] * SLOTS
    missing = SLOTS
    number = 0
    while missing:
        tag = str(number)
        slot = binascii.crc_hqx(tag.encode(), 0) % SLOTS
        if tags[slot] is None:
            tags[slot] = tag
            missing -= 1
        number += 1
    return tuple(t for t in tags if t is not None)


def fence_key_on(fence_key: str | None, owns: Callable[[int], bool]) -> str | None:
    """``fence_key`` plus the hash tag of the first slot ``owns`` accepts: a key for WAIT's fencing
    write on one node. None without a fence key, or for a node that owns no slot (WAIT then falls
    back to PING)."""
    if fence_key is None:
        return None
    return next((f"{fence_key}{{{tag}}}" for slot, tag in enumerate(slot_tags()) if owns(slot)), None)


def colocated_key(key: str, anchor: str) -> str:
    """``key``, or ``key`` plus a hash tag, in the slot of ``anchor``.

    Raises InvalidCheckpointIdError when no tag can move it there: a key whose own ``{...}`` decides
    its slot (a namespace with braces) while the anchor's differs."""
    slot = key_slot(anchor)
    if key_slot(key) == slot:
        return key
    found = f"{key}{{{slot_tags()[slot]}}}"
    if key_slot(found) != slot:
        raise InvalidCheckpointIdError(
            f"{key!r} cannot be placed in the hash slot of {anchor!r}, as a commit on a Redis Cluster "
            "needs: the namespace's braces decide its slot; use a namespace without '{' and '}', or "
            "one whose first '{...}' names a non-empty hash tag"
        )
    return found


def node_name(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


@dataclass(frozen=True)
class SlotTable:
    """Slot → primary, and every node's address (primaries and the replicas CLUSTER SLOTS lists)."""

    owners: tuple[str | None, ...] = (None,) * SLOTS
    addresses: dict[str, Address] = field(default_factory=dict)
    primaries: tuple[str, ...] = ()

    @classmethod
    def parse(cls, reply: Any, asked: Address, remap: AddressRemap | None = None) -> SlotTable:
        """A CLUSTER SLOTS reply, from the node at ``asked``: an empty host means that node's host."""
        if not isinstance(reply, list):
            raise ValueError(f"CLUSTER SLOTS answered {type(reply).__name__}, not a list of ranges")
        owners: list[str | None] = [None] * SLOTS
        addresses: dict[str, Address] = {}
        primaries: list[str] = []

        def name_of(entry: Any) -> str:
            host = entry[0].decode() if isinstance(entry[0], bytes) else str(entry[0])
            address: Address = (host if host and host != "?" else asked[0], int(entry[1]))
            if remap is not None:
                address = remap(address)
            name = node_name(address)
            addresses[name] = address
            return name

        for first, last, primary, *replicas in reply:
            owner = name_of(primary)
            if owner not in primaries:
                primaries.append(owner)
            owners[int(first) : int(last) + 1] = [owner] * (int(last) - int(first) + 1)
            for replica in replicas:
                name_of(replica)
        return cls(tuple(owners), addresses, tuple(primaries))

    def owner(self, slot: int) -> str | None:
        return self.owners[slot]

    def moved(self, slot: int, address: Address) -> SlotTable:
        """This table with ``slot`` served by ``address`` (as a MOVED reply says)."""
        name = node_name(address)
        owners = list(self.owners)
        owners[slot] = name
        primaries = self.primaries if name in self.primaries else (*self.primaries, name)
        return SlotTable(tuple(owners), {**self.addresses, name: address}, primaries)

    def replicas(self) -> tuple[str, ...]:
        return tuple(name for name in self.addresses if name not in self.primaries)
