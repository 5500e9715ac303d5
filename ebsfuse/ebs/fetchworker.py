"""A fetch worker process: GetSnapshotBlock and its checks, outside the daemon's interpreter.

`python -m ebsfuse.ebs.fetchworker FD MEMFD SLOTS CONNECTIONS SETTINGS_JSON` is started by the
daemon's `core.fetchpool.FetchPool`. It reads requests from the socket FD (SOCK_SEQPACKET, one
pickled tuple a message), receives each block straight into the request's slot of the shared
memory MEMFD, checks its length and SHA-256 there, and answers with the checksum, or with the
error's fields (a pickled list a message: the answers of one round of its loop). The daemon
reads a slot only after its answer, so it never sees unverified bytes. At most CONNECTIONS
idle keep-alive connections are kept.

The worker has its own interpreter and GIL: hashing and HTTP cost the daemon nothing. It ends
when the daemon closes the socket, and is killed if the daemon dies (PR_SET_PDEATHSIG), so no
worker outlives its mount.

One thread serves every request in flight (`FetchLoop`). Measured (#16): with a thread per
request, the worker paid more for threads than for HTTP. Every socket call released the GIL
and woke a waiting thread (strace: about 100 futex calls per block), and every request
datagram woke all the threads idle on the request socket. Here one thread waits on epoll for
the request socket, every connection, and the wake-ups of the threads that make new
connections (TCP, a proxy's tunnel, the TLS handshake: blocking, with the lean client's own
code, and rare under keep-alive). The worker's CPU per cold block fell from 0.74-0.78 ms to
0.58-0.64 (scripts/bench-mount, 50 ms latency); half of what is left is SHA-256.

The rules are the lean client's, not copies: `FastBlockGetter.prepare_block` signs the request
and sets its time limit, `ResponseReader` frames the answer (the loop only answers its steps
from a nonblocking socket), `verified` checks length and SHA-256, and `network_error` /
`service_error` name each failure as boto3 would. The deadline is kept by the loop instead of
the watchdog: a flight past its deadline, or silent for the read timeout, is dropped with its
connection and answered with the error the blocking path gives.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import pickle
import queue
import select
import signal
import socket
import ssl
import sys
import threading
import time
from typing import Any

from .. import BLOCK_SIZE
from .errors import ChecksumMismatch, EbsError, NotSent
from .fastget import (
    MAX_ERROR_BODY,
    STEP_INTO,
    STEP_LINE,
    Connection,
    FastBlockGetter,
    IncompleteBody,
    Oversized,
    PreparedGet,
    ProtocolError,
    Response,
    ResponseReader,
    Step,
)
from .ratelimit import Unpaced
from .settings import ClientSettings
from .verify import require_whole_block

PR_SET_PDEATHSIG = 1
# A request, or a round's answers: ids, a token of up to a few hundred bytes, error messages.
MAX_MESSAGE = 64 * 1024
# An error's fields cross to the daemon cut here: the server chooses them (its error type
# header, the body's Reason), and a round's answers must fit in MAX_MESSAGE. The service's
# codes and reasons are a few dozen characters.
MAX_ERROR_MESSAGE = 4096
MAX_ERROR_NAME = 256
# Deadlines are seconds long and the blocking path's watchdog looks every 0.25 s; looking every
# 0.1 s costs a scan of a few dozen flights ten times a second.
SCAN_S = 0.1
# New connections are made on this many threads. Keep-alive makes connecting rare (the first
# requests of a mount, and after the server closes one); four at a time still open a pool of
# 64 in a few round trips.
CONNECTORS = 4
# Bytes received ahead of the reader's steps: a response's head in one receive, and room for
# the longest header line the reader accepts.
STREAM_BUFFER = ResponseReader.MAX_LINE + 64 * 1024
# Steps of one response taken in a row before the other flights get their turn: a whole
# answer's head and body are a dozen; a server sending a million one-byte chunks is not
# served ahead of everyone else.
STEPS_PER_TURN = 64
# How often the worker's refresher thread asks for the credentials. botocore refreshes temporary
# credentials (IMDS, STS: milliseconds to seconds) in their last 15 minutes; a caller that finds
# the refresh under way in another thread goes on with the current ones unless fewer than 10
# minutes are left. Asked every minute from a thread of its own, the refresh starts there, and
# the loop, which signs every request, never waits for it.
REFRESH_EVERY_S = 60.0
# madvise(2)'s MADV_POPULATE_WRITE (Linux 5.14): a slot's pages are allocated in one call the
# first time a block is written there, not by a fault per 4 KiB page. On this VM a page's first
# touch is what costs (0.40 ms per 512 KiB by faults, 0.29 populated, 0.05 once touched); the
# daemon's homes are touched once each, as the cache first fills. Older kernels refuse it, and
# the faults do the same work.
MADV_POPULATE_WRITE = 23
# A nonblocking socket with nothing to give or take now; under TLS either way round, since a
# read may need to write (and a write to read).
WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
# What a connection fails with below HTTP (a bug is anything else).
NETWORK_FAILURES = (OSError, ssl.SSLError, ProtocolError, Oversized, IncompleteBody)

Request = tuple[int, int, str, int, str, float]  # id, slot, snapshot, index, token, timeout
Answer = tuple[int, dict[str, Any] | None, str | None, float]  # id, error, checksum, seconds


def error_fields(error: EbsError) -> dict[str, Any]:
    """An error as plain fields, to cross the process boundary and be raised again."""
    return {
        "message": error.message[:MAX_ERROR_MESSAGE],
        "snapshot_id": error.snapshot_id,
        "block_index": error.block_index,
        "code": error.code and error.code[:MAX_ERROR_NAME],
        "reason": error.reason and error.reason[:MAX_ERROR_NAME],
        "retryable": error.retryable,
        "throttled": error.throttled,
        "not_sent": isinstance(error, NotSent),
        "checksum": isinstance(error, ChecksumMismatch),
    }


def error_from(fields: dict[str, Any]) -> EbsError:
    """The error `error_fields` described, of the same class."""
    if fields.get("not_sent"):
        return NotSent(fields["message"])
    kind = ChecksumMismatch if fields.get("checksum") else EbsError
    return kind(
        fields["message"],
        snapshot_id=fields.get("snapshot_id"),
        block_index=fields.get("block_index"),
        code=fields.get("code"),
        reason=fields.get("reason"),
        retryable=bool(fields.get("retryable")),
        throttled=bool(fields.get("throttled")),
    )


class _WouldBlock(Exception):
    """The socket can take or give nothing more now (either way: TLS may need both)."""


class Stream:
    """A keep-alive connection in the loop: its nonblocking socket, and the bytes received past
    what the reader's steps took. Answers a step as far as the socket allows; a partial answer
    is kept and completed on the next call."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.sock = conn.sock
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self._buffer = bytearray(STREAM_BUFFER)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0
        self._eof = False
        self.last_io = time.monotonic()  # the last byte sent or received: a read timeout's start
        self._collected = bytearray()  # a STEP_READ answer being gathered
        self._filled = 0  # an STEP_INTO answer's bytes so far

    def close(self) -> None:
        self.conn.close()

    def dropped(self) -> bool:
        """Not to be reused: bytes past the last answer, the end of the stream, or (asked of
        the socket just before reuse, as the blocking pool does) anything readable while idle.
        Bytes nobody asked for may be a whole answer to some other request: read as the next
        answer they would pass its checksum with another block's bytes."""
        return self._start != self._end or self._eof or self.conn.dropped()

    def send(self, data: memoryview) -> int:
        try:
            sent = self.sock.send(data)
        except WOULD_BLOCK:
            raise _WouldBlock() from None
        self.last_io = time.monotonic()
        return sent

    def answer(self, step: Step) -> Any:
        """What `step` asks for, or `_WouldBlock` until the socket has it."""
        kind, arg = step
        if kind == STEP_LINE:
            return self._line(arg)
        if kind == STEP_INTO:
            return self._into(arg)
        return self._read(arg)

    def _line(self, limit: int) -> bytes:
        while True:
            newline = self._buffer.find(b"\n", self._start, self._end)
            if newline >= 0 or self._end - self._start >= limit or self._eof:
                stop = self._end if newline < 0 else newline + 1
                stop = min(stop, self._start + limit)
                line = bytes(self._view[self._start : stop])
                self._start = stop
                return line
            self._receive()

    def _read(self, size: int) -> bytes:
        while True:
            take = min(size - len(self._collected), self._end - self._start)
            self._collected += self._view[self._start : self._start + take]
            self._start += take
            if len(self._collected) == size or self._eof:
                data, self._collected = bytes(self._collected), bytearray()
                return data
            self._receive()

    def _into(self, target: memoryview) -> int:
        """Fill `target`: what the buffer holds, then straight from the socket, no copy."""
        take = min(len(target) - self._filled, self._end - self._start)
        target[self._filled : self._filled + take] = self._view[self._start : self._start + take]
        self._start += take
        self._filled += take
        while self._filled < len(target) and not self._eof:
            received = self._recv_into(target[self._filled :])
            self._filled += received
            self._eof = received == 0
        filled, self._filled = self._filled, 0
        return filled

    def _receive(self) -> None:
        """More bytes into the buffer, after moving what is left to its front."""
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buffer):
            left = self._end - self._start
            self._view[:left] = self._view[self._start : self._end]
            self._start, self._end = 0, left
        received = self._recv_into(self._view[self._end :])
        self._end += received
        self._eof = received == 0

    def _recv_into(self, target: memoryview) -> int:
        try:
            received = self.sock.recv_into(target)
        except WOULD_BLOCK:
            raise _WouldBlock() from None
        self.last_io = time.monotonic()
        return received


class Flight:
    """One request in the loop, from its arrival to its answer."""

    def __init__(self, request_id: int, slot: int, get: PreparedGet, started: float) -> None:
        self.request_id = request_id
        self.slot = slot
        self.get = get
        self.started = started
        self.deadline = started + get.limit
        self.stream: Stream | None = None
        self.reader: ResponseReader | None = None
        self.steps: Any = None  # the reader's steps, once it has a connection
        self.step: Step | None = None
        self.unsent = memoryview(get.head)
        self.done = False


Made = tuple[Flight, Connection | None, Exception | None]


class Connector:
    """Makes connections on a few threads, so the loop never waits for a handshake; each one
    made (or its failure) is handed back with a byte on the wake socket."""

    def __init__(self, getter: FastBlockGetter, threads: int) -> None:
        self.wake, self._waker = socket.socketpair()
        self.wake.setblocking(False)
        self._jobs: queue.SimpleQueue[Flight | None] = queue.SimpleQueue()
        self.made: queue.SimpleQueue[Made] = queue.SimpleQueue()
        self._getter = getter
        self._threads = [
            threading.Thread(target=self._run, name=f"connect-{n}", daemon=True)
            for n in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def request(self, flight: Flight) -> None:
        self._jobs.put(flight)

    def _run(self) -> None:
        while (flight := self._jobs.get()) is not None:
            conn: Connection | None = None
            failure: Exception | None = None
            try:
                if flight.done:  # its deadline passed while it waited for a thread
                    continue
                conn = self._getter.open_connection(flight.deadline)
            except Exception as error:
                failure = error
            self.made.put((flight, conn, failure))
            with contextlib.suppress(OSError):
                self._waker.send(b"!")

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        self._waker.close()
        self.wake.close()


class Refresher:
    """A thread that asks for the credentials every `every` seconds (`REFRESH_EVERY_S`)."""

    def __init__(self, getter: FastBlockGetter, every: float) -> None:
        self._getter = getter
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="refresh", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self._getter.refresh_credentials()

    def close(self) -> None:
        self._stop.set()


class FetchLoop:
    """Answers the daemon's requests from `requests`, each block into its slot of `slots`."""

    def __init__(
        self,
        getter: FastBlockGetter,
        requests: socket.socket,
        slots: memoryview,
        keep: int,
        refresh_every: float = REFRESH_EVERY_S,
    ) -> None:
        self._getter = getter
        self._requests = requests
        self._requests.setblocking(False)
        self._slots = slots
        self._untouched = bytearray(b"\x01" * (len(slots) // BLOCK_SIZE))
        self._keep_at_most = max(1, keep)
        self._idle: dict[int, Stream] = {}  # kept alive for the next request, by descriptor
        self._reading: dict[int, Flight] = {}  # flights with a connection, by its descriptor
        self._connecting: set[Flight] = set()
        self._ready: list[Flight] = []  # flights with more to read, past their turn's steps
        self._answers: list[Answer] = []  # this round's, sent together by `_flush`
        self._pending: list[bytes] = []  # messages the daemon's socket had no room for yet
        self._waiting_to_send = False
        self._epoll = select.epoll()
        self._connector = Connector(getter, CONNECTORS)
        self._refresher = Refresher(getter, refresh_every)
        self._open = True

    def run(self) -> None:
        """Serve until the daemon closes its end of the socket."""
        self._epoll.register(self._requests, select.EPOLLIN)
        self._epoll.register(self._connector.wake, select.EPOLLIN)
        requests_fd, wake_fd = self._requests.fileno(), self._connector.wake.fileno()
        next_scan = time.monotonic() + SCAN_S
        try:
            while self._open:
                busy = self._reading or self._connecting
                timeout = max(0.0, next_scan - time.monotonic()) if busy else -1
                ready, self._ready = self._ready, []
                for more in ready:
                    if more.stream is not None:  # not ended meanwhile
                        self._advance(more)
                if self._ready:
                    timeout = 0
                for fd, events in self._epoll.poll(timeout):
                    if fd == requests_fd:
                        self._requests_ready(events)
                    elif fd == wake_fd:
                        self._connections_made()
                    elif (flight := self._reading.get(fd)) is not None:
                        self._advance(flight)
                now = time.monotonic()
                if now >= next_scan:
                    self._expire(now)
                    next_scan = now + SCAN_S
                if self._answers:
                    self._flush()
        finally:
            self.close()

    # -- requests and answers -------------------------------------------------------------------

    def _requests_ready(self, events: int) -> None:
        if events & select.EPOLLOUT:
            self._send_pending()
        while self._open:
            try:
                message = self._requests.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                message = b""
            if not message:
                self._open = False  # the daemon closed its end: the mount is ending
                return
            self._start(pickle.loads(message))

    def _start(self, request: Request) -> None:
        request_id, slot, snapshot_id, index, token, timeout = request
        started = time.monotonic()
        try:
            get = self._getter.prepare_block(snapshot_id, index, token, timeout)
        except EbsError as error:
            self._send((request_id, error_fields(error), None, 0.0))
            return
        flight = Flight(request_id, slot, get, started)
        stream = self._idle_stream()
        if stream is None:
            self._connecting.add(flight)
            self._connector.request(flight)
        else:
            self._begin(flight, stream)

    def _send(self, answer: Answer) -> None:
        self._answers.append(answer)

    def _flush(self) -> None:
        """The answers of this round, as few messages: one wake-up of the daemon and one
        receive there for all the blocks that arrived together."""
        batches = [self._answers]
        self._answers = []
        while batches:
            batch = batches.pop()
            message = pickle.dumps(batch)
            if len(message) > MAX_MESSAGE and len(batch) > 1:
                half = len(batch) // 2
                batches += [batch[half:], batch[:half]]
            elif len(message) > MAX_MESSAGE:  # cannot happen with the fields cut; never truncate
                request_id, _, _, seconds = batch[0]
                too_long = EbsError("fetch worker: the answer was too long", code="WorkerError")
                self._pending.append(
                    pickle.dumps([(request_id, error_fields(too_long), None, seconds)])
                )
            else:
                self._pending.append(message)
        self._send_pending()

    def _send_pending(self) -> None:
        """Send the messages queued; if the daemon's socket is full, wait until it is not."""
        was_waiting = self._waiting_to_send
        sent = 0
        try:
            for message in self._pending:
                self._requests.send(message)
                sent += 1
        except BlockingIOError:
            pass
        except OSError:
            self._open = False  # the daemon is gone
            sent = len(self._pending)
        del self._pending[:sent]
        self._waiting_to_send = bool(self._pending)
        if self._waiting_to_send != was_waiting:
            mask = select.EPOLLIN | (select.EPOLLOUT if self._waiting_to_send else 0)
            with contextlib.suppress(OSError, ValueError):
                self._epoll.modify(self._requests, mask)

    # -- connections ----------------------------------------------------------------------------

    def _idle_stream(self) -> Stream | None:
        while self._idle:
            _, stream = self._idle.popitem()
            if not stream.dropped():
                return stream
            stream.close()
        return None

    def _keep(self, stream: Stream) -> None:
        if len(self._idle) < self._keep_at_most and self._open:
            self._idle[stream.fd] = stream
        else:
            stream.close()

    def _stream(self, conn: Connection) -> Stream:
        """A new connection, watched from now until it is closed. Edge-triggered: a flight
        reads and writes until the socket would block, so an edge is never missed, and a
        stream needs no epoll call per request (a level-triggered one took three)."""
        stream = Stream(conn)
        self._epoll.register(stream.fd, select.EPOLLIN | select.EPOLLOUT | select.EPOLLET)
        return stream

    def _connections_made(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._connector.wake.recv(4096):
                pass
        while not self._connector.made.empty():
            flight, conn, failure = self._connector.made.get()
            if flight not in self._connecting:  # answered already: its deadline passed
                if conn is not None:
                    self._keep(self._stream(conn))
                continue
            self._connecting.discard(flight)
            if conn is not None:
                self._begin(flight, self._stream(conn))
            else:
                assert failure is not None
                self._fail(flight, failure)

    def _slot(self, slot: int) -> memoryview:
        if self._untouched[slot]:
            self._untouched[slot] = 0
            self._populate(slot)
        return self._slots[slot * BLOCK_SIZE : (slot + 1) * BLOCK_SIZE]

    def _populate(self, slot: int) -> None:
        memory = self._slots.obj
        if isinstance(memory, mmap.mmap):
            with contextlib.suppress(OSError):
                memory.madvise(MADV_POPULATE_WRITE, slot * BLOCK_SIZE, BLOCK_SIZE)

    # -- a flight's progress --------------------------------------------------------------------

    def _begin(self, flight: Flight, stream: Stream) -> None:
        flight.stream = stream
        stream.last_io = time.monotonic()  # its silence counts from this request on
        flight.reader = ResponseReader(MAX_ERROR_BODY, BLOCK_SIZE, self._slot(flight.slot))
        flight.steps = flight.reader.steps()
        flight.step = next(flight.steps)
        self._reading[stream.fd] = flight
        self._advance(flight)

    def _advance(self, flight: Flight) -> None:
        """Take the flight as far as its socket allows, within STEPS_PER_TURN: send the head,
        answer the reader's steps, and finish when the response is whole. A flight with more
        to do waits its next turn in `_ready` (the edge-triggered socket will not say again
        that it has bytes), so a server flooding one answer cannot starve the others."""
        stream = flight.stream
        assert stream is not None and flight.step is not None
        try:
            while flight.unsent:
                flight.unsent = flight.unsent[stream.send(flight.unsent) :]
            for _ in range(STEPS_PER_TURN):
                answer = stream.answer(flight.step)
                flight.step = flight.steps.send(answer)
            if time.monotonic() >= flight.deadline:
                self._fail(flight, TimeoutError())
            else:
                self._ready.append(flight)
            return
        except _WouldBlock:
            return  # the stream's edge-triggered registration wakes the flight for more
        except StopIteration as done:
            response: Response = done.value
        except NETWORK_FAILURES as error:
            self._fail(flight, error)
            return
        except Exception as error:  # a bug here must not leave the daemon waiting
            self._fail_by_bug(flight, error)
            return
        try:
            self._finish(flight, response)
        except Exception as error:
            self._fail_by_bug(flight, error)

    def _finish(self, flight: Flight, response: Response) -> None:
        stream = self._release(flight)
        if response.reusable:
            self._keep(stream)
        else:
            stream.close()
        where = flight.get.where
        try:
            if response.status >= 300:
                raise self._getter.service_error(response, where)
            self._getter.verified(response.body, response.headers, where)
            require_whole_block(response.body, **where)
            if not isinstance(response.body, memoryview):  # chunked: not received in place
                self._slot(flight.slot)[:] = response.body
        except EbsError as error:
            self._answer_error(flight, error)
            return
        seconds = time.monotonic() - flight.started
        self._send((flight.request_id, None, response.headers["x-amz-checksum"], seconds))

    def _fail(self, flight: Flight, error: BaseException) -> None:
        """The flight ends with a failure below HTTP; its connection is not reused. A timeout
        at its deadline is named the deadline's by `network_error`, as on the blocking path."""
        if flight.stream is None:
            phase = "connect"
        else:
            assert flight.reader is not None
            phase = "body" if flight.reader.in_body else "send"
            self._release(flight).close()
        get = flight.get
        failure = self._getter.network_error(
            error, phase, get.path, get.where, get.limit, flight.deadline
        )
        self._answer_error(flight, failure)

    def _fail_by_bug(self, flight: Flight, error: Exception) -> None:
        if flight.stream is not None:
            self._release(flight).close()
        failure = EbsError(f"fetch worker: {error!r}", code="WorkerError", **flight.get.where)
        self._answer_error(flight, failure)

    def _answer_error(self, flight: Flight, error: EbsError) -> None:
        flight.done = True
        seconds = time.monotonic() - flight.started
        self._send((flight.request_id, error_fields(error), None, seconds))

    def _release(self, flight: Flight) -> Stream:
        stream = flight.stream
        assert stream is not None
        flight.stream = None
        del self._reading[stream.fd]
        return stream

    def _expire(self, now: float) -> None:
        """Flights past their deadline, or silent for the read timeout, fail as they would on
        the blocking path: the deadline's ReadTimeoutError, or a read timeout."""
        for flight in [f for f in self._connecting if now >= f.deadline]:
            self._connecting.discard(flight)  # its connection, when made, is kept for later
            self._fail(flight, TimeoutError())
        read_timeout = self._getter.settings.read_timeout_s
        for flight in list(self._reading.values()):
            assert flight.stream is not None  # a reading flight has its connection
            if now >= min(flight.deadline, flight.stream.last_io + read_timeout):
                self._fail(flight, TimeoutError())

    def close(self) -> None:
        for flight in list(self._reading.values()):
            self._release(flight).close()
        for stream in self._idle.values():
            stream.close()
        self._idle.clear()
        self._refresher.close()
        self._connector.close()
        self._epoll.close()


def main(argv: list[str]) -> None:
    fd, memfd, slots, connections = (int(x) for x in argv[:4])
    settings = ClientSettings(**json.loads(argv[4]))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        return  # the daemon died before the line above took effect
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the daemon's to handle
    sock = socket.socket(fileno=fd)
    memory = mmap.mmap(memfd, slots * BLOCK_SIZE)
    os.close(memfd)
    try:
        getter = FastBlockGetter(settings)
        getter.limiter = Unpaced()  # the daemon paces every request of the mount
    except EbsError as error:
        # Reported by failing every request: the daemon names it once per block it needed.
        sock.send(pickle.dumps([(-1, error_fields(error), None, 0.0)]))
        return
    FetchLoop(getter, sock, memoryview(memory), connections).run()


if __name__ == "__main__":
    main(sys.argv[1:])
