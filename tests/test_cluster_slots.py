"""Placing a save's liveness marker in its record's hash slot, checked for every slot without a server.

The commit script names the record and the marker, so on a Cluster both must share a slot; a namespace
whose record lands in a slot the marker cannot reach could never be committed."""

from __future__ import annotations

import pytest
from redis.crc import key_slot as redis_key_slot

from kvckpt.errors import InvalidCheckpointIdError
from kvckpt.stores.redis.slots import SLOTS, colocated_key, fence_key_on, key_slot, slot_tags

MARKER = "runs/a/.live/g20261207T210957-3878d831"


def test_every_slot_has_a_tag_that_lands_in_it() -> None:
    tags = slot_tags()
    assert len(tags) == SLOTS
    assert all(redis_key_slot(f"x{{{tag}}}".encode()) == slot for slot, tag in enumerate(tags))


def test_a_marker_is_placed_in_the_slot_of_any_record() -> None:
    """Before, the tag search counted to 100,000 and missed 112 slots: a save to such a namespace
    failed on a Cluster with InvalidCheckpointIdError."""
    for slot, tag in enumerate(slot_tags()):
        anchor = f"ns{{{tag}}}/.metadata"
        placed = colocated_key(MARKER, anchor)
        assert key_slot(placed) == slot == redis_key_slot(placed.encode())


def test_a_key_already_in_the_slot_is_left_alone() -> None:
    assert colocated_key(MARKER, MARKER) == MARKER


def test_a_namespace_whose_braces_pick_another_slot_is_refused_with_advice() -> None:
    with pytest.raises(InvalidCheckpointIdError, match="use a namespace without"):
        colocated_key("{a}/.live/g1", "{b}/.metadata")


def test_a_fence_key_lands_on_the_first_slot_a_node_owns() -> None:
    owned = range(16000, SLOTS)
    key = fence_key_on("fence", lambda slot: slot in owned)
    assert key is not None and key_slot(key) == 16000
    assert fence_key_on("fence", lambda slot: False) is None
    assert fence_key_on(None, lambda slot: True) is None
