"""Options and argument types several commands share: sizes, counts, seconds, the client's
options and a mount daemon's, and the parser class that reports bad input in one line.

Imported by every command module; imports none of them, and nothing heavy.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, NoReturn

from .. import BLOCK_SIZE, DEFAULT_TIMEOUT_S
from ..core.catalog import DEFAULT_TTL_S as DEFAULT_CATALOG_TTL_S
from ..ebs.errors import UsageError

if TYPE_CHECKING:
    from ..ebs.client import ClientSettings
    from ..fuse.mount import MountOptions

PROG = "ebsfuse"

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad input in one line, not usage plus error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def parse_size(text: str) -> int:
    """'256M' -> bytes. K, M, G and T are powers of 1024, as in `--cache-size 2G`."""
    match = _SIZE_RE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"cannot parse size {text!r} (use e.g. 512M or 2G)")
    value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    return int(value)


def cache_size(text: str) -> int:
    size = parse_size(text)
    if size < BLOCK_SIZE:
        raise argparse.ArgumentTypeError(f"cache size {text!r} is smaller than one 512 KiB block")
    return size


def default_fetch_workers() -> int:
    """Fetch worker processes for the cores the daemon leaves: one core is the daemon's own
    (FUSE and the trio thread), each other core a worker's. On 2 cores one worker read 459
    MiB/s quiet and 400 beside a CPU hog, two workers 426 and 353, the daemon's threads 410
    and 413 (scripts/bench-mount --only-cold, 2 GiB, 50 ms); on one core, threads (0)."""
    return max(0, (os.cpu_count() or 1) - 1)


def _int_at_least(least: int, what: str) -> Callable[[str], int]:
    """An argument type: a whole number of at least `least` (`what` says so when not)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{text!r} {what}")
        return value

    return parse


positive_int = _int_at_least(1, "must be at least 1")
nonnegative_int = _int_at_least(0, "is negative")


def _positive_number(what: str) -> Callable[[str], float]:
    """An argument type: a finite number above 0, called `what` in the error."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
        return value

    return parse


positive_float = _positive_number("a number")
seconds = _positive_number("a number of seconds")


_AGO_RE = re.compile(r"^(\d+)\s*(minute|hour|day|week)s?\s+ago$")
_AGO_UNITS = {"minute": 60, "hour": 3600, "day": 86400, "week": 7 * 86400}


def point_in_time(text: str) -> datetime:
    """A moment, as `--at` takes it: ISO 8601 (UTC unless an offset is given), `now`,
    `yesterday` (24 hours ago) or `N minutes|hours|days|weeks ago`."""
    word = text.strip().lower()
    now = datetime.now(UTC)
    if word == "now":
        return now
    if word == "yesterday":
        return now - timedelta(days=1)
    ago = _AGO_RE.match(word)
    if ago:
        return now - timedelta(seconds=int(ago.group(1)) * _AGO_UNITS[ago.group(2)])
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"cannot read the time {text!r} (use e.g. 2026-11-03T12:00:00Z, yesterday, 3 days ago)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--region", help="AWS region (default: from the AWS configuration)")
    p.add_argument("--profile", help="AWS profile from the shared configuration files")
    p.add_argument(
        "--endpoint-url",
        help="EBS endpoint, e.g. an emulator's (AWS_ENDPOINT_URL_EBS is honoured too)",
    )
    p.add_argument(
        "--audit-log",
        metavar="FILE",
        help="append one JSON line per verified block fetched (evidence of what was read)",
    )
    p.add_argument(
        "--block-timeout",
        type=seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="each block is read, retries included, or fails (EIO) within this (default 60)",
    )
    p.add_argument(
        "--max-rps",
        type=positive_float,
        metavar="N",
        help="requests per second to the endpoint at most (default: what throttling allows)",
    )


def client_settings(args: argparse.Namespace, max_pool_connections: int = 64) -> ClientSettings:
    """ClientSettings from the options `add_client_arguments` added."""
    from ..ebs.client import ClientSettings

    return ClientSettings(
        region=args.region,
        profile=args.profile,
        endpoint_url=args.endpoint_url,
        max_pool_connections=max_pool_connections,
        audit_log=os.path.abspath(args.audit_log) if args.audit_log else None,
        max_rps=args.max_rps,
    )


def add_cache_dir_arguments(p: argparse.ArgumentParser, *, base: bool = True) -> None:
    """The disk tier and lineage options of every command that reads blocks."""
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="keep verified blocks in DIR too, for later runs and other processes (0700)",
    )
    p.add_argument(
        "--cache-dir-size",
        type=cache_size,
        metavar="SIZE",
        help="bytes the cache directory may hold (K/M/G/T; default 10%% of the free space)",
    )
    if base:
        p.add_argument(
            "--base",
            dest="base_ids",
            action="append",
            default=[],
            metavar="SNAPSHOT_ID",
            help="an ancestor whose blocks in --cache-dir serve unchanged blocks (repeatable)",
        )


def cache_dir_of(args: argparse.Namespace) -> str | None:
    """--cache-dir as an absolute path; --cache-dir-size without it is refused."""
    if args.cache_dir_size is not None and not args.cache_dir:
        raise UsageError("--cache-dir-size needs --cache-dir")
    return os.path.abspath(args.cache_dir) if args.cache_dir else None


def add_catalogue_arguments(p: argparse.ArgumentParser) -> None:
    """A mount of every snapshot a DescribeSnapshots query selects, instead of named ones."""
    p.add_argument(
        "--volume",
        dest="volume_ids",
        action="append",
        default=[],
        metavar="VOLUME_ID",
        help="mount every completed snapshot of this volume, with by-volume/ (repeatable)",
    )
    p.add_argument(
        "--filters",
        action="append",
        default=[],
        metavar="Name=NAME,Values=V1,V2",
        help="mount every completed snapshot this DescribeSnapshots filter selects, as the "
        "AWS CLI writes it (repeatable: all apply)",
    )
    p.add_argument(
        "--owner-ids",
        action="append",
        default=[],
        metavar="ID",
        help="owners of the snapshots (self, an account id; default with --filters: self)",
    )
    p.add_argument(
        "--catalog-ttl",
        type=seconds,
        default=DEFAULT_CATALOG_TTL_S,
        metavar="SECONDS",
        help="ask DescribeSnapshots again at most this often, when listed (default 60)",
    )


def add_daemon_arguments(p: argparse.ArgumentParser) -> None:
    """Options of a mount daemon: `mount`, and the private mounts of browse and restore."""
    add_cache_dir_arguments(p)
    p.add_argument(
        "--cache-size",
        type=cache_size,
        default="256M",
        help="bytes of verified blocks kept in memory (K/M/G suffixes; default 256M)",
    )
    p.add_argument(
        "--max-concurrency",
        type=positive_int,
        default=64,
        help="GetSnapshotBlock requests in flight at most (default 64)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="daemon log level (default INFO)",
    )
    p.add_argument("--log-file", help="daemon log file (default: syslog when in the background)")
    p.add_argument(
        "--fetch-workers",
        type=nonnegative_int,
        metavar="N",
        help="processes that fetch and verify blocks beside the daemon, each with its own "
        "interpreter (default: one per core but one; 0: threads of the daemon)",
    )


def mount_options(
    args: argparse.Namespace, snapshot_ids: list[str], mountpoint: str, **extra: object
) -> MountOptions:
    """MountOptions from the options `add_client_arguments` and `add_daemon_arguments` added."""
    from ..fuse.mount import MountOptions

    return MountOptions(
        snapshot_ids=snapshot_ids,
        mountpoint=mountpoint,
        region=args.region,
        profile=args.profile,
        endpoint_url=args.endpoint_url,
        audit_log=os.path.abspath(args.audit_log) if args.audit_log else None,
        cache_bytes=args.cache_size,
        max_concurrency=args.max_concurrency,
        timeout_s=args.block_timeout,
        max_rps=args.max_rps,
        log_level=args.log_level,
        log_file=os.path.abspath(args.log_file) if args.log_file else None,
        cache_dir=cache_dir_of(args),
        cache_dir_size=args.cache_dir_size,
        base_ids=list(args.base_ids),
        fetch_workers=default_fetch_workers() if args.fetch_workers is None else args.fetch_workers,
        **extra,  # type: ignore[arg-type]
    )
