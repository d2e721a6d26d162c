"""The ``kvckpt`` command (also ``python -m kvckpt``): list, inspect, verify, remove, copy, drain checkpoints.

Exit status: 0 ok, 1 failure, 2 usage, 130 interrupted, 141 stdout closed early (``| head``). A
failure prints one line (``--debug`` adds the traceback);
every line printed passes through URL redaction, so passwords never reach a terminal or a log.
Only ``cp``, ``drain`` and ``demo`` import torch. ``drain`` has its own exit statuses (docs/cli.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import kvckpt
from kvckpt import humanize, layout
from kvckpt.cli.jobs import cmd_cp, cmd_demo, cmd_drain, cmd_server
from kvckpt.cli.output import emit_json, out, show
from kvckpt.cli.progress import progress_bar
from kvckpt.errors import CorruptCheckpointError, KVCheckpointError
from kvckpt.humanize import printable
from kvckpt.management import api as manage
from kvckpt.management import orphans
from kvckpt.management.orphans import Orphan
from kvckpt.registry import parse_url
from kvckpt.urls import StoreURL, redact, redact_url

#: How many verify problems a terminal gets; --json gets them all.
SHOWN_PROBLEMS = 20


# Commands --------------------------------------------------------------------------------------


def orphan_line(found: list[Orphan], where: StoreURL) -> str:
    command = f"`kvckpt gc {where}`"
    return f"orphans: {orphans.summary(found)} under {where.display()}; {command} removes them"


def named(where: StoreURL, namespace: str) -> str:
    """How a listing names ``namespace``: as its characters are, with control characters escaped
    before columns are measured."""
    return printable(where.with_namespace(namespace).display(), limit=100_000)


def cmd_ls(args: argparse.Namespace) -> int:
    infos = manage.list_checkpoints(args.prefix)
    if args.json:
        emit_json([{**i.to_dict(), "created_at": humanize.timestamp(i.created)} for i in infos])
        return 0
    where = parse_url(args.prefix)
    found = manage.list_orphans(args.prefix)
    if not infos:
        show(f"no committed checkpoints under {named(where, where.namespace)}")
    else:
        rows = [
            [
                named(where, i.namespace) + (" (rank-local)" if i.rank_local else ""),
                "-" if i.step is None else str(i.step),
                f"{humanize.timestamp(i.created)} ({humanize.age(i.created)})",
                humanize.size(i.total_bytes),
                str(i.num_tensors),
                str(i.world_size),
                "-" if i.expires_at is None else humanize.age(i.expires_at),
            ]
            for i in infos
        ]
        headers = ["CHECKPOINT", "STEP", "COMMITTED", "SIZE", "TENSORS", "RANKS", "EXPIRES"]
        show(humanize.table(headers, rows, right=(1, 3, 4, 5)))
        total = sum(i.total_bytes for i in infos)
        latest = named(where, infos[-1].namespace)
        show(f"{len(infos)} checkpoint(s), {humanize.size(total)}; latest: {latest}")
    if found:
        show(orphan_line(found, where))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    found = manage.info(args.checkpoint_id)
    if args.json:
        emit_json({**found.to_dict(), "created_at": humanize.timestamp(found.created)})
        return 0
    where = parse_url(args.checkpoint_id)
    expires = "never" if found.expires_at is None else humanize.age(found.expires_at)
    rank_local = " (rank-local records)" if found.rank_local else ""
    show(f"checkpoint  {named(where, found.namespace)}{rank_local}")
    when = f"{humanize.timestamp(found.created)} ({humanize.age(found.created)})"
    out(f"committed   {when} by {found.world_size} rank(s)")
    out(f"generation  {found.save_id}, {found.num_keys} key(s), expires {expires}")
    out()
    rows = [
        [
            printable(e.fqn, limit=100_000),
            e.dtype or "(object)",
            "-" if e.shape is None else "x".join(map(str, e.shape)) or "scalar",
            str(e.chunks),
            humanize.size(e.nbytes),
        ]
        for e in found.entries
    ]
    total = [
        "total",
        "",
        f"{found.num_tensors} tensor(s)",
        str(found.num_keys),
        humanize.size(found.total_bytes),
    ]
    show(humanize.table(["FQN", "DTYPE", "SHAPE", "CHUNKS", "BYTES"], [*rows, total], right=(3, 4)))
    if found.step is not None:
        out(f"step        {found.step}")
    here = [o for o in manage.list_orphans(args.checkpoint_id) if o.namespace == found.namespace]
    if here:
        show(orphan_line(here, where))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    total = manage.info(args.checkpoint_id).total_bytes
    started = time.perf_counter()
    try:
        with progress_bar(total, "verify", not args.json) as advance:
            result = manage.verify(args.checkpoint_id, progress=advance)
    except CorruptCheckpointError as exc:
        problems: list[str] = list(getattr(exc, "problems", []))
        if args.json:
            emit_json({"checkpoint_id": redact_url(args.checkpoint_id), "ok": False, "problems": problems})
            return 1
        for problem in problems[:SHOWN_PROBLEMS]:
            print(redact(f"  {problem}"), file=sys.stderr)
        if len(problems) > SHOWN_PROBLEMS:
            print(f"  … and {len(problems) - SHOWN_PROBLEMS} more (--json lists all)", file=sys.stderr)
        raise
    seconds = time.perf_counter() - started
    if args.json:
        emit_json({**vars(result), "ok": True, "seconds": seconds})
        return 0
    what = "sizes and checksums" if result.checksums else "sizes only (saved with checksums=False)"
    where = parse_url(args.checkpoint_id)
    show(
        f"ok: {named(where, where.namespace)}: {result.num_keys} key(s), {humanize.size(result.nbytes)} "
        f"verified ({what}) in {humanize.duration(seconds)} ({humanize.rate(result.nbytes, seconds)})"
    )
    here = [o for o in manage.list_orphans(args.checkpoint_id) if o.namespace == where.namespace]
    if here:
        show(orphan_line(here, where))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    found = manage.gc(args.prefix, dry_run=args.dry_run)
    url = parse_url(args.prefix)

    def generation(orphan: Orphan) -> str:
        return url.with_namespace(orphan.namespace).to_url(redact=True) + "/" + orphan.save_id

    def line(orphan: Orphan) -> str:
        if orphan.marker_only:
            marker = named(url, layout.unfinished_key(orphan.namespace))
            return f"{verb} {marker}: what save {orphan.save_id} left, dying before it wrote any data"
        shown = named(url, orphan.namespace) + "/" + orphan.save_id
        return f"{verb} {shown}: {orphan.num_keys} key(s), {humanize.size(orphan.nbytes)}"

    verb = "would remove" if args.dry_run else "removed"
    rows = [
        {
            "generation": generation(o),
            "num_keys": o.num_keys,
            "nbytes": o.nbytes,
            "marker_only": o.marker_only,
        }
        for o in found
    ]
    total = (
        f"{verb} what {orphans.summary(found)}" if found else f"{verb} nothing: no dead save left anything"
    )
    return report_removal(args, rows, [line(o) for o in found], total)


def report_removal(args: argparse.Namespace, rows: list[dict[str, Any]], lines: list[str], total: str) -> int:
    """What gc and keep-last removed (or, with --dry-run, would): JSON rows, or a line each and a total."""
    if args.json:
        emit_json({"dry_run": args.dry_run, "removed": rows})
        return 0
    for line in lines:
        show(line)
    show(total)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    results = [(cid, manage.delete(cid)) for cid in args.checkpoint_ids]
    if args.json:
        emit_json([{"checkpoint_id": redact_url(cid), "removed": removed} for cid, removed in results])
    else:
        for cid, removed in results:
            where = parse_url(cid)
            if removed:
                show(f"removed {named(where, where.namespace)}")
            else:
                print(f"kvckpt: error: no committed checkpoint at {where}", file=sys.stderr)
    return 0 if all(removed for _, removed in results) else 1


def cmd_keep_last(args: argparse.Namespace) -> int:
    doomed = manage.keep_last(args.prefix, args.n, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    freed = humanize.size(sum(d.total_bytes for d in doomed))
    where = parse_url(args.prefix)
    lines = [
        f"{verb} {named(where, d.namespace)} ({humanize.size(d.total_bytes)}, {humanize.age(d.created)})"
        for d in doomed
    ]
    return report_removal(
        args,
        [d.to_dict() for d in doomed],
        lines,
        f"{verb} {len(doomed)} checkpoint(s), {freed}; kept the newest {args.n}",
    )


# Parser ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)  # SUPPRESS: keep a --debug given before COMMAND
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    parser = argparse.ArgumentParser(
        prog="kvckpt",
        description="Manage PyTorch DCP checkpoints stored in Redis / etcd by kvckpt.",
        epilog="IDs and prefixes are URLs such as redis://host:6379/0/run1/step100; a password may come "
        "from REDISCLI_AUTH. See docs/cli.md.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    parser.add_argument("--version", action="version", version=f"kvckpt {kvckpt.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str, json: bool = True) -> Any:
        parents = [common, as_json] if json else [common]
        p = sub.add_parser(name, help=help, description=help, parents=parents)
        p.set_defaults(func=func)
        return p

    p = command("ls", cmd_ls, "list committed checkpoints at or below a prefix, oldest first")
    p.add_argument("prefix", help="e.g. redis://host:6379/0/run1")
    p = command("info", cmd_info, "show a checkpoint's tensors: fqn, dtype, shape, chunks, bytes")
    p.add_argument("checkpoint_id")
    p = command("verify", cmd_verify, "re-read every chunk and check sizes and checksums")
    p.add_argument("checkpoint_id")
    p = command("rm", cmd_rm, "delete checkpoints (record first, then their keys)")
    p.add_argument("checkpoint_ids", nargs="+", metavar="checkpoint_id")
    p = command("keep-last", cmd_keep_last, "delete all but the N newest checkpoints under a prefix")
    p.add_argument("prefix")
    p.add_argument("n", type=non_negative, metavar="N")
    p.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    p = command("gc", cmd_gc, "remove what saves that died left under a prefix (never a live save)")
    p.add_argument("prefix")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p = command("cp", cmd_cp, "copy a checkpoint between kvckpt URLs and DCP folders (either way)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already at DST")
    p.add_argument("--ttl", type=float, help="seconds until a copy in a store expires")
    p.add_argument("--buffer-mib", type=positive, default=64, help="MiB of source data held at once (64)")
    p = command("drain", cmd_drain, "copy new checkpoints to a folder or s3:// as they appear", json=False)
    p.add_argument("src", help="store prefix to follow, e.g. redis://host:6379/0/run1")
    p.add_argument("dst", help="local folder or fsspec URL (s3://bucket/run1)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--every", type=positive, default=1, help="copy every Nth checkpoint (default 1)")
    when.add_argument("--interval", type=float, help="instead: the newest one every SECONDS")
    p.add_argument("--keep", type=positive, help="keep the newest K copies at DST (default: all)")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between looks at the store (2)")
    p.add_argument("--once", action="store_true", help="copy what is due now, then exit")
    p.add_argument("--buffer-mib", type=positive, default=32, help="MiB of source data held at once (32)")
    p.add_argument("--max-mib-per-s", type=float, help="cap each copy's average rate (default: none)")
    p.add_argument("--storage-option", action="append", default=[], type=key_value, metavar="KEY=VALUE")
    p = command(
        "demo",
        cmd_demo,
        "train, checkpoint, crash and resume on a private redis-server (or --url)",
        json=False,
    )
    p.add_argument(
        "--url", help="run against this store instead, under a fresh sub-namespace of its NAMESPACE"
    )
    p.add_argument("--steps", type=positive, default=16, help="training steps (default 16)")
    p.add_argument("--every", type=positive, default=4, help="checkpoint every N steps (default 4)")
    p.add_argument("--keep", type=positive, default=2, help="checkpoints kept by keep_last (default 2)")
    p = command(
        "server", cmd_server, "run a local redis-server set up for checkpoints, in the foreground", json=False
    )
    p.add_argument("--port", type=tcp_port, default=6379, help="loopback port (default 6379)")
    p.add_argument("--redis-server", help="the redis-server binary (default: a jemalloc build if installed)")
    p.add_argument("--maxmemory", help="e.g. 8gb (default: no limit)")
    return parser


def non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def key_value(text: str) -> str:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (an fsspec storage option), got {text!r}")
    return text


def positive(text: str) -> int:
    value = non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def tcp_port(text: str) -> int:
    value = positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {text!r}")
    return value


def describe(exc: BaseException) -> str:
    """One line: kvckpt's own messages already say what to do; others get their type for context."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, KVCheckpointError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except KeyboardInterrupt:
        print("kvckpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kvckpt info … | head`: the reader has all it wanted
        quiet_stdout()
        return 141
    except Exception as exc:
        if args.debug:
            print(redact(traceback.format_exc()), file=sys.stderr, end="")
        hint = "" if isinstance(exc, KVCheckpointError) or args.debug else " (--debug shows the traceback)"
        print(redact(f"kvckpt: error: {describe(exc)}{hint}"), file=sys.stderr)
        return 1
    finally:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            quiet_stdout()


def quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's own last flush does not complain."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
