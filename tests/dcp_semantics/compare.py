"""Outcomes the scenarios compare: nested state dicts bit for bit, a rank's failure, an upload."""

from __future__ import annotations

import io
from concurrent.futures import Future
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse
from torch.distributed.tensor import DTensor

from tests.helpers import bits_equal


def assert_same(actual: Any, expected: Any, path: str = "state") -> None:
    """``actual`` equals ``expected`` bit for bit, recursively; the failure names the path."""
    if isinstance(expected, ShardedTensor):
        assert isinstance(actual, ShardedTensor), f"{path}: {type(actual).__name__}, not a ShardedTensor"
        mine, theirs = actual.local_shards(), expected.local_shards()
        assert [s.metadata for s in mine] == [s.metadata for s in theirs], f"{path}: shards differ"
        for a, e in zip(mine, theirs, strict=True):
            assert bits_equal(a.tensor, e.tensor), f"{path}: shard at {e.metadata.shard_offsets} differs"
    elif isinstance(expected, DTensor):
        assert isinstance(actual, DTensor), f"{path}: {type(actual).__name__}, not a DTensor"
        assert actual.placements == expected.placements, f"{path}: placements differ"
        assert bits_equal(actual.to_local(), expected.to_local()), f"{path}: local shards differ"
    elif isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: {type(actual).__name__}, not a tensor"
        assert bits_equal(actual, expected), f"{path}: tensors differ"
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), f"{path}: keys {sorted(actual)} != {sorted(expected)}"
        for key, value in expected.items():
            assert_same(actual[key], value, f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), f"{path}: {actual!r}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{path}[{i}]")
    elif isinstance(expected, io.BytesIO):
        assert isinstance(actual, io.BytesIO), f"{path}: {type(actual).__name__}, not BytesIO"
        assert actual.getvalue() == expected.getvalue(), f"{path}: bytes differ"
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def rank_failure(exc: BaseException, rank: int = 0) -> BaseException:
    """The exception a rank raised, out of DCP's CheckpointException (rank -> (exception, trace))."""
    assert isinstance(exc, CheckpointException), repr(exc)
    failure = exc.failures[rank]
    return failure[0] if isinstance(failure, tuple) else failure


def upload_of(response: Any) -> Future[Any]:
    """The upload's future from what ``async_save`` returned (a Future, or an AsyncSaveResponse
    when the stager stages in the background), once staging is done."""
    if isinstance(response, AsyncSaveResponse):
        response.staging_completion.result()
        return response.upload_completion
    assert isinstance(response, Future), type(response)
    return response
