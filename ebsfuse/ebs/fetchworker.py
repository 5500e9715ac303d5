"""A fetch worker process: GetSnapshotBlock and its checks, outside the daemon's interpreter.

`python -m ebsfuse.ebs.fetchworker FD MEMFD SLOTS THREADS SETTINGS_JSON` is started by the
daemon's `core.fetchpool.FetchPool`. It reads requests from the socket FD (SOCK_SEQPACKET, one
pickled tuple a message), fetches each block on one of THREADS threads with the lean client
(`FastBlockGetter`: SigV4, HTTP/1.1, deadline, length and SHA-256 checked against the
headers), writes the verified bytes into the request's slot of the shared memory MEMFD, and
answers with the checksum, or with the error's fields. A block is written to its slot only
once verified, so the daemon never sees unverified bytes.

The worker has its own interpreter and GIL: hashing and HTTP parsing here cost the daemon
nothing. It ends when the daemon closes the socket, and is killed if the daemon dies
(PR_SET_PDEATHSIG), so no worker outlives its mount.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import pickle
import signal
import socket
import sys
import threading
import time
from typing import Any

from .. import BLOCK_SIZE
from .errors import EbsError, NotSent
from .fastget import FastBlockGetter
from .ratelimit import Unpaced
from .settings import ClientSettings
from .verify import require_whole_block

PR_SET_PDEATHSIG = 1
# A request or an answer: ids, a token of up to a few hundred bytes, an error message.
MAX_MESSAGE = 64 * 1024

Request = tuple[int, int, str, int, str, float]  # id, slot, snapshot, index, token, timeout


def error_fields(error: EbsError) -> dict[str, Any]:
    """An error as plain fields, to cross the process boundary and be raised again."""
    return {
        "message": error.message,
        "snapshot_id": error.snapshot_id,
        "block_index": error.block_index,
        "code": error.code,
        "reason": error.reason,
        "retryable": error.retryable,
        "throttled": error.throttled,
        "not_sent": isinstance(error, NotSent),
    }


def error_from(fields: dict[str, Any]) -> EbsError:
    """The error `error_fields` described, of the same class."""
    if fields.get("not_sent"):
        return NotSent(fields["message"])
    return EbsError(
        fields["message"],
        snapshot_id=fields.get("snapshot_id"),
        block_index=fields.get("block_index"),
        code=fields.get("code"),
        reason=fields.get("reason"),
        retryable=bool(fields.get("retryable")),
        throttled=bool(fields.get("throttled")),
    )


class Worker:
    """Answers the daemon's requests, several at once, each into its slot."""

    def __init__(self, sock: socket.socket, slots: mmap.mmap, getter: FastBlockGetter) -> None:
        self._sock = sock
        self._slots = slots
        self._getter = getter
        self._send_lock = threading.Lock()

    def serve(self, threads: int) -> None:
        """`threads` threads each receive a request (a datagram goes to exactly one of them),
        answer it, and receive the next: no queue between receiving and fetching."""
        workers = [
            threading.Thread(target=self._loop, name=f"fetch-{n}", daemon=True)
            for n in range(threads)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    def _loop(self) -> None:
        while True:
            message = self._sock.recv(MAX_MESSAGE)
            if not message:
                # The daemon closed its end; wake the other threads with EOF as well.
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
                return
            self._answer(pickle.loads(message))

    def _answer(self, request: Request) -> None:
        request_id, slot, snapshot_id, index, token, timeout = request
        started = time.monotonic()
        try:
            data, checksum = self._getter.get_verified_block(snapshot_id, index, token, timeout)
            require_whole_block(data, snapshot_id=snapshot_id, block_index=index)
            self._slots[slot * BLOCK_SIZE : (slot + 1) * BLOCK_SIZE] = data
            answer: tuple[Any, ...] = (request_id, None, checksum, time.monotonic() - started)
        except EbsError as error:
            answer = (request_id, error_fields(error), None, time.monotonic() - started)
        except Exception as error:  # a bug here must not leave the daemon waiting
            fields = error_fields(EbsError(f"fetch worker: {error!r}", code="WorkerError"))
            answer = (request_id, fields, None, time.monotonic() - started)
        with self._send_lock:
            self._sock.send(pickle.dumps(answer))


def main(argv: list[str]) -> None:
    fd, memfd, slots, threads = (int(x) for x in argv[:4])
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
        sock.send(pickle.dumps((-1, error_fields(error), None, 0.0)))
        return
    Worker(sock, memory, getter).serve(threads)


if __name__ == "__main__":
    main(sys.argv[1:])
