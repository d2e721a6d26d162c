"""Fixtures: every scenario gets a DCP folder as the reference and a kvckpt store on each backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Backend, _open_backend
from tests.dcp_semantics.places import Place, folder, store


@pytest.fixture
def places(backend: Backend, namespace: str, tmp_path: Path) -> list[Place]:
    """The reference folder first, then the kvckpt store: a scenario runs on both, in that order."""
    return [folder(tmp_path / "dcp"), store(backend.name, backend.id(namespace), backend.options)]


@pytest.fixture(params=["redis", "redis-unix", "etcd"])
def url_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The backends addressed by URL: ``kvckpt.copy`` opens both ends from their ids, and an
    injected client (fakeredis) has none to give it."""
    opened = _open_backend(request, request.param)
    yield opened
    opened.store.close()
