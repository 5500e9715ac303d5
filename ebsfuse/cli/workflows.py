"""Command-line parsing of the workflows: `browse`, `restore` and `hash`.

Kept apart from cli.py (as tools_cli.py is); `register` adds the sub-commands. Each command
turns its arguments into one library call (browse.py, restore.py, hashing.py) and prints a
short summary, or one JSON document with `--json`. Bad input and failures are one line on stderr
with a non-zero exit; Ctrl-C or SIGTERM exits 130 after cleaning up.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from types import FrameType

from .options import (
    PROG,
    add_cache_dir_arguments,
    add_client_arguments,
    add_daemon_arguments,
    cache_dir_of,
    client_settings,
    mount_options,
    positive_int,
)


def _partition(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a partition number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: partitions are numbered from 1 (0: whole disk)"
        )
    return value


def _chain_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the commands that mount the snapshot privately (browse, restore)."""
    add_client_arguments(p)
    p.add_argument(
        "--partition",
        type=_partition,
        metavar="N",
        help="partition number (as in <snapshot-id>-partN.img; 0 = the whole disk); "
        "default: the only mountable filesystem",
    )
    add_daemon_arguments(p)


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("browse", help="mount a snapshot's filesystem read-only at a directory")
    b.add_argument("snapshot", metavar="SNAPSHOT_ID")
    b.add_argument("target", metavar="DIR", help="an empty directory; `ebsfuse unmount DIR` undoes")
    _chain_arguments(b)
    b.add_argument("--keeper-fd", type=int, help=argparse.SUPPRESS)
    b.set_defaults(func=cmd_browse)

    r = sub.add_parser("restore", help="copy a file or directory out of a snapshot")
    r.add_argument("snapshot", metavar="SNAPSHOT_ID")
    r.add_argument("path", metavar="PATH", help="path inside the snapshot's filesystem")
    r.add_argument("dest", metavar="DEST", help="new name, or an existing directory to copy into")
    _chain_arguments(r)
    r.add_argument("--json", action="store_true", help="print the result as one JSON document")
    r.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    r.set_defaults(func=cmd_restore)

    h = sub.add_parser("hash", help="SHA-256 (and MD5) of a snapshot's whole disk image")
    h.add_argument("snapshot", metavar="SNAPSHOT_ID")
    add_client_arguments(h)
    add_cache_dir_arguments(h)
    h.add_argument("--md5", action="store_true", help="also compute the MD5")
    h.add_argument(
        "--workers", type=positive_int, default=32, help="requests in flight (default 32)"
    )
    h.add_argument("--json", action="store_true", help="print the result as one JSON document")
    h.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    h.set_defaults(func=cmd_hash)


# -- helpers --------------------------------------------------------------------------------


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("botocore").setLevel(logging.ERROR)


def _sigterm_interrupts() -> None:
    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, on_term)


def _keeper_argv(args: argparse.Namespace) -> list[str]:
    """The keeper's command line: this command's options again, with absolute paths."""
    argv = [sys.executable, "-m", "ebsfuse", "browse"]
    for flag, value in (
        ("--region", args.region),
        ("--profile", args.profile),
        ("--endpoint-url", args.endpoint_url),
        ("--audit-log", os.path.abspath(args.audit_log) if args.audit_log else None),
        ("--log-file", os.path.abspath(args.log_file) if args.log_file else None),
        ("--partition", None if args.partition is None else str(args.partition)),
    ):
        if value is not None:
            argv += [flag, value]
    argv += ["--cache-size", str(args.cache_size), "--max-concurrency", str(args.max_concurrency)]
    argv += ["--log-level", args.log_level]
    if args.cache_dir:
        argv += ["--cache-dir", os.path.abspath(args.cache_dir)]
    if args.cache_dir_size is not None:
        argv += ["--cache-dir-size", str(args.cache_dir_size)]
    for base in args.base_ids:
        argv += ["--base", base]
    return argv


# -- commands -------------------------------------------------------------------------------


def cmd_browse(args: argparse.Namespace) -> int:
    from ..workflows.browse import BrowseInterrupted, run_keeper, start_browse

    if args.keeper_fd is not None:
        return run_keeper(
            args.snapshot, args.target, args.partition, mount_options(args, [], ""), args.keeper_fd
        )
    _setup_logging()
    _sigterm_interrupts()
    try:
        message = start_browse(args.snapshot, args.target, _keeper_argv(args))
    except BrowseInterrupted as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 130
    print(f"{message}; undo with: ebsfuse unmount {os.path.abspath(args.target)}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from ..workflows.chain import human
    from ..workflows.restore import RestoreInterrupted, restore

    _setup_logging()
    _sigterm_interrupts()
    try:
        result = restore(
            args.snapshot,
            args.path,
            args.dest,
            partition=args.partition,
            mount_options=mount_options(args, [], ""),
        )
    except RestoreInterrupted as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result.as_dict()))
    elif not args.quiet:
        counts = [
            f"{n} {what}{'s' if n != 1 else ''}"
            for n, what in (
                (result.files, "file"),
                (result.directories, "directory" if result.directories == 1 else "directorie"),
                (result.symlinks, "symlink"),
                (result.other, "special file"),
            )
            if n
        ]
        print(
            f"restored {result.source} -> {result.dest}: {', '.join(counts) or 'nothing'}, "
            f"{human(result.bytes_restored)} ({result.bytes_restored} bytes); fetched "
            f"{human(result.bytes_fetched)} ({result.blocks_fetched} blocks) from "
            f"{result.snapshot_id} in {result.seconds:.1f} s"
        )
    return 0


def cmd_hash(args: argparse.Namespace) -> int:
    from ..ebs.client import EbsClient, RetryPolicy
    from ..tools.hashing import HashInterrupted, hash_snapshot
    from ..tools.progress import human_bytes, progress_wanted

    _setup_logging()
    _sigterm_interrupts()
    client = EbsClient(client_settings(args, max_pool_connections=args.workers))
    try:
        result = hash_snapshot(
            client,
            args.snapshot,
            workers=args.workers,
            md5=args.md5,
            policy=RetryPolicy(budget_s=args.block_timeout),
            progress=progress_wanted(args.quiet or args.json),
            cache_dir=cache_dir_of(args),
            cache_dir_size=args.cache_dir_size,
            base_ids=args.base_ids,
        )
    except HashInterrupted as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    # BSD tag format (`sha256sum --tag`): unambiguous with two digests, and `sha256sum -c`
    # checks it against a downloaded <snapshot-id>.img.
    name = f"{result.snapshot_id}.img"
    print(f"SHA256 ({name}) = {result.sha256}")
    if result.md5:
        print(f"MD5 ({name}) = {result.md5}")
    if not args.quiet:
        print(
            f"{PROG}: hashed {human_bytes(result.size)}: {result.blocks_fetched} blocks fetched, "
            f"{result.hole_blocks} unwritten blocks hashed as zeros, in {result.seconds:.1f} s",
            file=sys.stderr,
        )
    return 0
