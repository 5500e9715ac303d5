"""Command line of the emulator: `ebsfuse emulator ...` and `python -m ebsfuse.emulator ...`.

Stdout carries exactly one line, `endpoint http://HOST:PORT`, printed once the server accepts
connections, so a parent process can read it and go. Everything else (synthetic snapshot ids,
requests at debug level) is logged to stderr. SIGINT or SIGTERM stops the server; exit 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, NoReturn

from .faults import (
    BODY_FAULTS,
    DEFAULT_PAGE_TOKEN_TTL,
    DEFAULT_THROTTLE_RPS,
    DEFAULT_TOKEN_TTL,
    LIST_FAULTS,
)
from .synthetic import SpecError, parse_spec

log = logging.getLogger("ebsfuse.emulator")


def _nonnegative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _fraction(text: str) -> float:
    value = _nonnegative(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1")
    return value


def _ttl(text: str) -> float:
    value = _nonnegative(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1 second")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0..65535)")
    return int(text)


def _spec(text: str) -> str:
    try:
        parse_spec(text)
    except SpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _chain(text: str) -> tuple[str, int]:
    volume, _, days = text.partition(":")
    if not volume.startswith("vol-") or not days.isdigit() or int(days) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not VOLUME_ID:DAYS (e.g. vol-0a:30)")
    return volume, int(days)


def _catalogue(text: str) -> tuple[int, int]:
    count, _, volumes = text.partition(":")
    if not count.isdigit() or not (volumes or "1").isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not COUNT[:VOLUMES] (e.g. 100000:10)")
    return int(count), max(1, int(volumes or "1"))


def _kind_and_rate(kinds: tuple[str, ...]) -> Callable[[str], tuple[str, float]]:
    """A parser of KIND[:RATE] for one of `kinds`, RATE a fraction (default 1)."""

    def parse(text: str) -> tuple[str, float]:
        kind, _, rate = text.partition(":")
        if kind not in kinds:
            raise argparse.ArgumentTypeError(f"{kind!r} is not one of {', '.join(kinds)}")
        return kind, _fraction(rate) if rate else 1.0

    return parse


def _kind_settings(name: str, value: tuple[str, float] | None) -> dict[str, Any]:
    return {} if value is None else {name: value[0], f"{name}_rate": value[1]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the emulator's options to `parser` (shared by both entry points)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument(
        "--port", type=_port, default=8080, help="port to bind; 0 picks a free one (default 8080)"
    )
    parser.add_argument(
        "--data-dir", metavar="DIR", help="keep completed snapshots in DIR across restarts"
    )
    parser.add_argument(
        "--latency-ms", type=_nonnegative, default=0.0, help="delay before every API response"
    )
    parser.add_argument(
        "--jitter-ms", type=_nonnegative, default=0.0, help="extra uniform random delay 0..N ms"
    )
    parser.add_argument(
        "--throttle-rps",
        type=_nonnegative,
        default=float(DEFAULT_THROTTLE_RPS),
        help="Get/PutSnapshotBlock requests per second per snapshot; 0 = unlimited "
        "(default %(default)g, the real quota)",
    )
    parser.add_argument(
        "--fail-rate", type=_fraction, default=0.0, help="fraction answered InternalServerException"
    )
    parser.add_argument(
        "--truncate-rate",
        type=_fraction,
        default=0.0,
        help="fraction of GetSnapshotBlock bodies cut off halfway",
    )
    parser.add_argument(
        "--corrupt-rate",
        type=_fraction,
        default=0.0,
        help="fraction of GetSnapshotBlock bodies with one byte flipped (checksum mismatch)",
    )
    parser.add_argument(
        "--list-fault",
        type=_kind_and_rate(LIST_FAULTS),
        metavar="KIND[:RATE]",
        help="answer listing pages 200 but broken: "
        + ", ".join(LIST_FAULTS)
        + " (a fraction RATE of them, default all)",
    )
    parser.add_argument(
        "--body-fault",
        type=_kind_and_rate(BODY_FAULTS),
        metavar="KIND[:RATE]",
        help="send block bodies that "
        + ", ".join(BODY_FAULTS)
        + " (a fraction RATE of them, default all)",
    )
    parser.add_argument(
        "--bare-429-rate",
        type=_fraction,
        default=0.0,
        help="fraction of requests answered 429 with an HTML page and no AWS error type",
    )
    parser.add_argument(
        "--report-volume-size",
        type=_nonnegative,
        default=0.0,
        metavar="GIB",
        help="VolumeSize every listing reports instead of the true one (0: the true one)",
    )
    parser.add_argument(
        "--max-faults",
        type=_nonnegative,
        default=0.0,
        metavar="N",
        help="inject no more than N faults in all (0: no limit)",
    )
    parser.add_argument(
        "--empty-pages", action="store_true", help="interleave empty pages in list results"
    )
    parser.add_argument(
        "--token-ttl",
        type=_ttl,
        default=float(DEFAULT_TOKEN_TTL),
        help="block token lifetime in seconds (default 7 days)",
    )
    parser.add_argument(
        "--page-token-ttl",
        type=_ttl,
        default=float(DEFAULT_PAGE_TOKEN_TTL),
        help="page token (NextToken) lifetime in seconds (default 3600)",
    )
    parser.add_argument(
        "--synthetic",
        metavar="SPEC",
        type=_spec,
        action="append",
        default=[],
        help="create a synthetic snapshot, e.g. size=65536,pattern=all,seed=7 (repeatable)",
    )
    parser.add_argument(
        "--complete-after",
        type=_nonnegative,
        default=0.0,
        metavar="SECONDS",
        help="keep each snapshot pending this long after CompleteSnapshot, as AWS does "
        "(on the emulator's clock; default 0)",
    )
    parser.add_argument(
        "--daily-chain",
        metavar="VOLUME_ID:DAYS",
        type=_chain,
        action="append",
        default=[],
        help="create DAYS daily snapshots of a volume, each a child of the day before with a "
        "few blocks changed, as Data Lifecycle Manager makes them (repeatable)",
    )
    parser.add_argument(
        "--catalogue",
        metavar="COUNT[:VOLUMES]",
        type=_catalogue,
        help="create COUNT empty 1 GiB snapshots spread over VOLUMES volumes (default 1), "
        "hourly apart: a large account for DescribeSnapshots",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level on stderr (default INFO)",
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; returns the exit status."""
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s"
    )
    try:
        from .emulator import Emulator  # here: `ebsfuse --help` should not load the server

        emu = Emulator(
            host=args.host,
            port=args.port,
            data_dir=args.data_dir,
            latency_ms=args.latency_ms,
            jitter_ms=args.jitter_ms,
            throttle_rps=args.throttle_rps,
            fail_rate=args.fail_rate,
            truncate_rate=args.truncate_rate,
            empty_pages=args.empty_pages,
            token_ttl=args.token_ttl,
            page_token_ttl=args.page_token_ttl,
            corrupt_rate=args.corrupt_rate,
            bare_429_rate=args.bare_429_rate,
            report_volume_size=args.report_volume_size,
            max_faults=args.max_faults,
            complete_after_s=args.complete_after,
            **_kind_settings("list_fault", args.list_fault),
            **_kind_settings("body_fault", args.body_fault),
        )
        for spec in args.synthetic:
            sid = emu.create_synthetic(spec)
            log.info("synthetic snapshot %s (%s)", sid, spec)
        for volume, days in args.daily_chain:
            chain = emu.create_daily_chain(volume, days)
            log.info("%d daily snapshots of %s, the last %s", days, volume, chain[-1][0])
        if args.catalogue:
            emu.create_catalogue(*args.catalogue)
            log.info("%d snapshots of %d volumes", *args.catalogue)
        emu.start()
    except (OSError, ValueError) as e:
        print(f"ebsfuse emulator: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        sys.stdout.write(f"endpoint {emu.endpoint}\n")
        sys.stdout.flush()
        while not stop.wait(3600):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        emu.stop()
    return 0


class _OneLineErrors(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ebsfuse.emulator`."""
    parser = _OneLineErrors(
        prog="python -m ebsfuse.emulator",
        description="Offline EBS direct API server for tests and benchmarks.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
