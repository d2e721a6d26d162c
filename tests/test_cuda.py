"""CUDA tensors: saved from the device (strided views included), loaded into device targets.

The suite's machines have no GPU; these run wherever torch sees one.
"""

from __future__ import annotations

import pytest
import torch

import kvckpt
from tests.harness.servers import RedisServer
from tests.helpers import bits_equal, random_tensor

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; torch sees none here"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def cpu_reference() -> dict[str, torch.Tensor]:
    base = random_tensor((300, 200), torch.float32, seed=1)
    return {
        "f32": base,
        "transposed": base.t(),
        "strided": base[::3, 1::2],
        "bf16": random_tensor((1000, 700), torch.bfloat16, seed=2),  # several 1 MiB chunks
        "f8": random_tensor((64, 64), torch.float8_e4m3fn, seed=3),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
    }


def test_cuda_save_and_load(redis_server: RedisServer, namespace: str) -> None:
    reference = cpu_reference()
    on_device = {name: t.contiguous().cuda() for name, t in reference.items()}
    on_device["transposed"] = on_device["f32"].t()  # a strided view on the device
    on_device["strided"] = on_device["f32"][::3, 1::2]
    kvckpt.save(on_device, redis_server.url(f"{namespace}/cuda"), chunk_bytes=1 << 20)

    into_device = {name: torch.zeros(t.shape, dtype=t.dtype, device="cuda") for name, t in reference.items()}
    kvckpt.load(into_device, redis_server.url(f"{namespace}/cuda"))
    for name, expected in reference.items():
        assert into_device[name].device.type == "cuda", name
        assert bits_equal(into_device[name].cpu(), expected.contiguous()), name

    # Device-saved checkpoints load on the host, and host-saved ones onto the device.
    into_host = {name: torch.zeros(t.shape, dtype=t.dtype) for name, t in reference.items()}
    kvckpt.load(into_host, redis_server.url(f"{namespace}/cuda"))
    kvckpt.save(reference, redis_server.url(f"{namespace}/cpu"))
    from_host = {name: torch.zeros(t.shape, dtype=t.dtype, device="cuda") for name, t in reference.items()}
    kvckpt.load(from_host, redis_server.url(f"{namespace}/cpu"))
    for name, expected in reference.items():
        assert bits_equal(into_host[name], expected.contiguous()), name
        assert bits_equal(from_host[name].cpu(), expected.contiguous()), name
