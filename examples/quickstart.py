"""Save and load a model + optimizer through a private redis-server, and print what it took."""

from __future__ import annotations

import time

import torch
import torch.distributed.checkpoint as dcp

import kvckpt
from kvckpt.testing.servers import RedisServer


def main() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024))
    optim = torch.optim.AdamW(model.parameters())
    model(torch.randn(8, 1024)).sum().backward()
    optim.step()
    state = {"model": model.state_dict(), "optim": optim.state_dict(), "step": 1}
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3

    with RedisServer() as server:
        url = server.unix_url("quickstart/step1")
        started = time.perf_counter()
        dcp.save(state, storage_writer=kvckpt.KVStorageWriter(url))
        saved = time.perf_counter() - started

        restored = {"model": model.state_dict(), "optim": optim.state_dict(), "step": 0}
        started = time.perf_counter()
        kvckpt.load(restored, url)
        loaded = time.perf_counter() - started
        assert restored["step"] == 1
        print(f"checkpoint {url}: ~{nbytes / 2**20:.0f} MiB, save {saved:.2f} s, load {loaded:.2f} s")


if __name__ == "__main__":
    main()
