"""The lean GetSnapshotBlock path (`FastBlockGetter`) against the emulator and tiny fake servers.

Against the emulator: byte-exact blocks, block tokens with `+` and `/`, and every error mapped
as boto3 maps it (`EbsClient.get_block_boto3`). Against a few-line socket server that records
what arrives: the SigV4 signature on the wire equals botocore's own for the same request, the
session token is sent and signed, refreshed credentials are used, keep-alive connections are
reused (and dropped ones replaced), responses are framed right (chunked too), verification
refuses bad bodies, and a silent server costs no more than the read timeout.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import unquote, urlsplit

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import pytest

from ebsfuse import BLOCK_SIZE
from ebsfuse.ebs.client import ClientSettings, EbsClient
from ebsfuse.ebs.errors import ChecksumMismatch, EbsError
from ebsfuse.ebs.fastget import FastBlockGetter
from ebsfuse.ebs.sigv4 import Signer, StaticCredentials
from ebsfuse.emulator import Emulator
from tests.worker_loop import LeanGetter, LoopGetter

SNAP = "snap-0123456789abcdef0"


def settings(endpoint: str, **kw: float) -> ClientSettings:
    return ClientSettings(endpoint_url=endpoint, region="us-east-1", **kw)  # type: ignore[arg-type]


def b64sha(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def outcome(fn: Callable[[], bytes]) -> tuple[str | None, str | None, bool, bool, bool]:
    """(code, reason, retryable, throttled, token_refused) of the EbsError `fn` raises."""
    with pytest.raises(EbsError) as info:
        fn()
    e = info.value
    return e.code, e.reason, e.retryable, e.throttled, e.token_refused


# -- a fake server that records requests -------------------------------------------------------


class FakeServer:
    """HTTP/1.1 on loopback; `respond(head)` returns the raw response bytes, or None to hang.

    Connections are kept alive (several requests per connection) unless `respond` answers
    with `Connection: close`; `heads` records every request head, `connections` counts accepts.
    """

    def __init__(
        self, respond: Callable[[bytes], bytes | None], tls: ssl.SSLContext | None = None
    ) -> None:
        self.respond = respond
        self.tls = tls
        self.heads: list[bytes] = []
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        scheme_host = "https://localhost" if tls else "http://127.0.0.1"
        self.endpoint = f"{scheme_host}:{self.listener.getsockname()[1]}"
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self._socks.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        buf = b""
        with contextlib.suppress(OSError):
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True)
            while True:
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                self.heads.append(head)
                answer = self.respond(head)
                if answer is None:
                    self._stop.wait(60)  # never answer
                    return
                sock.sendall(answer)
                if b"Connection: close" in answer.split(b"\r\n\r\n")[0]:
                    sock.close()
                    return

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.close()


@pytest.fixture
def fake() -> Iterator[Callable[[Callable[[bytes], bytes | None]], FakeServer]]:
    servers: list[FakeServer] = []

    def make(
        respond: Callable[[bytes], bytes | None], tls: ssl.SSLContext | None = None
    ) -> FakeServer:
        servers.append(FakeServer(respond, tls))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def block_response(
    data: bytes, *, checksum: str | None = "auto", length: int | None = None, extra: str = ""
) -> bytes:
    head = "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
    head += f"x-amz-Data-Length: {len(data) if length is None else length}\r\n"
    if checksum is not None:
        head += f"x-amz-Checksum: {b64sha(data) if checksum == 'auto' else checksum}\r\n"
        head += "x-amz-Checksum-Algorithm: SHA256\r\n"
    return (head + extra + f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """(request target, headers with lower-case names) of a recorded request."""
    lines = head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ")
    assert (method, version) == ("GET", "HTTP/1.1")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return target, headers


def botocore_authorization(
    endpoint: str, target: str, timestamp: str, credentials: StaticCredentials
) -> str:
    """The Authorization header botocore's SigV4Auth computes for the same GET at `timestamp`."""
    request = botocore.awsrequest.AWSRequest(method="GET", url=endpoint + target)
    creds = botocore.credentials.Credentials(
        credentials.access_key, credentials.secret_key, credentials.token
    )
    fixed = datetime.datetime.strptime(timestamp, "%Y%m%dT%H%M%SZ")
    original = botocore.auth.get_current_datetime
    botocore.auth.get_current_datetime = lambda: fixed
    try:
        botocore.auth.SigV4Auth(creds, "ebs", "us-east-1").add_auth(request)
    finally:
        botocore.auth.get_current_datetime = original
    return request.headers["Authorization"]


# -- against the emulator ----------------------------------------------------------------------


@pytest.fixture
def snapshot(emu: Emulator, env: dict[str, str]) -> tuple[str, dict[int, bytes], dict[int, str]]:
    """A snapshot of 48 random blocks and their tokens (listed through boto3)."""
    blocks = {i: os.urandom(BLOCK_SIZE) for i in range(48)}
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    tokens = dict(EbsClient(settings(emu.endpoint)).list_blocks(sid).blocks)
    return sid, blocks, tokens


def test_blocks_are_byte_exact_and_tokens_with_plus_and_slash_round_trip(
    lean: Callable[..., LeanGetter],
    emu: Emulator,
    snapshot: tuple[str, dict[int, bytes], dict[int, str]],
) -> None:
    sid, blocks, tokens = snapshot
    # With 48 random tokens of 32 base64 characters, several hold '+' or '/' (and the
    # emulator's MAC check refuses a token that came back altered).
    assert any(set(t) & set("+/") for t in tokens.values())
    getter = lean(settings(emu.endpoint))
    for index, token in tokens.items():
        assert getter.get_block(sid, index, token) == blocks[index]
    assert emu.counters()["requests"]["GetSnapshotBlock"] == len(tokens)


def test_endpoint_and_credentials_come_from_the_environment_like_boto3(
    emu: Emulator, snapshot: tuple[str, dict[int, bytes], dict[int, str]]
) -> None:
    sid, blocks, tokens = snapshot
    getter = FastBlockGetter(ClientSettings())  # AWS_ENDPOINT_URL_EBS, keys, region from env
    assert getter.endpoint_url == emu.endpoint
    assert getter.region == "us-east-1"
    assert getter.get_block(sid, 3, tokens[3]) == blocks[3]
    getter.close()


def test_threads_share_one_getter(
    emu: Emulator, snapshot: tuple[str, dict[int, bytes], dict[int, str]]
) -> None:
    sid, blocks, tokens = snapshot
    getter = FastBlockGetter(settings(emu.endpoint, max_pool_connections=4))
    failures: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for k in range(24):
                index = (offset + k * 5) % len(tokens)
                assert getter.get_block(sid, index, tokens[index]) == blocks[index]
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    getter.close()
    assert not failures


def test_errors_map_exactly_as_boto3s(
    lean: Callable[..., LeanGetter],
    emu: Emulator,
    snapshot: tuple[str, dict[int, bytes], dict[int, str]],
) -> None:
    sid, _, tokens = snapshot
    fast = lean(settings(emu.endpoint))
    slow = EbsClient(settings(emu.endpoint))
    refused = ("B" if tokens[0][0] == "A" else "A") + tokens[0][1:]
    cases: list[tuple[str, str, int, str, tuple[str, str | None, bool, bool, bool]]] = [
        ("unknown", SNAP, 0, tokens[0],
         ("ResourceNotFoundException", "SNAPSHOT_NOT_FOUND", False, False, False)),
        ("refused token", sid, 0, refused,
         ("ValidationException", "INVALID_BLOCK_TOKEN", False, False, True)),
        ("token of another block", sid, 1, tokens[0],
         ("ValidationException", "INVALID_BLOCK_TOKEN", False, False, True)),
        ("negative index", sid, -1, tokens[0], ("ParamValidationError", None, False, False, False)),
    ]  # fmt: skip
    for label, snapshot_id, index, token, expected in cases:
        got = outcome(lambda: fast.get_block(snapshot_id, index, token))  # noqa: B023
        assert got == expected, label
        assert got == outcome(lambda: slow.get_block_boto3(snapshot_id, index, token)), label  # noqa: B023

    emu.set_faults(fail_rate=1.0)
    got = outcome(lambda: fast.get_block(sid, 0, tokens[0]))
    assert got == ("InternalServerException", None, True, False, False)
    assert got == outcome(lambda: slow.get_block_boto3(sid, 0, tokens[0]))
    emu.set_faults(fail_rate=0.0)

    # A body cut in half is a retryable error, never bytes, named as boto3 names it.
    emu.set_faults(truncate_rate=1.0)
    for getter in (fast, slow):
        code, _, retryable, throttled, _ = outcome(lambda: getter.get_block(sid, 0, tokens[0]))  # noqa: B023
        assert (code, retryable, throttled) == ("ResponseStreamingError", True, False)
    emu.set_faults(truncate_rate=0.0)
    # The cut connection was not put back into the pool: the next request just works.
    assert fast.get_block(sid, 0, tokens[0])
    fast.close()


def test_throttling_is_marked_throttled(
    lean: Callable[..., LeanGetter],
    emu: Emulator,
    snapshot: tuple[str, dict[int, bytes], dict[int, str]],
) -> None:
    sid, _, tokens = snapshot
    emu.set_faults(throttle_rps=1)
    getter = lean(settings(emu.endpoint))
    outcomes: list[tuple[str | None, str | None, bool, bool] | None] = []
    for index in range(4):
        try:
            getter.get_block(sid, index, tokens[index])
            outcomes.append(None)
        except EbsError as e:
            outcomes.append((e.code, e.reason, e.retryable, e.throttled))
    assert ("RequestThrottledException", "RESOURCE_LEVEL_THROTTLE", True, True) in outcomes


def test_connection_refused_is_retryable(
    lean: Callable[..., LeanGetter], env: dict[str, str]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    getter = lean(settings(f"http://127.0.0.1:{port}", connect_timeout_s=2))
    code, _, retryable, _, _ = outcome(lambda: getter.get_block(SNAP, 0, "AAAA"))
    assert (code, retryable) == ("EndpointConnectionError", True)


# -- against a fake server ---------------------------------------------------------------------


@pytest.mark.parametrize("session_token", [None, "IQoJb3JpZ2luX2VjEPr//////////wEaCXVzLWVhc3Q="])
def test_signature_on_the_wire_equals_botocores(
    lean: Callable[..., LeanGetter],
    fake: Callable[..., FakeServer],
    env: dict[str, str],
    session_token: str | None,
) -> None:
    data = os.urandom(BLOCK_SIZE)
    server = fake(lambda head: block_response(data))
    creds = StaticCredentials("AKIAFASTGETTEST", "s3cr3t/with+chars=", session_token)
    getter = lean(settings(server.endpoint), credentials_provider=lambda: creds)
    token = "AbC+dEf/GhI=jKl+/=="
    assert getter.get_block(SNAP, 123, token) == data

    target, headers = parse_head(server.heads[0])
    path, _, query = target.partition("?")
    assert path == f"/snapshots/{SNAP}/blocks/123"
    assert query == "blockToken=AbC%2BdEf%2FGhI%3DjKl%2B%2F%3D%3D"
    assert unquote(query.split("=", 1)[1]) == token
    assert headers["host"] == urlsplit(server.endpoint).netloc
    if session_token:
        assert headers["x-amz-security-token"] == session_token
        assert "SignedHeaders=host;x-amz-date;x-amz-security-token," in headers["authorization"]
    else:
        assert "x-amz-security-token" not in headers
    expected = botocore_authorization(server.endpoint, target, headers["x-amz-date"], creds)
    assert headers["authorization"] == expected


@pytest.mark.parametrize(
    ("endpoint", "snapshot_id", "token"),
    [
        ("https://ebs.eu-west-1.amazonaws.com", SNAP, "AAAA+/=="),
        ("http://localhost:8080/prefix", SNAP, "x"),
        ("http://127.0.0.1:9000", "snap-with space%", "a b&c"),
    ],
)
def test_signer_agrees_with_botocore_for_fixed_timestamps(
    endpoint: str, snapshot_id: str, token: str
) -> None:
    from urllib.parse import quote

    from ebsfuse.ebs.sigv4 import encode_query_value, host_header

    creds = StaticCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "tok")
    signer = Signer("us-east-1", "ebs")
    base = urlsplit(endpoint).path.rstrip("/")
    path = f"{base}/snapshots/{quote(snapshot_id, safe='-_.~')}/blocks/7"
    query = f"blockToken={encode_query_value(token)}"
    for stamp in ("20240229T235959Z", "20240301T000000Z"):
        headers = dict(
            signer.headers(
                creds, method="GET", host=host_header(endpoint), path=path, query=query,
                timestamp=stamp,
            )
        )  # fmt: skip
        root = endpoint[: len(endpoint) - len(base)] if base else endpoint
        assert headers["Authorization"] == botocore_authorization(
            root, f"{path}?{query}", stamp, creds
        )


def test_refreshed_credentials_are_used(
    lean: Callable[..., LeanGetter], fake: Callable[..., FakeServer], env: dict[str, str]
) -> None:
    data = os.urandom(BLOCK_SIZE)
    server = fake(lambda head: block_response(data))
    generation = [0]

    def refresh() -> dict[str, str]:
        generation[0] += 1
        # Already inside the refresh window: botocore refreshes again on the next request.
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=60)
        return {
            "access_key": f"AKIAGEN{generation[0]}",
            "secret_key": "secret",
            "token": f"token-{generation[0]}",
            "expiry_time": expiry.isoformat(),
        }

    creds = botocore.credentials.RefreshableCredentials.create_from_metadata(
        refresh(), refresh, "test"
    )
    getter = lean(settings(server.endpoint), credentials_provider=creds)
    getter.get_block(SNAP, 0, "AAAA")
    getter.get_block(SNAP, 0, "AAAA")
    first, second = (parse_head(h)[1] for h in server.heads)
    assert first["x-amz-security-token"] != second["x-amz-security-token"]
    assert (
        f"Credential={second['x-amz-security-token'].replace('token-', 'AKIAGEN')}/"
        in (second["authorization"])
    )


def test_a_credential_refresh_under_way_holds_no_request_of_the_worker(
    fake: Callable[..., FakeServer], env: dict[str, str]
) -> None:
    """The worker's loop signs every request. Temporary credentials in their last 15 minutes
    are refreshed by its refresher thread; meanwhile (a slow IMDS or STS) the loop signs with
    the current ones, which have 10 minutes left at the least, and its requests go on."""
    data = os.urandom(BLOCK_SIZE)
    server = fake(lambda head: block_response(data))
    refreshing, release, refreshed = threading.Event(), threading.Event(), threading.Event()

    def metadata(minutes_left: float) -> dict[str, str]:
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=minutes_left)
        return {
            "access_key": "AKIA",
            "secret_key": "s",
            "token": "t",
            "expiry_time": expiry.isoformat(),
        }

    def refresh() -> dict[str, str]:
        refreshing.set()
        release.wait(20)  # an endpoint that takes its time
        refreshed.set()
        return metadata(60)

    # Twelve minutes left: inside botocore's advisory window, outside its mandatory one.
    creds = botocore.credentials.RefreshableCredentials.create_from_metadata(
        metadata(12), refresh, "test"
    )
    with LoopGetter(settings(server.endpoint), creds, refresh_every=0.05) as getter:
        try:
            assert refreshing.wait(10), "the refresher never asked for the credentials"
            assert getter.get_block(SNAP, 0, "AAAA", timeout=10) == data
            assert not refreshed.is_set()  # answered while the refresh was still under way
        finally:
            release.set()


def test_session_token_from_the_standard_chain_is_sent(
    lean: Callable[..., LeanGetter],
    fake: Callable[..., FakeServer],
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", "from-the-environment")
    server = fake(lambda head: block_response(bytes(BLOCK_SIZE)))
    lean(settings(server.endpoint)).get_block(SNAP, 0, "AAAA")
    assert parse_head(server.heads[0])[1]["x-amz-security-token"] == "from-the-environment"


def test_connections_are_reused_and_dropped_ones_replaced(
    lean: Callable[..., LeanGetter], fake: Callable[..., FakeServer], env: dict[str, str]
) -> None:
    data = os.urandom(BLOCK_SIZE)
    server = fake(lambda head: block_response(data))
    getter = lean(settings(server.endpoint))
    for _ in range(5):
        assert getter.get_block(SNAP, 0, "AAAA") == data
    assert server.connections == 1
    # The server closes its idle connection: the next request does not fail on it.
    for sock in server._socks:
        sock.shutdown(socket.SHUT_RDWR)
    time.sleep(0.1)
    assert getter.get_block(SNAP, 0, "AAAA") == data
    assert server.connections == 2


def test_connection_close_and_chunked_bodies(
    lean: Callable[..., LeanGetter], fake: Callable[..., FakeServer], env: dict[str, str]
) -> None:
    data = os.urandom(BLOCK_SIZE)

    def chunked(head: bytes) -> bytes:
        out = (
            "HTTP/1.1 100 Continue\r\n\r\n"
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
            f"x-amz-Data-Length: {len(data)}\r\nx-amz-Checksum: {b64sha(data)}\r\n"
            "x-amz-Checksum-Algorithm: SHA256\r\nConnection: close\r\n\r\n"
        ).encode()
        for start in range(0, len(data), 100_000):
            piece = data[start : start + 100_000]
            out += f"{len(piece):x};ext=1\r\n".encode() + piece + b"\r\n"
        return out + b"0\r\nTrailer: x\r\n\r\n"

    server = fake(chunked)
    getter = lean(settings(server.endpoint))
    assert getter.get_block(SNAP, 0, "AAAA") == data
    assert getter.get_block(SNAP, 0, "AAAA") == data
    assert server.connections == 2  # Connection: close is honoured


@pytest.mark.parametrize(
    ("response", "code"),
    [
        (block_response(b"a" * 1000, checksum=b64sha(b"b" * 1000)), "ChecksumMismatch"),
        (block_response(b"a" * 1000, checksum=None), "ChecksumMissing"),
        (block_response(b"a" * 1000, length=2000), "LengthMismatch"),
    ],
)
def test_unverifiable_bodies_are_refused(
    lean: Callable[..., LeanGetter],
    fake: Callable[..., FakeServer],
    env: dict[str, str],
    response: bytes,
    code: str,
) -> None:
    server = fake(lambda head: response)
    getter = lean(settings(server.endpoint))
    with pytest.raises(ChecksumMismatch) as info:
        getter.get_block(SNAP, 0, "AAAA")
    assert (info.value.code, info.value.retryable) == (code, True)


def error_response(status: str, body: bytes, error_type: str | None = None) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n"
    if error_type:
        head += f"x-amzn-ErrorType: {error_type}\r\n"
    return (head + "\r\n").encode() + body


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        # The ErrorType header may carry a ":suffix"; the body's "Message" works like "message".
        (error_response("400 Bad Request", b'{"Message":"expired","Reason":"INVALID_BLOCK_TOKEN"}',
                        "ValidationException:http://internal.amazon.com/coral/"),
         ("ValidationException", "INVALID_BLOCK_TOKEN", False, False, True)),
        # No header: the code comes from the body's __type, namespace dropped.
        (error_response("400 Bad Request", b'{"__type":"com.amazon#ThrottlingException"}'),
         ("ThrottlingException", None, True, True, False)),
        (error_response("400 Bad Request", b'{"message":"Failed to read block data"}',
                        "ValidationException"),
         ("ValidationException", None, True, False, False)),
        (error_response("502 Bad Gateway", b"<html>bad gateway</html>"),
         ("502", None, True, False, False)),
        (error_response("404 Not Found", b""), ("404", None, False, False, False)),
        (error_response("403 Forbidden", b'{"message":"no","Reason":"UNAUTHORIZED_ACCOUNT"}',
                        "AccessDeniedException"),
         ("AccessDeniedException", "UNAUTHORIZED_ACCOUNT", False, False, False)),
    ],
)  # fmt: skip
def test_error_documents_are_parsed_like_botocore(
    lean: Callable[..., LeanGetter],
    fake: Callable[..., FakeServer],
    env: dict[str, str],
    response: bytes,
    expected: tuple[str, str | None, bool, bool, bool],
) -> None:
    server = fake(lambda head: response)
    fast = lean(settings(server.endpoint))
    assert outcome(lambda: fast.get_block(SNAP, 0, "AAAA")) == expected
    slow = EbsClient(settings(server.endpoint))
    assert outcome(lambda: slow.get_block(SNAP, 0, "AAAA")) == expected


@pytest.mark.timeout(20)
def test_a_silent_server_costs_at_most_the_read_timeout(
    lean: Callable[..., LeanGetter], fake: Callable[..., FakeServer], env: dict[str, str]
) -> None:
    server = fake(lambda head: None)
    getter = lean(settings(server.endpoint, read_timeout_s=0.5, connect_timeout_s=2))
    # What ends the wait is the read timeout (the error's kind says so: not a connect failure,
    # not the server); that it ends at all is the timeout marker's to say, not a clock's.
    code, _, retryable, _, _ = outcome(lambda: getter.get_block(SNAP, 0, "AAAA"))
    assert (code, retryable) == ("ReadTimeoutError", True)
    assert len(server.heads) == 1  # the request was sent, and answered by nothing


@pytest.mark.timeout(20)
def test_a_body_that_stalls_halfway_times_out(
    lean: Callable[..., LeanGetter], fake: Callable[..., FakeServer], env: dict[str, str]
) -> None:
    data = os.urandom(BLOCK_SIZE)
    server = fake(lambda head: block_response(data)[: BLOCK_SIZE // 2])  # then silence
    getter = lean(settings(server.endpoint, read_timeout_s=0.5))
    code, _, retryable, _, _ = outcome(lambda: getter.get_block(SNAP, 0, "AAAA"))
    assert (code, retryable) == ("ReadTimeoutError", True)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_verifies_against_the_configured_ca_bundle(
    lean: Callable[..., LeanGetter],
    fake: Callable[..., FakeServer],
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: os.PathLike[str],
) -> None:
    cert, key = os.path.join(tmp_path, "cert.pem"), os.path.join(tmp_path, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
         "-out", cert, "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    data = os.urandom(BLOCK_SIZE)
    server = fake(lambda head: block_response(data), tls=context)
    # Not trusted: a retryable SSL error, like boto3's.
    getter = lean(settings(server.endpoint))
    code, _, retryable, _, _ = outcome(lambda: getter.get_block(SNAP, 0, "AAAA"))
    assert (code, retryable) == ("SSLError", True)
    # Trusted through AWS_CA_BUNDLE, as boto3 does; the Host signed is the name, no port 443.
    monkeypatch.setenv("AWS_CA_BUNDLE", cert)
    getter = lean(settings(server.endpoint))
    assert getter.get_block(SNAP, 0, "AAAA") == data
    assert getter.get_block(SNAP, 1, "AAAA") == data
    assert server.connections == 2  # one refused by the client, one kept alive


def test_an_answer_nobody_asked_for_is_never_taken_for_the_next(
    lean: Callable[..., LeanGetter], fake: Callable[..., FakeServer], env: dict[str, str]
) -> None:
    """A server (or a proxy) that sends a second, well-formed answer after the first: it
    carries another block's bytes with their own valid checksum, so on a reused connection it
    would pass as the answer to the next request. The connection must not be reused."""
    data = {index: os.urandom(BLOCK_SIZE) for index in (0, 1, 99)}

    def respond(head: bytes) -> bytes:
        index = int(parse_head(head)[0].split("?")[0].rsplit("/", 1)[1])
        answer = block_response(data[index])
        return answer + block_response(data[99]) if index == 0 else answer

    server = fake(respond)
    getter = lean(settings(server.endpoint))
    assert getter.get_block(SNAP, 0, "AAAA") == data[0]
    time.sleep(0.2)  # the unasked answer has arrived
    assert getter.get_block(SNAP, 1, "AAAA") == data[1]
    assert server.connections == 2


def good_block_after(first: bytes, data: bytes) -> Callable[[bytes], bytes]:
    """`first` for the first request, a good block for every later one."""
    answered: list[bytes] = []

    def respond(head: bytes) -> bytes:
        answered.append(head)
        return first if len(answered) == 1 else block_response(data)

    return respond


@pytest.mark.parametrize(
    ("first", "code", "retryable"),
    [
        # The server chooses an error's code and reason: 80 KB of each cross no worse.
        (b"HTTP/1.1 400 Bad Request\r\nx-amzn-ErrorType: " + b"A" * 40000
         + b"\r\nx-amzn-ErrorType: " + b"B" * 40000 + b"\r\nContent-Length: 65014\r\n\r\n"
         + b'{"Reason": "' + b"R" * 65000 + b'"}', "A" * 40000 + ", " + "B" * 40000, False),
        # Nested past the JSON parser's depth: a proxy's garbage, not the service's document.
        (b"HTTP/1.1 500 Oops\r\nContent-Length: 60000\r\n\r\n" + b"[" * 60000, "500", True),
        # A thousand interim responses, or trailer lines, then silence: refused once past the
        # reader's bounds (a protocol error), not waited out until the deadline.
        (b"HTTP/1.1 100 Continue\r\n\r\n" * 1000, "ConnectionClosedError", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n"
         + b"Trailer: more\r\n" * 1000, "ResponseStreamingError", True),
    ],
    ids=["huge error fields", "deep nesting", "interim responses", "trailer lines"],
)  # fmt: skip
def test_an_answer_the_server_makes_hostile_is_one_error_and_the_next_request_works(
    lean: Callable[..., LeanGetter],
    fake: Callable[..., FakeServer],
    env: dict[str, str],
    first: bytes,
    code: str,
    retryable: bool,
) -> None:
    data = os.urandom(BLOCK_SIZE)
    server = fake(good_block_after(first, data))
    getter = lean(settings(server.endpoint, read_timeout_s=300))
    got, _, got_retryable, _, _ = outcome(lambda: getter.get_block(SNAP, 0, "AAAA", timeout=20))
    assert got is not None and code.startswith(got[:256])  # codes cross cut at 256
    assert got_retryable == retryable
    assert getter.get_block(SNAP, 1, "AAAA") == data


class SlowServer(FakeServer):
    """Sends each block answer 64 KiB at a time, 0.3 s apart: slow, never silent."""

    def _serve(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(65536)
            answer = self.respond(head) or b""
            for start in range(0, len(answer), 65536):
                sock.sendall(answer[start : start + 65536])
                self._stop.wait(0.3)


@pytest.mark.timeout(30)
def test_a_steady_body_is_not_taken_for_silence(
    lean: Callable[..., LeanGetter], env: dict[str, str]
) -> None:
    """The read timeout is for silence: a body arriving 64 KiB every 0.3 s takes longer
    than the 1 s read timeout in all, and is received whole."""
    data = os.urandom(BLOCK_SIZE)
    server = SlowServer(lambda head: block_response(data))
    try:
        getter = lean(settings(server.endpoint, read_timeout_s=1))
        assert getter.get_block(SNAP, 0, "AAAA") == data
    finally:
        server.close()
