"""The lean transport's bounds, against a server that misbehaves on purpose (no FUSE).

A per-read socket timeout never fires on a body that trickles; every request here has a
total deadline instead. A block answer announcing more than 512 KiB is refused before it is
read; a listing that is not JSON is a retryable `MalformedListing`, never an empty page.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from ebsfuse.ebs.client import ClientSettings, EbsClient
from ebsfuse.ebs.errors import EbsError
from tests.worker_loop import LeanGetter

SID = "snap-0123456789abcdef0"
# "Fails within its deadline, never hangs" is each test's timeout to enforce, not a clock's:
# the deadlines under test are seconds, the socket timeouts they must beat are 300 s.
pytestmark = pytest.mark.timeout(60)

Behaviour = Callable[[socket.socket], None]


class MisbehavingServer:
    """Loopback HTTP: reads one request head per connection, then runs `behave(sock)`."""

    def __init__(self, behave: Behaviour) -> None:
        self.behave = behave
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sent = 0
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError), sock:
            head = b""
            while b"\r\n\r\n" not in head:
                data = sock.recv(65536)
                if not data:
                    return
                head += data
                if not head.startswith((b"GET", b"PUT", b"POST")):
                    break  # not HTTP (a TLS ClientHello): behave at once
            self.behave(sock)

    def send(self, sock: socket.socket, data: bytes) -> None:
        sock.sendall(data)
        self.sent += len(data)

    def trickle(self, sock: socket.socket, data: bytes, every_s: float = 0.2) -> None:
        for i in range(len(data)):
            if self._stop.wait(every_s):
                return
            self.send(sock, data[i : i + 1])

    def say_nothing(self) -> None:
        """Keep the connection open and silent until the test ends."""
        self._stop.wait(60)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Behaviour], MisbehavingServer]]:
    servers: list[MisbehavingServer] = []

    def make(behave: Behaviour) -> MisbehavingServer:
        servers.append(MisbehavingServer(behave))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EBS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")


def getter(lean: Callable[..., LeanGetter], server: MisbehavingServer) -> LeanGetter:
    # A per-read timeout far longer than the test: only the total deadline can end it.
    return lean(
        ClientSettings(endpoint_url=server.endpoint, region="us-east-1", read_timeout_s=300)
    )


def failure(fn: Callable[[], object]) -> EbsError:
    with pytest.raises(EbsError) as info:
        fn()
    return info.value


HEAD_512K = (
    b"HTTP/1.1 200 OK\r\nx-amz-Data-Length: 524288\r\nx-amz-Checksum: AAAA\r\n"
    b"x-amz-Checksum-Algorithm: SHA256\r\nContent-Length: 524288\r\n\r\n"
)


@pytest.mark.usefixtures("aws")
@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_trickle_ends_at_the_total_deadline(
    lean: Callable[..., LeanGetter], serve: Callable[[Behaviour], MisbehavingServer], where: str
) -> None:
    def behave(sock: socket.socket) -> None:
        if where == "headers":
            server.trickle(sock, HEAD_512K)
        else:
            server.send(sock, HEAD_512K)
            server.trickle(sock, bytes(524288))

    server = serve(behave)
    error = failure(lambda: getter(lean, server).get_block(SID, 0, "AAAA", timeout=1.5))
    assert (error.code, error.retryable) == ("ReadTimeoutError", True)
    assert "no whole answer in 1.5 s" in error.message
    assert server.sent > 2  # bytes kept arriving: a per-read timeout would never have fired


@pytest.mark.usefixtures("aws")
def test_an_oversized_block_answer_is_refused_unread(
    lean: Callable[..., LeanGetter],
    serve: Callable[[Behaviour], MisbehavingServer],
) -> None:
    announced = 64 * 1024 * 1024

    def behave(sock: socket.socket) -> None:
        server.send(
            sock,
            HEAD_512K.replace(b"Length: 524288\r\n\r\n", f"Length: {announced}\r\n\r\n".encode()),
        )
        for _ in range(announced // 65536):
            server.send(sock, bytes(65536))

    server = serve(behave)
    error = failure(lambda: getter(lean, server).get_block(SID, 0, "AAAA"))
    assert (error.code, error.retryable) == ("OversizedBody", True)
    assert "67108864" in error.message
    time.sleep(0.5)  # let the server notice the hang-up
    assert server.sent < announced // 4  # the client hung up; it never took the 64 MiB


@pytest.mark.usefixtures("aws")
@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 13\r\n\r\n<html></html>",
         "MalformedListing"),
        (b'HTTP/1.1 200 OK\r\nContent-Length: 400\r\n\r\n{"Blocks": [', "ResponseStreamingError"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", "MalformedListing"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"Blo",
         "ResponseStreamingError"),
        (b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 9\r\n\r\n<html>no!", "429"),
    ],
)  # fmt: skip
def test_a_listing_answer_that_is_not_the_services_teaches_nothing(
    serve: Callable[[Behaviour], MisbehavingServer], answer: bytes, code: str
) -> None:
    server = serve(lambda sock: server.send(sock, answer))
    client = EbsClient(ClientSettings(endpoint_url=server.endpoint, region="us-east-1"))
    try:
        error = failure(lambda: client.list_blocks(SID, start_index=5, timeout=5))
    finally:
        client.close()
    assert (error.code, error.retryable) == (code, True)
    assert (error.snapshot_id, error.block_index) == (SID, 5)
    assert error.throttled == (code == "429")


@pytest.mark.usefixtures("aws")
def test_boto3_calls_have_the_total_deadline_too(
    serve: Callable[[Behaviour], MisbehavingServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upload's writes and the reference GET go through boto3, whose urllib3 timeout is per
    socket read; sent through the same transport, a trickling answer is cut at the deadline."""
    monkeypatch.setattr("ebsfuse.ebs.fastget.REQUEST_BASE_S", 1.0)  # + 4 s for a block each way
    server = serve(lambda sock: server.trickle(sock, b"HTTP/1.1 201 Created\r\n" * 1000))
    client = EbsClient(
        ClientSettings(endpoint_url=server.endpoint, region="us-east-1", read_timeout_s=300)
    )
    try:
        error = failure(lambda: client.put_block(SID, 3, bytes(524288), "AAAA"))
        assert (error.code, error.retryable) == ("ReadTimeoutError", True)
        assert (error.snapshot_id, error.block_index) == (SID, 3)
        error = failure(lambda: client.get_block_boto3(SID, 4, "AAAA"))
        assert (error.code, error.block_index) == ("ReadTimeoutError", 4)
    finally:
        client.close()
    assert server.sent > 5  # the answer kept coming, a byte at a time


@pytest.mark.usefixtures("aws")
def test_a_chunk_larger_than_a_block_is_refused_unread(
    lean: Callable[..., LeanGetter],
    serve: Callable[[Behaviour], MisbehavingServer],
) -> None:
    """Chunk sizes are the server's word: one announcing 1 GiB is not read into memory."""

    def behave(sock: socket.socket) -> None:
        server.send(
            sock, HEAD_512K.replace(b"Content-Length: 524288", b"Transfer-Encoding: chunked")
        )
        server.send(sock, b"40000000\r\n")
        for _ in range(1024):
            server.send(sock, bytes(1 << 20))

    server = serve(behave)
    error = failure(lambda: getter(lean, server).get_block(SID, 0, "AAAA"))
    assert (error.code, error.retryable) == ("OversizedBody", True)
    time.sleep(0.5)
    assert server.sent < 64 * 1024 * 1024


@pytest.mark.usefixtures("aws")
def test_a_tls_handshake_that_never_comes_ends_at_the_deadline(
    lean: Callable[..., LeanGetter],
    serve: Callable[[Behaviour], MisbehavingServer],
) -> None:
    """The deadline follows the socket into TLS: a server that accepts and never shakes hands
    (nor closes) is cut at the deadline, not after the per-read timeout."""
    server = serve(lambda sock: server.say_nothing())
    settings = ClientSettings(
        endpoint_url=server.endpoint.replace("http://", "https://"),
        region="us-east-1",
        read_timeout_s=300,
    )
    error = failure(lambda: lean(settings).get_block(SID, 0, "AAAA", timeout=1.5))
    assert (error.code, error.retryable) == ("ReadTimeoutError", True)
    assert "no whole answer in 1.5 s" in error.message  # the deadline's, not the socket's
