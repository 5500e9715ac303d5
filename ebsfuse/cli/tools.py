"""Command-line parsing of the snapshot tools (upload, download, diff, info).

Kept apart from cli.py so the tools grow without touching the mount's commands; `register`
adds their sub-commands to the main parser. Each command turns its arguments into one library
call and prints either a short human summary or, with `--json`, one JSON document on stdout.
Failures are `EbsfuseError`s that cli.main prints as one line; Ctrl-C (or SIGTERM) exits 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import signal
import sys
from types import FrameType
from typing import Any

from .. import BLOCK_SIZE
from ..ebs.errors import EbsfuseError
from .options import (
    PROG,
    add_cache_dir_arguments,
    add_client_arguments,
    cache_dir_of,
    client_settings,
    positive_int,
    seconds,
)

_TAG_RE = re.compile(r"^([^=]{1,127})=(.{0,255})$", re.DOTALL)
MAX_TAGS = 50  # the API's limit


def _tag(text: str) -> tuple[str, str]:
    match = _TAG_RE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"tag {text!r} is not KEY=VALUE (key 1..127, value at most 255 characters)"
        )
    return match.group(1), match.group(2)


def _timeout_minutes(text: str) -> int:
    value = positive_int(text)
    if not 10 <= value <= 4320:
        raise argparse.ArgumentTypeError(f"{text!r}: the timeout is 10 to 4320 minutes")
    return value


def _description(text: str) -> str:
    if len(text) > 255:
        raise argparse.ArgumentTypeError("the description is longer than 255 characters")
    return text


def _volume_gib(text: str) -> int:
    value = positive_int(text)
    if value > 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: an EBS volume is at most 65536 GiB")
    return value


def _retry_policy(text: str) -> Any:
    """ATTEMPTS,THROTTLE_ATTEMPTS,BASE_S,MAX_S (hidden: lets tests fail fast)."""
    from ..ebs.client import RetryPolicy

    try:
        attempts, throttle, base, cap = text.split(",")
        return RetryPolicy(int(attempts), int(throttle), float(base), float(cap))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not A,T,BASE,MAX") from None


def _common(p: argparse.ArgumentParser, *, workers: bool) -> None:
    add_client_arguments(p)
    if workers:
        p.add_argument(
            "--workers", type=positive_int, default=64, help="requests in flight (default 64)"
        )
    p.add_argument("--json", action="store_true", help="print the result as one JSON document")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens to stderr")
    p.add_argument("--retry-policy", type=_retry_policy, help=argparse.SUPPRESS)


def register(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("upload", help="upload a raw disk image as a new snapshot")
    up.add_argument("image", metavar="IMAGE", help="image file or block device")
    up.add_argument("--parent", metavar="SNAPSHOT_ID", help="make an incremental child of this")
    src = up.add_mutually_exclusive_group()
    src.add_argument("--parent-image", metavar="FILE", help="the parent's image, to compare")
    src.add_argument(
        "--parent-manifest", metavar="FILE", help="the manifest --manifest wrote for the parent"
    )
    up.add_argument("--manifest", metavar="FILE", help="write this snapshot's block manifest")
    up.add_argument("--encrypted", action="store_true", help="encrypt the snapshot")
    up.add_argument("--kms-key-arn", metavar="ARN", help="KMS key (with --encrypted)")
    up.add_argument(
        "--tag", type=_tag, action="append", default=[], metavar="KEY=VALUE", help="repeatable"
    )
    up.add_argument("--description", type=_description, default="", help="snapshot description")
    up.add_argument(
        "--timeout",
        type=_timeout_minutes,
        default=60,
        metavar="MINUTES",
        help="minutes the pending snapshot may sit idle before it fails (10..4320, default 60)",
    )
    up.add_argument("--volume-size", type=_volume_gib, metavar="GIB", help="volume size in GiB")
    up.add_argument("--client-token", help="idempotency token (default: a fresh UUID)")
    up.add_argument(
        "--pad", action="store_true", help="pad an image that is not a multiple of 512 KiB"
    )
    up.add_argument("--wait", action="store_true", help="wait until the snapshot is completed")
    up.add_argument(
        "--wait-timeout",
        type=seconds,
        default=6 * 3600.0,
        metavar="SECONDS",
        help="give up waiting after this long (default 6 h)",
    )
    _common(up, workers=True)
    up.set_defaults(func=cmd_upload)

    down = sub.add_parser("download", help="download a snapshot to a sparse file or a device")
    down.add_argument("snapshot", metavar="SNAPSHOT_ID")
    down.add_argument("dest", metavar="DEST", help="image file to write, or a block device")
    down.add_argument(
        "--base",
        metavar="OLD_SNAPSHOT_ID",
        help="DEST holds this snapshot's image: fetch only the changed blocks",
    )
    down.add_argument("--force", action="store_true", help="overwrite DEST; start over")
    down.add_argument("--resume", action="store_true", help="continue an interrupted download")
    add_cache_dir_arguments(down, base=False)
    _common(down, workers=True)
    down.set_defaults(func=cmd_download)

    diff = sub.add_parser("diff", help="byte ranges changed between two snapshots")
    diff.add_argument("first", metavar="FIRST_SNAPSHOT_ID")
    diff.add_argument("second", metavar="SECOND_SNAPSHOT_ID")
    _common(diff, workers=False)
    diff.set_defaults(func=cmd_diff)

    info = sub.add_parser("info", help="volume size and written blocks of a snapshot")
    info.add_argument("snapshot", metavar="SNAPSHOT_ID")
    _common(info, workers=False)
    info.set_defaults(func=cmd_info)

    cache = sub.add_parser("cache", help="what a --cache-dir holds; drop or clear it")
    cache.add_argument("action", choices=["stats", "drop", "clear"])
    cache.add_argument("snapshot", nargs="?", metavar="SNAPSHOT_ID", help="for drop")
    cache.add_argument("--cache-dir", required=True, metavar="DIR")
    cache.add_argument("--json", action="store_true", help="print the result as one JSON document")
    cache.set_defaults(func=cmd_cache)


# -- helpers --------------------------------------------------------------------------------


def _setup(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format=f"{PROG}: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        logging.getLogger("botocore").setLevel(logging.ERROR)

    def on_term(signum: int, frame: FrameType | None) -> None:
        # SIGTERM ends a transfer the way Ctrl-C does: state saved, resumable.
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, on_term)


def _client(args: argparse.Namespace, pool: int = 16) -> Any:
    from ..ebs.client import EbsClient

    # Every option of add_client_arguments, --audit-log and --max-rps included.
    return EbsClient(client_settings(args, pool))


def _policy(args: argparse.Namespace) -> Any:
    from ..ebs.client import RetryPolicy

    return dataclasses.replace(args.retry_policy or RetryPolicy(), budget_s=args.block_timeout)


def _progress(args: argparse.Namespace) -> bool:
    from ..tools.progress import progress_wanted

    return progress_wanted(args.quiet or args.json)


def _interrupted(error: EbsfuseError) -> int:
    print(f"{PROG}: {error}", file=sys.stderr)
    return 130


# -- commands -------------------------------------------------------------------------------


def cmd_upload(args: argparse.Namespace) -> int:
    from ..tools.upload import UploadInterrupted, UploadOptions, upload_image

    _setup(args)
    if len(args.tag) > MAX_TAGS:
        raise EbsfuseError(f"at most {MAX_TAGS} tags")
    opts = UploadOptions(
        description=args.description,
        tags=list(args.tag),
        parent_snapshot_id=args.parent,
        parent_image=args.parent_image,
        parent_manifest=args.parent_manifest,
        manifest_out=args.manifest,
        encrypted=args.encrypted,
        kms_key_arn=args.kms_key_arn,
        timeout_minutes=args.timeout,
        volume_size_gib=args.volume_size,
        client_token=args.client_token,
        pad=args.pad,
        wait=args.wait,
        wait_timeout_s=args.wait_timeout,
        workers=args.workers,
        policy=_policy(args),
        progress=_progress(args),
    )
    try:
        result = upload_image(_client(args, args.workers), args.image, opts)
    except UploadInterrupted as error:
        return _interrupted(error)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(result.snapshot_id)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from ..tools.download import DownloadInterrupted, DownloadOptions, download_snapshot
    from ..tools.progress import human_bytes

    _setup(args)
    opts = DownloadOptions(
        workers=args.workers,
        force=args.force,
        resume=args.resume,
        base_snapshot_id=args.base,
        policy=_policy(args),
        progress=_progress(args),
        cache_dir=cache_dir_of(args),
        cache_dir_size=args.cache_dir_size,
    )
    try:
        result = download_snapshot(_client(args, args.workers), args.snapshot, args.dest, opts)
    except DownloadInterrupted as error:
        return _interrupted(error)
    if args.json:
        print(json.dumps(result.as_dict()))
    elif not args.quiet:
        rate = result.bytes_written / max(result.seconds, 1e-6)
        extra = f", {result.blocks_already_done} already done" if result.resumed else ""
        print(
            f"{result.snapshot_id} -> {result.dest}: {result.blocks_fetched} blocks fetched "
            f"({result.zero_blocks} of zeros{extra}), {human_bytes(result.bytes_written)} "
            f"written in {result.seconds:.1f} s ({human_bytes(rate)}/s)"
        )
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from ..tools.diff import ChangedRange, diff_snapshots
    from ..tools.progress import human_bytes

    _setup(args)
    out = sys.stdout
    first_range = True

    def open_document() -> None:
        ids = json.dumps({"first_snapshot_id": args.first, "second_snapshot_id": args.second})
        out.write(ids[:-1] + ', "changes": [')

    def on_range(r: ChangedRange) -> None:
        nonlocal first_range
        if args.json:
            # Streamed: the document is written as the ranges arrive, never held whole.
            if first_range:
                open_document()
            out.write(("" if first_range else ", ") + json.dumps(r.as_dict()))
        else:
            last = r.first_block + r.blocks - 1
            blocks = f"block {r.first_block}" if r.blocks == 1 else f"blocks {r.first_block}-{last}"
            out.write(f"{r.offset:>16} {r.length:>14}  {blocks}\n")
        first_range = False

    summary = diff_snapshots(
        _client(args),
        args.first,
        args.second,
        on_range,
        policy=_policy(args),
        progress=_progress(args),
    )
    if args.json:
        if first_range:
            open_document()
        doc = summary.as_dict()
        del doc["first_snapshot_id"], doc["second_snapshot_id"]
        out.write("], " + json.dumps(doc)[1:] + "\n")
    else:
        out.write(
            f"{summary.changed_blocks} blocks changed in {summary.ranges} ranges "
            f"({human_bytes(summary.changed_bytes)}, {summary.share * 100:.2f}% of the "
            f"{human_bytes(summary.volume_size)} volume; {summary.only_in_second} only in "
            f"{args.second}, {summary.only_in_first} only in {args.first})\n"
        )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ..tools.info import snapshot_info
    from ..tools.progress import human_bytes

    _setup(args)
    info = snapshot_info(
        _client(args), args.snapshot, policy=_policy(args), progress=_progress(args)
    )
    if args.json:
        print(json.dumps(info.as_dict()))
        return 0

    def offset(value: int | None) -> str:
        return "-" if value is None else f"{value} ({human_bytes(value)})"

    rows = [
        ("snapshot", info.snapshot_id),
        ("volume size", f"{info.volume_size} ({info.volume_size_gib} GiB)"),
        ("block size", f"{info.block_size}"),
        ("written blocks", f"{info.written_blocks}"),
        ("written bytes", f"{info.written_bytes} ({human_bytes(info.written_bytes)}, "
         f"{info.share * 100:.2f}%)"),
        ("first written", offset(info.first_written_offset)),
        ("last written", offset(info.last_written_offset)),
        ("token expiry", info.token_expiry or "-"),
    ]  # fmt: skip
    for key, value in rows:
        print(f"{key + ':':<16}{value}")
    return 0


assert BLOCK_SIZE == 524288  # the tools' offsets assume the API's only block size


def cmd_cache(args: argparse.Namespace) -> int:
    from ..core.diskcache import DiskCache
    from ..tools.progress import human_bytes

    if args.action == "drop" and not args.snapshot:
        raise EbsfuseError("cache drop needs the SNAPSHOT_ID whose blocks to drop")
    if args.action != "drop" and args.snapshot:
        raise EbsfuseError(f"cache {args.action} takes no snapshot id")
    if not os.path.isdir(args.cache_dir):
        raise EbsfuseError(f"cache directory {args.cache_dir} does not exist")
    disk = DiskCache(args.cache_dir)
    try:
        if args.action == "drop":
            dropped = disk.drop(args.snapshot)
            doc: dict[str, object] = {"dropped_blocks": dropped, "snapshot_id": args.snapshot}
            line = f"dropped {dropped} blocks of {args.snapshot}"
        elif args.action == "clear":
            dropped = disk.clear()
            doc = {"dropped_blocks": dropped}
            line = f"dropped {dropped} blocks"
        else:
            doc = disk.summary()
            line = _cache_table(doc, human_bytes)
    finally:
        disk.close()
    print(json.dumps(doc) if args.json else line)
    return 0


def _cache_table(doc: dict[str, Any], human: Any) -> str:
    rows = [f"{doc['directory']}: {doc['entries']} blocks, {human(doc['bytes'])}"]
    for sid, entry in doc["snapshots"].items():
        rows.append(f"  {sid}  {entry['blocks']:>9} blocks  {human(entry['bytes']):>10}")
    return "\n".join(rows)
