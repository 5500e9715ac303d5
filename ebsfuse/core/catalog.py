"""The snapshots a mount shows: a fixed list, or a DescribeSnapshots query kept fresh.

A `CatalogView` is one immutable answer: the records by snapshot id, and per volume the
time-ordered names of its snapshots (`2026-11-01T03:00:00Z.img`) and the newest. A `Catalog`
holds the current view and, for a query, replaces it at most every `ttl_s` seconds when asked
(`refresh_if_stale`): the query and the building of the new view run in a worker thread, so
the filesystem keeps answering from the old view meanwhile, and a failed refresh keeps the old
view with one log line.

Memory is the catalogue's own size: one `SnapshotRecord` and one name per snapshot (about
400 bytes with the dictionaries), nothing per block, nothing from EBS until an image opens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..ebs.ec2 import SnapshotRecord
from ..ebs.errors import EbsfuseError

if TYPE_CHECKING:
    import trio

# trio is imported where a refresh runs: the command that starts a mount daemon reads
# DEFAULT_TTL_S from here and must stay light.

log = logging.getLogger(__name__)

# How long a catalogue query's answer stands before a listing or an unknown name asks again.
DEFAULT_TTL_S = 60.0


def time_name(record: SnapshotRecord) -> str:
    """A snapshot's name in its volume's directory: its start time, ISO 8601 in UTC, to the
    second, so that names sort as times do."""
    return record.start_datetime.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class VolumeView:
    """One volume's snapshots, oldest first, under their time names."""

    volume_id: str
    names: list[str]
    snapshot_ids: list[str]
    by_name: dict[str, str]

    @property
    def latest(self) -> str:
        return self.snapshot_ids[-1]


class CatalogView:
    """One answer of the catalogue: records by id (sorted) and the volumes' views."""

    def __init__(self, records: Iterable[SnapshotRecord]) -> None:
        by_id = {r.snapshot_id: r for r in records}
        self.records: dict[str, SnapshotRecord] = dict(sorted(by_id.items()))
        self.total_bytes = sum(r.size_bytes for r in self.records.values())
        grouped: dict[str, list[SnapshotRecord]] = {}
        for record in self.records.values():
            grouped.setdefault(record.volume_id, []).append(record)
        self.volumes: dict[str, VolumeView] = {
            volume: _volume_view(volume, members) for volume, members in sorted(grouped.items())
        }

    def __len__(self) -> int:
        return len(self.records)


def _volume_view(volume_id: str, records: list[SnapshotRecord]) -> VolumeView:
    records.sort(key=lambda r: (r.start_time, r.snapshot_id))
    names: list[str] = []
    by_name: dict[str, str] = {}
    for record in records:
        name = time_name(record) + ".img"
        if name in by_name:  # two snapshots started in the same second: the id tells apart
            name = f"{time_name(record)}-{record.snapshot_id}.img"
        names.append(name)
        by_name[name] = record.snapshot_id
    return VolumeView(volume_id, names, [r.snapshot_id for r in records], by_name)


Fetch = Callable[[], Iterable[SnapshotRecord]]


class Catalog:
    """The current view, refreshed from `fetch` (blocking; None for a fixed list)."""

    def __init__(
        self, view: CatalogView, fetch: Fetch | None = None, *, ttl_s: float = DEFAULT_TTL_S
    ) -> None:
        self.view = view
        self.ttl_s = ttl_s
        self._fetch = fetch
        self._next_refresh = time.monotonic() + ttl_s
        self._lock: trio.Lock | None = None
        self.refreshes = 0
        self.failed_refreshes = 0

    @property
    def refreshing(self) -> bool:
        """Whether the list can change (a query), so names may come and go."""
        return self._fetch is not None

    async def refresh_if_stale(self) -> bool:
        """Ask again if the view is older than the TTL; whether the view changed."""
        if self._fetch is None or time.monotonic() < self._next_refresh:
            return False
        import trio

        if self._lock is None:
            self._lock = trio.Lock()
        async with self._lock:
            if time.monotonic() < self._next_refresh:
                return False  # another caller refreshed while this one waited
            return await self._refresh(self._fetch)

    async def _refresh(self, fetch: Fetch) -> bool:
        import trio

        from .reader import ABANDON_ON_CANCEL

        try:
            view = await trio.to_thread.run_sync(_build, fetch, **ABANDON_ON_CANCEL)
        except EbsfuseError as error:
            self.failed_refreshes += 1
            log.warning(
                "catalogue not refreshed, still showing %d snapshots: %s", len(self.view), error
            )
            return False
        finally:
            self._next_refresh = time.monotonic() + self.ttl_s
        old = self.view.records
        added = sum(1 for sid in view.records if sid not in old)
        removed = sum(1 for sid in old if sid not in view.records)
        self.view = view
        self.refreshes += 1
        if added or removed:
            log.info("catalogue: %d added, %d gone, %d snapshots in all", added, removed, len(view))
        return bool(added or removed)


def _build(fetch: Fetch) -> CatalogView:
    return CatalogView(fetch())


def newest_at(records: Iterable[SnapshotRecord], at: float) -> SnapshotRecord | None:
    """The newest snapshot started at or before `at` (seconds since the epoch), or None."""
    best: SnapshotRecord | None = None
    for record in records:
        if record.start_time <= at and (best is None or record.start_time > best.start_time):
            best = record
    return best
