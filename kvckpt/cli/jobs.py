"""The ``kvckpt`` commands that move data or run a process: cp, drain, demo, server.

Each imports what it needs (torch, a redis-server) only when it runs, so the other commands start fast.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from typing import Any

from kvckpt import humanize
from kvckpt.cli.output import emit_json, out
from kvckpt.cli.progress import progress_bar
from kvckpt.errors import KVCheckpointError
from kvckpt.management import api as manage


def cmd_cp(args: argparse.Namespace) -> int:
    from kvckpt.registry import owns
    from kvckpt.tiered.copy import copy

    started = time.perf_counter()
    total = manage.info(args.src).total_bytes if owns(args.src) else folder_bytes(args.src)
    with progress_bar(total, "copy", not args.json) as advance:
        result = copy(
            args.src,
            args.dst,
            overwrite=args.overwrite,
            ttl=args.ttl,
            progress=advance,
            group_bytes=args.buffer_mib << 20,
        )
    seconds = time.perf_counter() - started
    if args.json:
        emit_json({**vars(result), "seconds": seconds})
        return 0
    out(
        f"copied {result.source} -> {result.destination}: {result.items} item(s), "
        f"{humanize.size(result.nbytes)} in {humanize.duration(seconds)} "
        f"({humanize.rate(result.nbytes, seconds)})"
    )
    return 0


def folder_bytes(path: str) -> int | None:
    """About what a DCP folder holds (its files); None when it is not a folder."""
    try:
        return sum(entry.stat().st_size for entry in os.scandir(path) if entry.is_file())
    except OSError:
        return None


def cmd_drain(args: argparse.Namespace) -> int:
    from kvckpt.tiered.drain import run_command

    options = {key: _option_value(value) for key, _, value in (o.partition("=") for o in args.storage_option)}
    return run_command(
        args.src,
        args.dst,
        once=args.once,
        every=args.every,
        interval=args.interval,
        keep=args.keep,
        poll=args.poll,
        group_bytes=args.buffer_mib << 20,
        max_rate=None if args.max_mib_per_s is None else args.max_mib_per_s * (1 << 20),
        storage_options=options,
    )


def _option_value(text: str) -> Any:
    """A storage option's value: JSON when it parses (8388608, true, {...}), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def cmd_demo(args: argparse.Namespace) -> int:
    from kvckpt.cli.demo import run_demo

    return 0 if run_demo(url=args.url, steps=args.steps, every=args.every, keep=args.keep, say=out) else 1


def cmd_server(args: argparse.Namespace) -> int:
    from kvckpt.cli.local_server import (
        REDIS_KEEP_FREED_MEMORY_ENV,
        RedisServer,
        ServerStartError,
        find_redis_server,
    )

    with socket.socket() as probe:  # redis-server would exit and leave us waiting for it
        try:
            probe.bind(("127.0.0.1", args.port))
        except OSError:
            raise KVCheckpointError(
                f"port {args.port} is in use on 127.0.0.1; pick another with --port"
            ) from None
    binary = args.redis_server or find_redis_server()
    server = RedisServer(port=args.port, binary=binary, environment=dict(REDIS_KEEP_FREED_MEMORY_ENV))
    if args.maxmemory is not None:
        server.settings["maxmemory"] = args.maxmemory
    signal.signal(signal.SIGTERM, _interrupt)  # kill / systemd stop the server as Ctrl-C does
    try:
        try:
            server.start()
        except ServerStartError as exc:
            raise KVCheckpointError(" ".join(str(exc).split())) from None
        out(f"redis-server ({server.binary}) listening on 127.0.0.1:{server.port} and a unix socket")
        out("settings: maxmemory-policy noeviction, no RDB/AOF persistence (data is lost when it stops)")
        out(allocator_note(server.allocator()))
        out(f"use: {server.url('NAMESPACE')}")
        out(f" or: {server.unix_url('NAMESPACE')}")
        out("Ctrl-C stops it.")
        assert server.process is not None
        server.process.wait()
        print("kvckpt: error: redis-server exited", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.cleanup()


def allocator_note(allocator: str) -> str:
    """What the running server's allocator (INFO memory's mem_allocator) does with freed memory."""
    if allocator.startswith("jemalloc"):
        return f"allocator: {allocator}, set to keep freed pages mapped, so saves after deletes reuse them"
    return (
        f"allocator: {allocator or 'unknown'}; it may return freed pages to the system, so a save after "
        "deletes can fault memory in again (a jemalloc build avoids that: docs/operations-redis.md)"
    )


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt
