"""The record's typed item rows: one schema (RecordItem) for the codec, the reader and the management API."""

from __future__ import annotations

from typing import Any

import pytest

from kvckpt import record
from kvckpt.errors import CorruptCheckpointError
from kvckpt.layout import StoredChunk

ROW: list[Any] = ["model.w", [0, 4], 24, "float32", [2, 3], [["g1/0", 16, [1, 2]], ["g1/1", 8, [3]]]]


def test_a_row_decodes_to_a_typed_item_and_back_unchanged() -> None:
    item = record.RecordItem.from_row(ROW)
    assert item == record.RecordItem(
        "model.w",
        (0, 4),
        24,
        "float32",
        (2, 3),
        (StoredChunk("g1/0", 16, (1, 2)), StoredChunk("g1/1", 8, (3,))),
    )
    assert item.to_row() == ROW  # the on-the-wire row is what it always was
    blob: list[Any] = ["extra", None, 0, None, None, []]
    assert record.RecordItem.from_row(blob).to_row() == blob


@pytest.mark.parametrize(
    ("row", "says"),
    [
        (ROW[:5], "not 6"),
        ({"fqn": "x"}, "not 6"),
        (["w", None, -1, None, None, []], "bad item row"),
        (["w", None, True, None, None, []], "bad item row"),
        (["w", "0", 0, None, None, []], "bad size"),
        (["w", None, 4, 7, None, [["k", 4, []]]], "bad dtype"),
        (["w", None, 4, None, [-2], [["k", 4, []]]], "bad size"),
        (["w", None, 4, None, None, [["k", 4]]], "bad chunk"),
        (["w", None, 4, None, None, [["k", 4, [2**64]]]], "bad checksums"),
        (["w", None, 5, None, None, [["k", 4, []]]], "do not add up"),
    ],
)
def test_a_malformed_row_says_what_is_wrong(row: Any, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        record.RecordItem.from_row(row)
    with pytest.raises(
        CorruptCheckpointError, match=f"ns/.metadata: the record's item list is malformed.*{says}"
    ):
        record.decode_items({"items": [ROW, row]}, "ns/.metadata")


def test_chunk_keys_lists_every_key_once() -> None:
    """The chunks of a pack share its key: deleting a checkpoint removes it once."""
    assert record.chunk_keys({"items": [ROW, ROW]}) == ["g1/0", "g1/1"]
    with pytest.raises(CorruptCheckpointError):
        record.chunk_keys({"items": "nope"})
