"""The fetch worker's event loop (`fetchworker.FetchLoop`) behind a blocking `get_block`, so the
lean transport's tests run against it as well as against `FastBlockGetter`'s threads.

The loop runs on a thread of the test process, on the real protocol: pickled requests on a
SOCK_SEQPACKET socket, blocks into slots of a shared mapping, answers with the checksum or the
error's fields, raised again here as the daemon raises them.
"""

from __future__ import annotations

import itertools
import mmap
import pickle
import socket
import threading
from typing import Any

from ebsfuse import BLOCK_SIZE
from ebsfuse.ebs.fastget import FastBlockGetter
from ebsfuse.ebs.fetchworker import MAX_MESSAGE, REFRESH_EVERY_S, FetchLoop, error_from
from ebsfuse.ebs.ratelimit import Unpaced
from ebsfuse.ebs.settings import ClientSettings

# The seconds a request may take when the test gives none: the lean client's own limit rules.
NO_TIMEOUT = 3600.0


class LoopGetter:
    """`get_block` through a `FetchLoop`, one request at a time."""

    def __init__(
        self,
        settings: ClientSettings,
        credentials_provider: Any = None,
        refresh_every: float = REFRESH_EVERY_S,
    ) -> None:
        self.getter = FastBlockGetter(settings, credentials_provider)
        self.getter.limiter = Unpaced()  # as in a worker: the daemon paces
        self._ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._view = memoryview(mmap.mmap(-1, BLOCK_SIZE))
        connections = settings.max_pool_connections
        loop = FetchLoop(self.getter, theirs, self._view, connections, refresh_every)
        self._thread = threading.Thread(target=self._serve, args=(loop, theirs), daemon=True)
        self._thread.start()
        self._ids = itertools.count()

    @staticmethod
    def _serve(loop: FetchLoop, sock: socket.socket) -> None:
        with sock:
            loop.run()

    def get_block(
        self, snapshot_id: str, index: int, token: str, *, timeout: float | None = None
    ) -> bytes:
        request_id = next(self._ids)
        request = (request_id, 0, snapshot_id, index, token, timeout or NO_TIMEOUT)
        self._ours.send(pickle.dumps(request))
        (answer,) = pickle.loads(self._ours.recv(MAX_MESSAGE))  # a round's answers: this one
        answer_id, error, _checksum, _seconds = answer
        assert answer_id == request_id
        if error is not None:
            raise error_from(error)
        return bytes(self._view)

    def close(self) -> None:
        self._ours.close()  # the loop reads EOF and ends
        self._thread.join(10)
        assert not self._thread.is_alive()
        # The mapping goes with the last view of it (the loop's flights may still hold some).

    def __enter__(self) -> LoopGetter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# A getter of the lean transport, as the tests make it (conftest's `lean` fixture).
LeanGetter = FastBlockGetter | LoopGetter
