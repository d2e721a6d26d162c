"""Fixtures: every scenario gets a DCP folder as the reference and a kvckpt store on each backend."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvckpt.registry import open_store
from tests.conftest import Backend, _open_backend
from tests.dcp_semantics.places import Place, folder, store


@pytest.fixture
def places(backend: Backend, namespace: str, tmp_path: Path) -> list[Place]:
    """The reference folder first, then the kvckpt store: a scenario runs on both, in that order."""
    return [folder(tmp_path / "dcp"), store(backend.name, backend.id(namespace), backend.options)]


@pytest.fixture(params=["redis", "redis-unix", "fakeredis", "etcd"])
def url_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Every backend addressed by URL (fakeredis as ``fakeredis://NAME/…``, an in-process server):
    ``kvckpt.copy`` and DCP's storage detection open stores from checkpoint ids alone."""
    if request.param == "fakeredis":
        name = f"semantics-{uuid.uuid4().hex[:8]}"
        opened = Backend(
            "fakeredis", lambda ns: f"fakeredis://{name}/{ns}", {}, open_store(f"fakeredis://{name}/inspect")
        )
    else:
        opened = _open_backend(request, request.param)
    yield opened
    opened.store.close()
