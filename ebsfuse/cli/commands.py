"""Command-line parsing: one function per command, each turning arguments into a library call.

Every failure the user can act on ends as one line on stderr and a non-zero exit status;
tracebacks are for bugs only. `ebsfuse SOURCE MOUNTPOINT -o OPTIONS` (mount.fuse3's calling
convention, used by `mount -t fuse.ebsfuse` and fstab) is translated to `ebsfuse mount`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .. import __version__
from ..ebs.errors import EbsfuseError, UsageError
from . import tools as tools_cli
from . import workflows as workflows_cli
from .options import (
    PROG,
    OneLineParser,
    add_catalogue_arguments,
    add_client_arguments,
    add_daemon_arguments,
    mount_options,
)
from .process import limit_malloc_arenas

if TYPE_CHECKING:
    pass

COMMANDS = (
    "mount", "unmount", "umount", "stats", "upload", "download", "diff", "info",
    "browse", "restore", "changes", "hash", "cache", "emulator",
)  # fmt: skip

# mount(8) and mount.fuse3 pass generic options along; they mean nothing for a read-only
# snapshot image (always ro, nodev, nosuid in effect), so they are accepted and ignored.
_GENERIC_MOUNT_OPTIONS = {
    "rw", "ro", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "async", "sync",
    "atime", "noatime", "relatime", "norelatime", "strictatime", "diratime", "nodiratime",
    "defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail",
    "auto_unmount", "default_permissions",  # ebsfuse always mounts with these
}  # fmt: skip


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog=PROG,
        description="Mount Amazon EBS snapshots as sparse read-only disk images.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True

    m = sub.add_parser("mount", help="mount snapshots as <snapshot-id>.img files")
    m.add_argument(
        "snapshots",
        nargs="*",
        metavar="SNAPSHOT_ID",
        help="snapshot ids (a vol-... id is taken as --volume)",
    )
    m.add_argument("mountpoint", metavar="MOUNTPOINT")
    add_catalogue_arguments(m)
    add_client_arguments(m)
    add_daemon_arguments(m)
    m.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    m.add_argument("--allow-other", action="store_true", help="let other users read the mount")
    m.add_argument(
        "--no-kernel-tuning",
        dest="kernel_tuning",
        action="store_false",
        help="leave the kernel's readahead and FUSE background limits as they are",
    )
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("unmount", aliases=["umount"], help="unmount an ebsfuse mount")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("-z", "--lazy", action="store_true", help="detach even if busy")
    u.set_defaults(func=cmd_unmount)

    st = sub.add_parser("stats", help="show a mount's counters (requests, cache, readahead)")
    st.add_argument("mountpoint", metavar="MOUNTPOINT")
    st.add_argument("--json", action="store_true", help="print the raw counters as JSON")
    st.set_defaults(func=cmd_stats)

    from ..emulator.cli import add_arguments as add_emulator_arguments

    tools_cli.register(sub)
    workflows_cli.register(sub)

    em = sub.add_parser("emulator", help="run a local EBS direct API server")
    add_emulator_arguments(em)
    em.set_defaults(func=cmd_emulator)
    return parser


# -- commands -----------------------------------------------------------------------------


def cmd_mount(args: argparse.Namespace) -> int:
    from ..fuse.mount import check_options, run_daemon, start_background

    snapshots = [s for s in args.snapshots if not s.startswith("vol-")]
    args.volume_ids += [s for s in args.snapshots if s.startswith("vol-")]
    opts = mount_options(
        args,
        snapshots,
        os.path.realpath(args.mountpoint),  # the kernel records the resolved path
        foreground=args.foreground,
        allow_other=args.allow_other,
        ready_fd=args.ready_fd,
        kernel_tuning=args.kernel_tuning,
        volume_ids=args.volume_ids,
        filters=args.filters,
        owner_ids=[o for value in args.owner_ids for o in value.split(",") if o],
        catalog_ttl_s=args.catalog_ttl,
    )
    check_options(opts)
    if opts.foreground:
        return run_daemon(opts)
    start_background(opts)
    return 0


def cmd_unmount(args: argparse.Namespace) -> int:
    from ..fuse.mount import unmount
    from ..workflows.browse import unmount_browse

    if unmount_browse(args.mountpoint, lazy=args.lazy):  # a browse chain: undo all of it
        return 0
    unmount(args.mountpoint, lazy=args.lazy)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from ..core.stats import STATS_NAME

    path = os.path.join(args.mountpoint, STATS_NAME.decode())
    try:
        with open(path, "rb") as f:
            stats = json.loads(f.read())
    except FileNotFoundError:
        raise UsageError(f"{args.mountpoint} is not an ebsfuse mount") from None
    except OSError as exc:
        raise EbsfuseError(f"cannot read the stats of {args.mountpoint}: {exc.strerror}") from None
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    cache = stats["cache"]
    print(
        f"cache {cache['bytes'] / 2**20:.0f} of {cache['limit'] / 2**20:.0f} MiB, "
        f"{stats['requests_in_flight']} requests in flight (max {stats['max_concurrency']})"
    )
    rate = stats.get("rate")
    if rate is not None:
        now = "no limit" if rate["rps"] is None else f"{rate['rps']} requests/s"
        cap = f", at most {rate['max_rps']:g}" if rate["max_rps"] else ""
        print(
            f"rate {now}{cap}; {rate['throttles']} throttling answers, "
            f"{rate['rate_cuts']} cuts, {rate['waited_s']:.1f} s waited"
        )
    workers = stats.get("fetch_workers")
    if workers is not None:
        print(
            f"fetch workers {workers['processes']}: {workers['requests_in_flight']} of "
            f"{workers['slots']} request slots in use, {workers['homes_held']} of "
            f"{workers['homes']} homes holding blocks, {workers['blocks_copied']} blocks "
            f"copied for want of a home, {workers['restarts']} restarts"
        )
    catalogue = stats.get("catalogue")
    if catalogue is not None:
        print(
            f"catalogue {catalogue['snapshots']} snapshots of {catalogue['volumes']} volumes; "
            f"{catalogue['images_open']} images open ({catalogue['images_opened']} opened, "
            f"{catalogue['images_closed']} closed); refreshed {catalogue['refreshes']} times, "
            f"{catalogue['failed_refreshes']} failed"
        )
    snapshots = stats["snapshots"].values()
    lineage = stats.get("lineage")
    if lineage is not None:
        lent = sum(s["cache"].get("lineage_hits", 0) for s in snapshots)
        gets = sum(s["requests"]["GetSnapshotBlock"] for s in snapshots)
        print(
            f"lineage {len(lineage['snapshots'])} snapshots: {lent} blocks lent between them, "
            f"{gets} fetched; ListChangedBlocks {lineage['requests']['ListChangedBlocks']}"
        )
    for sid, s in stats["snapshots"].items():
        lat = s["latency_ms"]
        retries = ", ".join(f"{k} {v}" for k, v in s["retries"].items()) or "none"
        print(f"{sid}:")
        print(
            f"  requests   GetSnapshotBlock {s['requests']['GetSnapshotBlock']}, "
            f"ListSnapshotBlocks {s['requests']['ListSnapshotBlocks']}, failures {s['failures']}"
        )
        print(f"  retries    {retries}")
        print(
            f"  fetched    {s['bytes_fetched'] / 2**20:.1f} MiB; cache hits {s['cache']['hits']}, "
            f"misses {s['cache']['misses']}; holes read {s['hole_reads']}"
        )
        print(
            f"  prefetch   {s['prefetch']['blocks']} blocks, used {s['prefetch']['used']}, "
            f"wasted {s['prefetch']['wasted']}; windows {s['readahead_windows'] or '-'}"
        )
        print(
            f"  tokens     {s['tokens_held']} held in {s['token_ranges']} ranges, "
            f"refreshes {s['token_refreshes']}, refused {s['token_refusals']}"
        )
        print(f"  latency    p50 {lat['p50']} ms, p90 {lat['p90']} ms, p99 {lat['p99']} ms")
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    from ..emulator.cli import run

    return run(args)


# -- mount.fuse3 convention ---------------------------------------------------------------


def translate_mount_helper_argv(argv: list[str]) -> list[str]:
    """`SOURCE MOUNTPOINT [-o opt,opt=value] [-f]` -> `mount ... MOUNTPOINT --option ...`.

    SOURCE may name several snapshots separated by commas or colons (fstab has one field).
    """
    positional: list[str] = []
    options: list[str] = []
    out_flags: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "-o":
            options += next(it, "").split(",")
        elif arg.startswith("-o") and len(arg) > 2:
            options += arg[2:].split(",")
        elif arg in ("-f", "--foreground"):
            out_flags.append("--foreground")
        elif arg in ("-n", "-s", "-v"):
            continue  # mount(8)'s no-mtab, sloppy and verbose flags
        elif arg in ("-t", "-N"):
            next(it, None)  # a type or a namespace that mount(8) hands a mount.<type> helper
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise UsageError(
            "expected SOURCE MOUNTPOINT with -o options (mount.fuse3 convention), "
            f"or a command: {', '.join(COMMANDS[:-1])}"
        )
    source, mountpoint = positional
    for option in filter(None, (o.strip() for o in options)):
        key, _, value = option.partition("=")
        key_flag = key.replace("_", "-")
        if key in _GENERIC_MOUNT_OPTIONS or key.startswith("x-") or key == "fsname":
            continue
        if key_flag in ("allow-other", "foreground", "no-kernel-tuning"):
            out_flags.append(f"--{key_flag}")
        elif key_flag in (
            "region", "profile", "endpoint-url", "cache-size", "max-concurrency",
            "block-timeout", "max-rps", "log-level", "log-file", "audit-log", "cache-dir",
            "cache-dir-size", "base", "volume", "owner-ids", "catalog-ttl",
        ):  # fmt: skip
            if not value:
                raise UsageError(f"mount option {key} needs a value ({key}=...)")
            out_flags += [f"--{key_flag}", value]
        else:
            raise UsageError(f"unknown mount option {option!r}")
    snapshots = [s for s in re.split(r"[,:]", source) if s]
    if "--volume" in out_flags and not all(s.startswith(("snap-", "vol-")) for s in snapshots):
        snapshots = []  # fstab's first field says nothing when volume= names the volume
    return ["mount", *out_flags, "--", *snapshots, mountpoint]


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    limit_malloc_arenas()
    try:
        if args_list and not args_list[0].startswith("-") and args_list[0] not in COMMANDS:
            args_list = translate_mount_helper_argv(args_list)
        parser = build_parser()
        args = parser.parse_args(args_list)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except EbsfuseError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`ebsfuse stats | head`): end quietly, as a tool
        # killed by SIGPIPE does, and keep Python from failing again on the final flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
