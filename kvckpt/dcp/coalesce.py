"""Range reads of one key that overlap or touch are fetched as one request.

A resharding reader widens each range to whole checksum blocks, so two ranges of one chunk often
share a block; a backend without native byte ranges would even fetch the whole value once per range.
Merging such requests costs one copy of the merged bytes into the callers' buffers, so ranges that
stand alone keep reading straight into their own buffer. Where ranges of one key do not touch, a
merged request is at most twice the bytes its reads want: offsets come from the record, and one far
from the others (a damaged or hostile record) must not size a buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvckpt.store import KVStore, RangeRead


@dataclass
class _Span:
    key: str
    start: int
    stop: int
    members: list[int] = field(default_factory=list)
    wanted: int = 0


def _joins(span: _Span, offset: int, size: int, touching_only: bool) -> bool:
    if offset <= span.stop:
        return True
    return not touching_only and offset + size - span.start <= 2 * (span.wanted + size)


def merge_spans(reads: Sequence[RangeRead], *, touching_only: bool) -> list[_Span]:
    """Group reads per key; with ``touching_only`` a gap between two ranges keeps them apart, else
    a gap that would make the span more than twice the bytes its reads want."""
    spans: list[_Span] = []
    order = sorted(range(len(reads)), key=lambda i: (reads[i].key, reads[i].offset))
    for i in order:
        read = reads[i]
        size = read.into.nbytes
        stop = read.offset + size
        last = spans[-1] if spans else None
        if last is not None and last.key == read.key and _joins(last, read.offset, size, touching_only):
            last.stop = max(last.stop, stop)
            last.members.append(i)
            last.wanted += size
        else:
            spans.append(_Span(read.key, read.offset, stop, [i], size))
    return spans


def _bytes(view: memoryview) -> memoryview:
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def read_coalesced(store: KVStore, reads: Sequence[RangeRead]) -> list[int]:
    """``store.read_into_many(reads)`` with merged requests; the same per-read byte counts."""
    spans = merge_spans(reads, touching_only=store.capabilities.native_ranges)
    requests = [
        reads[span.members[0]]
        if len(span.members) == 1
        else RangeRead(span.key, span.start, memoryview(bytearray(span.stop - span.start)))
        for span in spans
    ]
    copied = [0] * len(reads)
    for span, request, count in zip(spans, requests, store.read_into_many(requests), strict=True):
        if len(span.members) == 1:
            copied[span.members[0]] = count
            continue
        for i in span.members:
            into = _bytes(reads[i].into)
            lo = reads[i].offset - span.start
            n = max(0, min(count - lo, into.nbytes))
            into[:n] = request.into[lo : lo + n]
            copied[i] = n
    return copied
