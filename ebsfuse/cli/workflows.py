"""Command-line parsing of the workflows: `browse`, `restore`, `changes` and `hash`.

Kept apart from cli.py (as tools_cli.py is); `register` adds the sub-commands. Each command
turns its arguments into one library call (browse.py, restore.py, changes.py, hashing.py) and
prints a
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
from typing import Any

from ..ebs.errors import UsageError
from ..tools.progress import progress_wanted
from .options import (
    PROG,
    add_cache_dir_arguments,
    add_client_arguments,
    add_daemon_arguments,
    cache_dir_of,
    client_settings,
    mount_options,
    point_in_time,
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

    r = sub.add_parser("restore", help="copy files or directories out of a snapshot")
    r.add_argument(
        "items",
        nargs="+",
        metavar="SNAPSHOT_ID PATH... DEST",
        help="the snapshot (none with --volume), paths inside its filesystem, and DEST: a new "
        "name, or an existing directory to copy into (which it must be for several paths)",
    )
    _chain_arguments(r)
    r.add_argument(
        "--volume",
        metavar="VOLUME_ID",
        help="restore from this volume's newest completed snapshot started at or before --at",
    )
    r.add_argument(
        "--at",
        type=point_in_time,
        metavar="TIME",
        help="with --volume: ISO 8601 (UTC unless an offset is given), yesterday, 3 days ago...",
    )
    r.add_argument(
        "--manifest",
        metavar="FILE",
        help="write one JSON line per restored entry: paths, kind, size, SHA-256, owner, mode...",
    )
    r.add_argument(
        "--verify",
        action="store_true",
        help="read every restored file back and compare it with the snapshot's bytes",
    )
    r.add_argument("--json", action="store_true", help="print the result as one JSON document")
    r.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    r.set_defaults(func=cmd_restore)

    c = sub.add_parser(
        "changes", help="files added, deleted, modified or changed in metadata between snapshots"
    )
    c.add_argument("first", metavar="SNAPSHOT_A", help="the earlier snapshot")
    c.add_argument("second", metavar="SNAPSHOT_B", help="the later snapshot")
    _chain_arguments(c)
    c.add_argument(
        "--path", default="/", metavar="PREFIX", help="compare only under this directory"
    )
    c.add_argument(
        "--deep",
        action="store_true",
        help="read and compare every file present in both, whatever the changed blocks say",
    )
    c.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per change, then one with the summary",
    )
    c.add_argument("-q", "--quiet", action="store_true", help="no progress line, no notes")
    c.set_defaults(func=cmd_changes)

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
    from ..workflows.restore import RestoreInterrupted, restore

    _setup_logging()
    _sigterm_interrupts()
    snapshot_id, paths, dest = _restore_items(args)
    try:
        result = restore(
            snapshot_id,
            paths,
            dest,
            partition=args.partition,
            mount_options=mount_options(args, [], ""),
            manifest=os.path.abspath(args.manifest) if args.manifest else None,
            verify=args.verify,
        )
    except RestoreInterrupted as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result.as_dict()))
    elif not args.quiet:
        _print_restored(result)
    return _restore_status(result)


def _restore_items(args: argparse.Namespace) -> tuple[str, list[str], str]:
    """(snapshot id, PATHs, DEST) from the positionals, or from --volume and --at."""
    items = list(args.items)
    if args.volume is None and args.at is not None:
        raise UsageError("--at needs --volume")
    if args.volume is not None:
        if args.at is None:
            raise UsageError("--volume needs --at TIME (e.g. --at yesterday)")
        if len(items) < 2:
            raise UsageError("restore --volume VOLUME_ID --at TIME needs PATH... DEST")
        return _snapshot_at(args), items[:-1], items[-1]
    if len(items) < 3:
        raise UsageError("restore needs SNAPSHOT_ID PATH... DEST")
    return items[0], items[1:-1], items[-1]


def _snapshot_at(args: argparse.Namespace) -> str:
    """The volume's newest completed snapshot started at or before --at; says which."""
    from ..core.catalog import newest_at
    from ..ebs.ec2 import SnapshotQuery, ec2_client, list_snapshots, validate_volume_id

    validate_volume_id(args.volume)
    records = list_snapshots(
        ec2_client(args.region, args.profile), SnapshotQuery(volume_ids=[args.volume])
    )
    picked = newest_at(records, args.at.timestamp())
    when = args.at.strftime("%Y-%m-%dT%H:%M:%SZ")
    if picked is None:
        raise UsageError(f"{args.volume} has no completed snapshot started at or before {when}")
    started = picked.start_datetime.strftime("%Y-%m-%dT%H:%M:%SZ")
    if not args.quiet:
        print(
            f"{PROG}: {args.volume} as of {when}: {picked.snapshot_id}, started {started}",
            file=sys.stderr,
        )
    return picked.snapshot_id


def _print_restored(result: Any) -> None:
    from ..workflows.chain import human

    if not result.paths:
        return  # nothing restored: the reason is the error line

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
    where = ", ".join(f"{p['source']} -> {p['dest']}" for p in result.paths) or "nothing"
    print(
        f"restored {where}: {', '.join(counts) or 'nothing'}, "
        f"{human(result.bytes_restored)} ({result.bytes_restored} bytes); fetched "
        f"{human(result.bytes_fetched)} ({result.blocks_fetched} blocks) from "
        f"{result.snapshot_id} in {result.seconds:.1f} s"
    )
    if result.verified is not None and not result.mismatched:
        print(f"verified: {result.verified} files read back match the snapshot's bytes")
    if result.manifest:
        print(f"manifest: {result.manifest}")


def _restore_status(result: Any) -> int:
    """Non-zero, with one line, when a PATH was missing or a file did not read back right;
    one warning line for attributes the destination would not take."""
    if result.not_kept:
        names = ", ".join(result.not_kept)
        print(f"{PROG}: warning: the destination refused, and so lost: {names}", file=sys.stderr)
    problems = []
    if result.missing:
        problems.append("no such file or directory in the snapshot: " + ", ".join(result.missing))
    if result.mismatched:
        problems.append("restored files differ from the snapshot: " + ", ".join(result.mismatched))
    if not problems:
        return 0
    print(f"{PROG}: " + "; ".join(problems), file=sys.stderr)
    return 1


def cmd_changes(args: argparse.Namespace) -> int:
    from ..ebs.client import EbsClient, RetryPolicy
    from ..workflows.changes import ChangesInterrupted, ChangesJob, changes

    _setup_logging()
    _sigterm_interrupts()
    view = _ChangesView(args.json, progress_wanted(args.quiet or args.json))
    job = ChangesJob(
        args.first,
        args.second,
        partition=args.partition,
        path=args.path,
        deep=args.deep,
        on_change=view.change,
        on_entry=view.walked,
        on_total=view.expect,
    )
    try:
        result = changes(
            EbsClient(client_settings(args)),
            job,
            mount_options(args, [], ""),
            RetryPolicy(budget_s=args.block_timeout),
        )
    except ChangesInterrupted as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 130
    finally:
        view.close()
    view.summary(result, quiet=args.quiet)
    return 0


class _ChangesView:
    """The changes as they come: a table row (or a JSON line) each, under a progress line."""

    def __init__(self, as_json: bool, progress: bool) -> None:
        self.as_json = as_json
        self.progress = progress
        self.bar: Any = None

    def expect(self, total: int) -> None:
        from ..tools.progress import Progress

        self.bar = Progress("comparing entries", total, enabled=self.progress)

    def walked(self, count: int) -> None:
        if self.bar is not None:
            self.bar.advance(0, count)

    def change(self, change: Any) -> None:
        if self.bar is not None:
            self.bar.clear()
        if self.as_json:
            print(json.dumps(change.as_dict(), separators=(",", ":")), flush=True)
        else:
            print(f"{change.change:<9} {change.kind:<9} {change.path}{_detail(change)}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def summary(self, result: Any, *, quiet: bool) -> None:
        from ..tools.progress import human_bytes

        if self.as_json:
            print(json.dumps({"summary": result.as_dict()}, separators=(",", ":")))
            return
        if not quiet:
            for note in result.notes:
                print(f"{PROG}: note: {note}", file=sys.stderr)
        where = "whole disk" if result.partition == 0 else f"partition {result.partition}"
        counts = ", ".join(
            f"{n} {name}"
            for n, name in (
                (result.added, "added"),
                (result.deleted, "deleted"),
                (result.modified, "modified"),
                (result.metadata, "metadata only"),
                (result.renamed, "renamed"),
            )
        )
        if result.method == "same":
            print(f"{result.first_snapshot_id} and itself: nothing changed")
            return
        print(
            f"{result.total} changes from {result.first_snapshot_id} to "
            f"{result.second_snapshot_id} ({where}, {result.fstype}, under {result.path}): "
            f"{counts}; {result.entries} entries walked, {human_bytes(result.bytes_compared)} "
            f"read to compare; {result.blocks_fetched} blocks fetched, {result.blocks_lent} "
            f"lent by cache or lineage; {result.seconds:.1f} s"
        )


def _detail(change: Any) -> str:
    """The table row's tail: what changed, briefly."""
    parts = []
    if change.renamed_from is not None:
        parts.append(f"from {change.renamed_from}")
    content = change.content
    if content is not None and content.ranges:
        from ..tools.progress import human_bytes

        total = sum(length for _, length in content.ranges)
        ranges = len(content.ranges)
        amount = f"{total} bytes" if total < 1024 else human_bytes(total)
        parts.append(
            f"content: {amount} in {ranges} range{'s' if ranges != 1 else ''} (by {content.method})"
        )
        if change.times_kept:
            parts.append("SIZE AND TIMES AS BEFORE")
    before, after = change.before, change.after
    for name in change.fields:
        if name == "mode":
            parts.append(f"mode {before.as_dict()['mode']} -> {after.as_dict()['mode']}")
        elif name in ("uid", "gid", "size", "target"):
            parts.append(f"{name} {getattr(before, name)} -> {getattr(after, name)}")
        else:
            parts.append(name)
    return "  " + "; ".join(parts) if parts else ""


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
