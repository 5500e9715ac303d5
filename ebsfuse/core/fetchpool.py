"""Fetch worker processes: the daemon's GetSnapshotBlock requests, made in other interpreters.

Measured (#16): a cold block cost the daemon 1.2-2.0 ms of CPU, its parts about 0.65 (FUSE
0.15, one GET with its SHA-256 0.5); the rest was 64 threads and the trio thread sharing one
GIL. Here each worker process (`ebs.fetchworker`) fetches and verifies with its own GIL, and
writes the verified bytes into memory shared with the daemon (a memfd). The daemon sends a few
hundred bytes and receives a few dozen; the block stays where the worker wrote it.

The shared memory holds two kinds of slot:
- `slots` request slots, one per request in flight (`--max-concurrency`): taking one is the
  limit of requests in flight. A block answered into one is copied out, and the slot is free.
- `keep` homes: one per block the cache holds, one per request in flight, and a few more. A
  block answered into a home stays there: the daemon hands out a read-only view of it
  (`_HomedBlock`), and the home is free again only when the last reference to the block, and
  to every view of it, is gone. No home is written while anything can still read it, and the
  cache's eviction frees homes as it frees bytes. A block's home is, when free, the one its
  index maps to, so consecutive blocks lie side by side whatever order their requests went
  in, and a FUSE read across them is replied from one view of them (`adjoining`) instead of a
  join. Measured (#16): the copy out of a slot and the join were each 7-9% of the daemon's CPU
  for a cold block.
A request is written into a free home when there is one, else into its own request slot. The
homes run short only while blocks evicted from the cache are still held (a reader's, or a
failure's traceback until the collector takes it); such a block is copied, nothing waits.

Protocol, all on the trio thread, no `await` between the steps of each line:
1. `get` takes a free request slot (at most `slots` requests in flight), and a home if one is
   free, registers a waiter under a new request id, and sends the request to the worker with
   the fewest in flight.
2. Each worker's reader task receives answers, a list per message (the answers of one round
   of the worker's loop), and wakes the waiter of each.
3. The waiter takes its block (a view of its home, or a copy of its request slot) and frees
   its request slot; a failed request frees its home too.
4. A waiter cancelled (budget spent, shutdown) leaves its slots to be freed when its answer
   arrives: the worker's request has its own deadline, so the answer does arrive.
5. A worker that dies fails its waiting requests with a retryable error and is started again.
Retries, tokens, single flight, the budget and counting stay in the reader, unchanged: a worker
makes one attempt and says how it went.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import json
import logging
import mmap
import os
import pickle
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any

import trio

from .. import BLOCK_SIZE
from ..ebs.errors import EbsError, NotSent
from ..ebs.fetchworker import MAX_MESSAGE, error_fields, error_from
from ..ebs.ratelimit import RateLimiter
from ..ebs.settings import ClientSettings

log = logging.getLogger(__name__)

# How long a worker asked to stop may take before it is killed: it only finishes requests
# whose deadlines are seconds away, and nothing it holds needs saving.
STOP_TIMEOUT_S = 5.0
# Answers taken in one go before the reader lets other tasks run: the waiters it woke, and
# the FUSE handlers, should not wait behind a long drain.
DRAIN_BATCH = 16
# Homes beyond one per block the cache holds and one per request in flight. A block's home is
# the one its index maps to on a ring of the homes (`FetchPool.home_for`), last used by the
# block a ring's length before, which a sequential read has passed and the cache evicts, but
# only as the next answer arrives: with no slack that home was still held half the time, the
# block went elsewhere, and only half of a 2 GiB `dd`'s 1 MiB reads found their blocks side by
# side (`adjoining`); with 16 (8 MiB), all of them did.
HOME_SLACK = 16


def homes_for(cache_blocks: int, slots: int) -> int:
    """The homes (`FetchPool`'s `keep`) for a cache of `cache_blocks` and `slots` requests in
    flight: one for each, and the slack that keeps a block's own home free when it asks."""
    return cache_blocks + slots + HOME_SLACK


class _HomedBlock(ctypes.c_char * BLOCK_SIZE):  # type: ignore[misc]
    """A verified block in its home in the shared memory. Views of it (memoryviews, their
    slices) hold it alive, so the home is given back only when nothing can read it any more.
    The last reference may go in any thread (a disk-tier write): `set.add` is atomic."""

    __slots__ = ("_free_homes", "_home", "_memory")

    def __del__(self) -> None:
        self._free_homes.add(self._home)


def _span_type(blocks: int) -> type[ctypes.Array[ctypes.c_char]]:
    """The bytes of `blocks` homes in a row, holding the blocks in them (`_blocks`)."""
    if blocks not in _SPAN_TYPES:
        array = ctypes.c_char * (blocks * BLOCK_SIZE)
        _SPAN_TYPES[blocks] = type(f"_Span{blocks}", (array,), {"__slots__": ("_blocks",)})
    return _SPAN_TYPES[blocks]


_SPAN_TYPES: dict[int, type[ctypes.Array[ctypes.c_char]]] = {}


def adjoining(blocks: list[bytes | memoryview | None]) -> memoryview | None:
    """One read-only view of `blocks` when each is a view of the home right after the one
    before (`FetchPool.home_for`): a FUSE reply across blocks needs no copy then. The view
    holds every block it spans."""
    homed: list[_HomedBlock] = []
    for block in blocks:
        owner = block.obj if isinstance(block, memoryview) else None
        if not isinstance(owner, _HomedBlock):
            return None
        homed.append(owner)
    first = homed[0]
    for offset, owner in enumerate(homed):
        if owner._home != first._home + offset or owner._memory is not first._memory:
            return None
    span = _span_type(len(homed)).from_buffer(first._memory, first._home * BLOCK_SIZE)
    span._blocks = homed  # type: ignore[attr-defined]
    return memoryview(span).toreadonly().cast("B")


class _Waiter:
    __slots__ = ("abandoned", "answer", "event", "home", "slot", "worker")

    def __init__(self, slot: int, home: int, worker: _Worker) -> None:
        self.slot = slot
        self.home = home  # where the worker writes the block: a home, or `slot` itself
        self.worker = worker
        self.event = trio.Event()
        self.answer: tuple[Any, ...] | None = None
        self.abandoned = False


class _Worker:
    """One worker process and the daemon's end of its socket."""

    def __init__(self, number: int, arguments: list[str], memfd: int) -> None:
        self.number = number
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        module = [sys.executable, "-m", "ebsfuse.ebs.fetchworker"]
        self.process = subprocess.Popen(
            [*module, str(theirs.fileno()), str(memfd), *arguments],
            pass_fds=(theirs.fileno(), memfd),
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        ours.setblocking(False)
        self.sock = ours
        self.busy = 0
        self.closed = False
        self._room = trio.Lock()  # held by the one task waiting for the socket to take more

    async def send(self, message: bytes) -> None:
        """Straight to the socket. A full socket (a worker stopped or starved: its buffer holds
        about 200 requests) is waited on by one task at a time, as trio requires of an fd.
        BrokenPipeError once the worker is stopped, also for a task that was waiting."""
        while True:
            if self.closed:
                raise BrokenPipeError(f"fetch worker {self.number} is stopped")
            try:
                self.sock.send(message)
                return
            except BlockingIOError:
                async with self._room:
                    if not self.closed:
                        with contextlib.suppress(trio.ClosedResourceError):
                            await trio.lowlevel.wait_writable(self.sock)

    async def receive(self) -> bytes:
        """The next answer; b"" when the worker is gone. Answers already queued are taken
        without waiting: under load one wake-up drains many (trio's socket wrapper would
        arm epoll for each)."""
        while not self.closed:
            try:
                return self.sock.recv(MAX_MESSAGE)
            except BlockingIOError:
                with contextlib.suppress(trio.ClosedResourceError):
                    await trio.lowlevel.wait_readable(self.sock)
            except OSError:
                return b""
        return b""

    def stop(self) -> None:
        if not self.closed:
            self.closed = True
            # Tasks waiting on the socket are woken first: its descriptor number may soon be
            # another worker's, and trio must not see two waiters on one descriptor.
            with contextlib.suppress(RuntimeError):  # RuntimeError: not in trio (shutdown)
                trio.lowlevel.notify_closing(self.sock)
            self.sock.close()  # the worker reads EOF and ends
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class FetchPool:
    """`get` a verified block through worker processes; run `serve` in a nursery first."""

    def __init__(
        self,
        settings: ClientSettings,
        processes: int,
        slots: int,
        limiter: RateLimiter,
        keep: int = 0,
    ) -> None:
        self.processes = processes
        self.slots = slots
        # One rate for the whole mount, as with threads: the daemon paces every request and
        # learns from every throttling answer; the workers do neither.
        self.limiter = limiter
        # Each worker keeps alive the connections for its share of the requests.
        connections = -(-slots // processes)
        fields = dataclasses.asdict(settings) | {
            "max_rps": None,
            "max_pool_connections": connections,
            "audit_log": None,  # the daemon writes the audit log, from the answers
        }
        # Sparse: a page of the memfd is allocated when a block is first written there.
        size = (slots + keep) * BLOCK_SIZE
        self._arguments = [str(slots + keep), str(connections), json.dumps(fields)]
        self._memfd = os.memfd_create("ebsfuse-blocks", os.MFD_CLOEXEC)
        os.ftruncate(self._memfd, size)
        self._memory = mmap.mmap(self._memfd, size)
        self._view = memoryview(self._memory)
        self._free = list(range(slots))
        self._keep = keep
        self._free_homes = set(range(slots, slots + keep))
        self._slot_freed = trio.lowlevel.ParkingLot()
        self._waiting: dict[int, _Waiter] = {}
        self._ids = itertools.count()
        self._workers: list[_Worker] = []
        self._broken: EbsError | None = None
        self._closed = False
        self.copied = 0  # blocks answered into a request slot, for want of a free home
        self.restarts = 0  # workers started again after one ended

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start the workers and read their answers until cancelled; then stop them."""
        try:
            async with trio.open_nursery() as nursery:
                for number in range(self.processes):
                    self._workers.append(self._start(number))
                    nursery.start_soon(self._read, number)
                task_status.started()
        finally:
            self.close()

    def _start(self, number: int) -> _Worker:
        return _Worker(number, self._arguments, self._memfd)

    async def get(
        self, snapshot_id: str, index: int, token: str, time_left: Callable[[], float]
    ) -> tuple[bytes | memoryview, str, float]:
        """(verified block, its base64 SHA-256, seconds the request took), or EbsError. The
        block is a read-only view of its home in the shared memory, or bytes when no home
        was free.

        `time_left()` is how long the request may take if sent now (NotSent if too little is
        left): asked before the turn of the request rate, and again once a slot is free, so a
        request queued behind others gets what is left, or is not sent.
        """
        if self._broken is not None:
            raise self._broken.fresh()
        await self._take_turn(time_left())
        slot = await self._slot()
        try:
            timeout = time_left()
        except NotSent:
            self._free_slot(slot)
            raise
        home = self._take_home(snapshot_id, index, slot)
        waiter = await self._send(slot, home, (snapshot_id, index, token, timeout))
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.answer is None:
                waiter.abandoned = True  # `_settle` frees the slots when the answer comes
            else:
                self._release(waiter)  # answered in the same round as the cancel
            raise
        return self._take(waiter)

    async def _take_turn(self, timeout: float) -> None:
        """Wait for this request's turn of the mount's one request rate."""
        wait = self.limiter.reserve(time.monotonic() + timeout)
        if wait is None:
            raise self.limiter.no_turn(timeout)
        if wait:
            await trio.sleep(wait)

    async def _send(self, slot: int, home: int, what: tuple[str, int, str, float]) -> _Waiter:
        """Send the request (snapshot, index, token, timeout), to be written into `home`, to
        the least busy worker; its waiter. Not sent (a message goes whole or not at all), the
        slots are freed: no answer will come for them."""
        worker = min(self._workers, key=lambda w: w.busy)
        waiter = _Waiter(slot, home, worker)
        request_id = next(self._ids)
        self._waiting[request_id] = waiter
        worker.busy += 1
        try:
            await worker.send(pickle.dumps((request_id, home, *what)))
        except BaseException as error:
            # (Unless the worker died meanwhile and `_lost` already failed this request.)
            if self._waiting.pop(request_id, None) is not None:
                worker.busy -= 1
            self._release(waiter)
            if isinstance(error, OSError):
                snapshot_id, index = what[:2]
                raise EbsError(
                    f"fetch worker {worker.number} took no request: {error}",
                    snapshot_id=snapshot_id,
                    block_index=index,
                    code="WorkerLost",
                    retryable=True,
                ) from None
            raise
        return waiter

    async def _slot(self) -> int:
        """A free slot: at once if there is one (the usual case, no scheduling), else the
        first one freed. A slot is held until its answer arrives, also by an abandoned
        request, so the count of free slots, not of requests, is what must be waited on."""
        while not self._free:
            await self._slot_freed.park()
        return self._free.pop()

    def _free_slot(self, slot: int) -> None:
        self._free.append(slot)
        self._slot_freed.unpark()

    def stats(self) -> dict[str, int]:
        """For `ebsfuse stats`: the processes, what is in flight and where blocks are held."""
        return {
            "processes": self.processes,
            "requests_in_flight": self.slots - len(self._free),
            "slots": self.slots,
            "homes": self._keep,
            "homes_held": self._keep - len(self._free_homes),
            "blocks_copied": self.copied,
            "restarts": self.restarts,
        }

    def home_for(self, snapshot_id: str, index: int) -> int:
        """The home block `index` of the snapshot takes when it is free: the index's place on a
        ring of the homes, turned by the snapshot (two snapshots read at once start at
        different places). Consecutive blocks get consecutive homes but where the ring wraps.
        A home's last block was a ring's length before, which a snapshot read in order has
        passed and the cache has evicted: the ring is longer than the cache and the requests
        in flight (by `HOME_SLACK`, with `homes_for`)."""
        turn = zlib.crc32(snapshot_id.encode())
        return self.slots + (index + turn) % self._keep

    def _take_home(self, snapshot_id: str, index: int, slot: int) -> int:
        """The block's own home if free, else any free home, else its request slot. (Another
        thread only ever adds to the free homes: a home seen free here stays free.)"""
        if not self._free_homes:
            return slot
        home = self.home_for(snapshot_id, index)
        if home in self._free_homes:
            self._free_homes.remove(home)
            return home
        return self._free_homes.pop()

    def _release(self, waiter: _Waiter) -> None:
        """Both of a request's slots, with no block to keep in its home."""
        self._free_slot(waiter.slot)
        if waiter.home != waiter.slot:
            self._free_homes.add(waiter.home)

    def _take(self, waiter: _Waiter) -> tuple[bytes | memoryview, str, float]:
        answer = waiter.answer
        assert answer is not None
        _, error, checksum, seconds = answer
        if error:
            self._release(waiter)
            raise error_from(error)
        data: bytes | memoryview
        if waiter.home == waiter.slot:
            start = waiter.slot * BLOCK_SIZE
            data = bytes(self._view[start : start + BLOCK_SIZE])
            self.copied += 1
        else:
            data = self._homed(waiter.home)
        self._free_slot(waiter.slot)
        return data, checksum, seconds

    def _homed(self, home: int) -> memoryview:
        """A read-only view of the block in `home`; the home is free once nothing holds it."""
        block = _HomedBlock.from_buffer(self._memory, home * BLOCK_SIZE)
        block._home = home
        block._free_homes = self._free_homes
        block._memory = self._memory
        return memoryview(block).toreadonly().cast("B")

    async def _read(self, number: int) -> None:
        for received in itertools.count(1):
            worker = self._workers[number]
            message = await worker.receive()
            answers = self._answers_in(message, worker) if message else None
            if answers is not None:
                for answer in answers:  # the answers of one round of the worker
                    self._settle(answer)
                if received % DRAIN_BATCH == 0:
                    await trio.sleep(0)  # a long drain lets the FUSE handlers run too
                continue
            self._lost(worker)
            if self._closed or self._broken is not None:
                return
            self._workers[number] = self._start(number)
            self.restarts += 1

    @staticmethod
    def _answers_in(message: bytes, worker: _Worker) -> list[tuple[Any, ...]] | None:
        """A message's answers; None, and the worker stopped, if it is not one: a worker that
        says something unreadable is treated as lost (its requests fail and are retried)."""
        try:
            answers = pickle.loads(message)
            if isinstance(answers, list) and all(isinstance(a, tuple) for a in answers):
                return answers
        except Exception:  # whatever the bytes were, the daemon goes on
            pass
        log.error("fetch worker %d sent an unreadable answer: stopping it", worker.number)
        worker.process.kill()
        return None

    def _settle(self, answer: tuple[Any, ...]) -> None:
        if answer[0] == -1:  # the worker could not make its client: nothing will work
            self._broken = error_from(answer[1])
            log.error("fetch workers cannot start: %s", self._broken)
            return
        waiter = self._waiting.pop(answer[0], None)
        if waiter is None:
            return
        waiter.worker.busy -= 1
        waiter.answer = answer
        if answer[1] is not None and answer[1].get("throttled"):
            self.limiter.throttled()  # as it arrives, whether or not anyone still waits for it
        if waiter.abandoned:
            self._release(waiter)
        else:
            waiter.event.set()

    def _lost(self, worker: _Worker) -> None:
        """A worker ended: its requests fail, to be retried (by another, or its successor)."""
        code = worker.process.poll()
        if not self._closed:
            log.warning("fetch worker %d ended (status %s): starting another", worker.number, code)
        failure = error_fields(
            EbsError(f"fetch worker ended (status {code})", code="WorkerLost", retryable=True)
        )
        for request_id, waiter in list(self._waiting.items()):
            if waiter.worker is worker:
                self._settle((request_id, failure, None, 0.0))
        worker.stop()

    def close(self) -> None:
        """Stop every worker (each reads EOF); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            worker.stop()
        self._view.release()
        # Blocks still held (the cache's, until it goes) keep their pages mapped: the memory is
        # unmapped when the last of them goes.
        with contextlib.suppress(BufferError):
            self._memory.close()
        os.close(self._memfd)
