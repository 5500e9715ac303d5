"""The lean HTTP transport: every request to the EBS endpoint, within a deadline and a bound.

`FastBlockGetter.get_block` keeps `EbsClient.get_block`'s contract exactly -- one request, no
internal retries, bytes returned only after the length (`x-amz-Data-Length`) and the base64
SHA-256 (`x-amz-Checksum`) match, every failure an `EbsError` with the code, reason and
`retryable` / `throttled` / `token_refused` meaning that `translate` gives for boto3 -- at
about a third of boto3's CPU per 512 KiB block (see scripts/bench-fetch). `get_json` carries
the list calls the same way, and `send_prepared` the requests boto3 still builds (botocore's
`before-send` hook), so every request of the process shares what this module enforces:
- a total deadline per request (`_Watchdog` cuts the socket; a per-read timeout alone never
  ends a body that trickles a byte a second), REQUEST_BASE_S plus the body at
  MIN_TRANSFER_RATE, shortened by the caller's budget;
- bounded bodies: a success announcing (or sending, chunked) more than the request can take
  is refused before it is read, an error body is cut at MAX_ERROR_BODY;
- one request rate per process and endpoint (`ratelimit.RateLimiter`), told of every
  throttling answer.

Where the time goes, and what is done about it (client CPU per block, scripts/bench-fetch):
- boto3 spends ~2 ms per call in its event hooks, parameter validation, serialisation, its
  SigV4 signer (four HMACs per request) and urllib3's response wrapper. Here a request is
  signed by `sigv4.Signer` (key cached per day and credentials: one SHA-256 and one HMAC,
  ~15 us) and written as one preformatted head on a pooled keep-alive connection.
- `http.client` itself still cost ~0.2 ms per request (state machine, header validation,
  `email`-based header parsing), so `Connection` is a minimal HTTP/1.1 exchange: headers are
  split by hand from a reader that lives as long as the connection, and the body is a single
  `read(length)`, which `io.BufferedReader` serves by receiving straight into the `bytes`
  object it returns: no intermediate buffer, no copy, no per-chunk Python callback.
- SHA-256 (~0.35 ms per block with SHA-NI, over half of what is left) runs in the calling
  worker thread; `hashlib` releases the GIL for it, as the socket reads do, so threads overlap.
What stays like boto3's: credentials come from botocore's standard chain (environment, profile,
SSO, container and instance roles; refreshable ones are refreshed because frozen credentials
are taken for every request), region and endpoint are resolved by botocore itself (so
`AWS_ENDPOINT_URL_EBS`, `AWS_ENDPOINT_URL`, the config file's endpoints, FIPS and partitions all
apply), TLS verifies against the same CA bundle, `HTTPS_PROXY` / `NO_PROXY` are honoured, and
the connect and read timeouts and the pool size come from `ClientSettings`.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.client
import io
import json
import select
import socket
import ssl
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Generator, Iterator
from typing import Any, cast
from urllib.parse import quote, unquote, urlsplit

import boto3
import botocore.awsrequest
import botocore.credentials
import botocore.exceptions
import botocore.httpsession
import botocore.session

from .. import BLOCK_SIZE, __version__
from .errors import ChecksumMismatch, EbsError
from .ratelimit import RateLimiter
from .settings import ClientSettings, signing_region
from .sigv4 import Credentials, Signer, encode_query_value, host_header
from .translate import translate
from .verify import verify_block

CredentialsProvider = Callable[[], Credentials]

OPERATION = "GetSnapshotBlock"
SERVICE = "ebs"  # the SigV4 signing name of the EBS direct APIs
USER_AGENT = f"ebsfuse/{__version__} fastget Python/{sys.version_info[0]}.{sys.version_info[1]}"
# Error bodies are a few hundred bytes of JSON; a larger one is cut at this size (the rest is
# not read and the connection is dropped), so a misbehaving proxy cannot make us buffer much.
MAX_ERROR_BODY = 64 * 1024
# A full ListSnapshotBlocks page (10,000 entries, tokens of up to 256 characters) is about
# 3 MB of JSON; a larger body is refused unread, whatever its Content-Length says.
MAX_LIST_BODY = 8 * 1024 * 1024
# Every request has a total deadline, not only a per-read timeout: a body that trickles a
# byte a second never trips a 30 s socket timeout. The service answers a block in ~100 ms and
# a full listing page in about a second, so 20 s for the headers and the first bytes is far
# past anything healthy, and leaves the read budget (60 s by default) room for more attempts.
REQUEST_BASE_S = 20.0
# ...plus the body at no less than this rate: 2 s more for a block, 32 s at most for a page.
MIN_TRANSFER_RATE = 256 * 1024
# Path segments are percent-encoded like botocore encodes URI labels: unreserved stay bare.
_LABEL_SAFE = "-_.~"


@dataclasses.dataclass(frozen=True)
class PreparedGet:
    """A signed GET: its request head, path (for error messages), the largest body it takes,
    the seconds it may take from when it is sent, and what its errors name."""

    head: bytes
    path: str
    max_body: int
    limit: float
    where: dict[str, Any]


class ProtocolError(Exception):
    """The server's bytes are not an HTTP/1.1 response we can frame."""


class Response:
    """Status, lower-cased headers and body of one response; `reusable` if keep-alive holds."""

    __slots__ = ("body", "error", "framed", "headers", "reusable", "status")

    def __init__(
        self,
        status: int,
        headers: dict[str, str],
        body: bytes | memoryview,
        reusable: bool,
        framed: bool = True,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.reusable = reusable
        # False for a body delimited by the end of the connection: cut by a deadline, it
        # would look complete.
        self.framed = framed
        self.error: EbsError | None = None  # what an error answer means, read once

    def data(self) -> bytes:
        """The body, where it was received as `bytes` (every path but the fetch worker's)."""
        assert isinstance(self.body, bytes)
        return self.body


# What a response reader asks of its transport (`ResponseReader.steps`), with its argument:
STEP_LINE = 0  # a line of at most `arg` bytes (b"" at the end of the connection)
STEP_READ = 1  # `arg` bytes, fewer only at the end of the connection
STEP_INTO = 2  # fill the memoryview `arg`; the count received, short only at the end

Step = tuple[int, Any]


class ResponseReader:
    """The framing of one response to a GET, with no I/O of its own (RFC 9112 for what a GET
    can get back): its `steps` ask for a line, some bytes, or bytes into a buffer, and the
    transport answers each -- the blocking `Connection`, or the fetch worker's event loop
    (`fetchloop`). So the rules live here once, whatever does the receiving.

    1xx interim responses are skipped; the body is delimited by chunked transfer coding,
    Content-Length, or the end of the connection; 204 and 304 have none. Anything else is a
    `ProtocolError`. At most `max_error_body` bytes of an error body are read (one cut short
    is not reusable); a success larger than `max_body` is `Oversized` before any of it is read,
    so an announced 64 MiB costs nothing. A success with a Content-Length is received straight
    into `into` when given (the fetch worker's shared slot), else into a new `bytes`.
    `in_body` tells, after a failure, whether the headers had arrived.
    """

    # The largest status or header line accepted (http.client's limit too).
    MAX_LINE = 65536
    _MAX_HEADERS = 100  # header lines of a response, and trailer lines of a chunked body
    # Interim (1xx) responses skipped before the final one: a GET gets at most a 100 Continue
    # or two; a server that keeps sending them is not answering.
    _MAX_INTERIM = 10

    def __init__(self, max_error_body: int, max_body: int, into: memoryview | None = None) -> None:
        self.max_error_body = max_error_body
        self.max_body = max_body
        self.into = into
        self.in_body = False

    def _line(self) -> Generator[Step, Any, bytes]:
        line: bytes = yield (STEP_LINE, self.MAX_LINE + 1)
        if len(line) > self.MAX_LINE:
            raise ProtocolError("a header line is too long")
        return line

    def _head(self) -> Generator[Step, Any, tuple[bytes, int, dict[str, str]]]:
        """The final response's version, status and headers (lower-cased names)."""
        for _ in range(self._MAX_INTERIM + 1):
            line = yield from self._line()
            if not line:
                raise ConnectionResetError("the server closed the connection without a response")
            version, _, rest = line.partition(b" ")
            code = rest[:3]
            if not version.startswith(b"HTTP/1.") or not code.isdigit():
                raise ProtocolError(f"not an HTTP/1.x status line: {line[:80]!r}")
            status = int(code)
            headers: dict[str, str] = {}
            for _ in range(self._MAX_HEADERS + 1):
                line = yield from self._line()
                if line in (b"\r\n", b"\n"):
                    break
                if not line:
                    raise ProtocolError("the connection closed in the middle of the headers")
                name, sep, value = line.partition(b":")
                if not sep:
                    raise ProtocolError(f"malformed header line {line[:80]!r}")
                key = name.strip().lower().decode("latin-1")
                text = value.strip().decode("latin-1")
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
            else:
                raise ProtocolError("too many header lines")
            if status >= 200 or status == 101:
                return version, status, headers  # other 1xx are interim: a final one follows
        raise ProtocolError(f"more than {self._MAX_INTERIM} interim (1xx) responses")

    def steps(self) -> Generator[Step, Any, Response]:
        version, status, headers = yield from self._head()
        keep_alive = version == b"HTTP/1.1" and "close" not in headers.get("connection", "")
        error = status >= 300
        self.in_body = True
        if status in (204, 304):
            return Response(status, headers, b"", keep_alive)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            cap = self.max_error_body if error else self.max_body
            body, whole = yield from self._chunked(cap, error=error)
            return Response(status, headers, body, keep_alive and whole)
        length_text = headers.get("content-length")
        if length_text is not None:
            if not length_text.isdigit():
                raise ProtocolError(f"bad Content-Length {length_text!r}")
            length = int(length_text)
            if not error and length > self.max_body:
                raise Oversized(length, self.max_body)
            want = min(length, self.max_error_body) if error else length
            framed = yield from self._exactly(want, into=None if error else self.into)
            return Response(status, headers, framed, keep_alive and want == length)
        cap = self.max_error_body if error else self.max_body
        rest: bytes = yield (STEP_READ, cap + 1)
        if not error and len(rest) > self.max_body:
            raise Oversized(None, self.max_body)
        return Response(status, headers, rest[:cap], False, framed=False)

    @staticmethod
    def _exactly(size: int, into: memoryview | None) -> Generator[Step, Any, bytes | memoryview]:
        if into is not None and size <= len(into):
            received: int = yield (STEP_INTO, into[:size])
            if received < size:
                raise IncompleteBody(received, size)
            return into[:size]
        body: bytes = yield (STEP_READ, size)
        if len(body) < size:
            raise IncompleteBody(len(body), size)
        return body

    def _chunked(self, max_body: int, *, error: bool) -> Generator[Step, Any, tuple[bytes, bool]]:
        """A chunked body of at most `max_body` bytes, and whether it was read to its end.

        The chunk sizes are the server's word: a chunk is never read past the cap. A success
        that would exceed it is `Oversized`; an error body is cut there (and the connection
        is not reused).
        """
        parts: list[bytes] = []
        total = 0
        while True:
            size_text = (yield from self._line()).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                for _ in range(self._MAX_HEADERS + 1):  # trailer fields, up to a blank line
                    if (yield from self._line()) in (b"\r\n", b"\n", b""):
                        return b"".join(parts), True
                raise ProtocolError("too many trailer lines")
            if total + size > max_body:
                if not error:
                    raise Oversized(None, max_body)
                size = max_body - total
            chunk: bytes = yield (STEP_READ, size)
            if len(chunk) < size:
                raise IncompleteBody(total + len(chunk), None)
            parts.append(chunk)
            total += size
            if total >= max_body and error:
                return b"".join(parts), False
            yield from self._line()  # the CRLF after the chunk


class Connection:
    """One keep-alive HTTP/1.1 connection, blocking: write a request, read its response.

    Deliberately small instead of `http.client`, which costs ~0.2 ms of CPU per request in
    its state machine, header validation and `email`-based header parsing (measured with
    scripts/bench-fetch: 0.84 against 0.6 ms per block at 16 threads). The buffered reader
    lives as long as the connection and answers the `ResponseReader`'s steps; the body is one
    `read(length)`: `io.BufferedReader` allocates the result and receives into it directly,
    so the 512 KiB arrive in their final `bytes` object without a copy.
    """

    # Buffer of the reader: headers of a response fit in one receive, and reads this large or
    # larger (the body) bypass the buffer.
    _READ_BUFFER = 64 * 1024

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.in_body = False
        # makefile("rb") with a buffer size is a BufferedReader; typeshed says IOBase.
        self.rfile = cast(io.BufferedReader, sock.makefile("rb", buffering=self._READ_BUFFER))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.rfile.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    def dropped(self) -> bool:
        """True if the idle connection was closed by the server (urllib3 checks the same).

        An idle connection has nothing to read; readable means EOF or stray bytes, and
        reusing it would fail the request for nothing. Under TLS, bytes already decrypted
        past the last answer (in its last record) are stray too, though the socket is empty.
        """
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))

    def exchange(
        self, request: bytes, max_error_body: int, max_body: int, body: bytes = b""
    ) -> Response:
        """Send `request` (a complete head) and `body`, and read the response
        (`ResponseReader`); `in_body` tells, after a failure, whether the headers had arrived."""
        self.in_body = False
        self.sock.sendall(request)
        if body:
            self.sock.sendall(body)
        reader = ResponseReader(max_error_body, max_body)
        steps = reader.steps()
        try:
            step = next(steps)
            while True:
                kind, arg = step
                if kind == STEP_LINE:
                    step = steps.send(self.rfile.readline(arg))
                elif kind == STEP_READ:
                    step = steps.send(self.rfile.read(arg))
                else:
                    step = steps.send(self.rfile.readinto(arg))
        except StopIteration as done:
            response: Response = done.value
            return response
        finally:
            self.in_body = reader.in_body


class _BodyStream(io.BytesIO):
    """A whole response body, read the way botocore reads urllib3's raw stream."""

    def stream(self, amt: int = 65536, decode_content: bool | None = None) -> Iterator[bytes]:
        while chunk := self.read(amt):
            yield chunk


class _DeadlinePassed(Exception):
    """The request's deadline cut the connection while it was being set up (TLS, a tunnel)."""


class Oversized(Exception):
    """A successful response announcing (or sending) more than the request can take."""

    def __init__(self, announced: int | None, limit: int) -> None:
        what = f"announces {announced} bytes" if announced is not None else "is larger"
        super().__init__(f"the body {what}; at most {limit} are taken, so it was not read")


class IncompleteBody(Exception):
    """The connection ended (or stalled) before the whole body arrived."""

    def __init__(self, received: int, expected: int | None) -> None:
        more = f", {expected - received} more expected" if expected is not None else ""
        super().__init__(f"IncompleteRead({received} bytes read{more})")


class _Pool:
    """Idle keep-alive connections, most recently used first; thread-safe.

    Like urllib3's pool with block=False (botocore's setting): a caller never waits for a
    connection; when more requests run at once than `maxsize`, extra connections are made and
    closed after use instead of being kept. The reader's concurrency limit matches `maxsize`.
    """

    def __init__(self, maxsize: int) -> None:
        self._maxsize = max(1, maxsize)
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def get(self) -> Connection | None:
        """An idle connection still open, or None (the caller connects)."""
        while True:
            with self._lock:
                if not self._idle:
                    return None
                conn = self._idle.pop()
            if not conn.dropped():
                return conn
            conn.close()

    def put(self, conn: Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._maxsize:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class _Alarm:
    """One request's deadline: the socket to cut, and whether it was cut."""

    __slots__ = ("deadline", "fired", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.fired = False


class _Watchdog:
    """Cuts the connection of any request that outlives its deadline; one thread for all.

    A request arms an alarm before it sends and disarms it when the response is read. Every
    `TICK_S` the thread looks at the armed alarms (at most one per request in flight, so a few
    dozen) and shuts the late sockets down, which ends a blocked `recv` at once whatever the
    server does: trickle, stall or flood. A set and a scan cost less per request than a heap
    (measured with scripts/bench-fetch: 0.50 against 0.52 ms of CPU per block), and a deadline
    of seconds does not need better than a quarter of a second. Idle, the thread sleeps.
    """

    TICK_S = 0.25

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: set[_Alarm] = set()
        self._thread: threading.Thread | None = None

    def arm(self, sock: socket.socket, deadline: float) -> _Alarm:
        alarm = _Alarm(sock, deadline)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="ebsfuse-deadlines", daemon=True
                )
                self._thread.start()
            if not self._armed:
                self._cond.notify()
            self._armed.add(alarm)
        return alarm

    def rebind(self, alarm: _Alarm, sock: socket.socket) -> bool:
        """Watch `sock` instead (TLS wrapped the old one); False if the alarm already fired."""
        with self._cond:
            if alarm.fired:
                return False
            alarm.sock = sock
            return True

    def disarm(self, alarm: _Alarm) -> bool:
        """Stop watching; True if the deadline had already cut the connection."""
        with self._cond:
            self._armed.discard(alarm)
            return alarm.fired

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._armed:
                    self._cond.wait()
            time.sleep(self.TICK_S)
            now = time.monotonic()
            with self._cond:
                late = [alarm for alarm in self._armed if alarm.deadline <= now]
                for alarm in late:
                    self._armed.discard(alarm)
                    alarm.fired = True
            for alarm in late:
                with contextlib.suppress(OSError):
                    # The plain socket's shutdown, also under TLS: it wakes the reader without
                    # touching the SSL object that thread is using. A socket already closed
                    # (its owner saw `fired` and dropped it) has no descriptor left to cut.
                    socket.socket.shutdown(alarm.sock, socket.SHUT_RDWR)


_WATCHDOG = _Watchdog()

_LIMITERS: dict[str, RateLimiter] = {}
_LIMITERS_LOCK = threading.Lock()


def limiter_for(endpoint_url: str, max_rps: float | None) -> RateLimiter:
    """The process's one rate limiter for `endpoint_url`: every client to it shares it."""
    with _LIMITERS_LOCK:
        limiter = _LIMITERS.get(endpoint_url)
        if limiter is None:
            limiter = _LIMITERS[endpoint_url] = RateLimiter(max_rps)
        elif max_rps is not None:
            limiter.max_rps = min(max_rps, limiter.max_rps or max_rps)
        return limiter


class FastBlockGetter:
    """GetSnapshotBlock without boto3 on the request path; thread-safe, blocking.

    `settings` are the client's (region, profile, endpoint, timeouts, pool size).
    `credentials_provider` returns current credentials (an object with access_key, secret_key,
    token) and is called for every request; pass a botocore `Credentials` object or its
    `get_frozen_credentials` to share the credentials of an existing boto3 session. By default
    the standard chain of `boto3.session.Session(profile_name=settings.profile)` is used.
    """

    def __init__(
        self,
        settings: ClientSettings | None = None,
        credentials_provider: CredentialsProvider | botocore.credentials.Credentials | None = None,
    ) -> None:
        self.settings = settings = settings or ClientSettings()
        try:
            core = botocore.session.Session(profile=settings.profile)
            session = boto3.session.Session(botocore_session=core)
            region = signing_region(settings, session.region_name)
            # botocore resolves the endpoint exactly as boto3 would (endpoint_url, then
            # AWS_ENDPOINT_URL_EBS, AWS_ENDPOINT_URL, the config file, then the partition's
            # https://ebs.{region}.amazonaws.com[.cn], FIPS if configured). Building a client
            # costs some milliseconds once; it is not used for requests.
            meta = session.client(
                SERVICE,
                region_name=region,
                endpoint_url=settings.endpoint_url,
                aws_access_key_id="resolve-only",  # no credential lookup for this client
                aws_secret_access_key="resolve-only",
            ).meta
            ca_bundle = core.get_config_variable("ca_bundle")
        except botocore.exceptions.BotoCoreError as exc:
            raise translate(exc) from None
        self.region: str = meta.region_name
        self.endpoint_url: str = meta.endpoint_url
        self._signer = Signer(self.region, SERVICE)
        self._credentials = self._credentials_function(session, credentials_provider)

        parts = urlsplit(self.endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EbsError(f"unsupported endpoint URL {self.endpoint_url!r}", code="ValueError")
        self._host = host_header(self.endpoint_url)
        # A path in the endpoint URL (a reverse proxy) prefixes every request path.
        self._base_path = parts.path.rstrip("/")
        self._server = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        self._tls: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._tls = ssl.create_default_context(
                cafile=ca_bundle or botocore.httpsession.get_cert_path(True)
            )
            self._tls.set_alpn_protocols(["http/1.1"])
        # Through an HTTP proxy an https request tunnels (CONNECT) and is signed as usual; a
        # plain http request goes to the proxy with the absolute URL on its request line.
        self._proxy = _proxy_for(self.endpoint_url)
        self._absolute_prefix = ""
        self._proxy_head = ""
        if self._proxy is not None and self._tls is None:
            self._absolute_prefix = f"http://{self._host}"
            self._proxy_head = "".join(f"{k}: {v}\r\n" for k, v in self._proxy[2].items())
        self._pool = _Pool(settings.max_pool_connections)
        self.limiter = limiter_for(self.endpoint_url, settings.max_rps)

    def connect(self, deadline: float) -> tuple[Connection, _Alarm]:
        """A new connection (TCP within the connect timeout, then TLS, through a tunnel),
        watched from the moment its socket exists."""
        settings = self.settings
        address = self._server if self._proxy is None else self._proxy[:2]
        timeout = max(0.001, min(settings.connect_timeout_s, deadline - time.monotonic()))
        sock = socket.create_connection(address, timeout=timeout)
        alarm = _WATCHDOG.arm(sock, deadline)
        try:
            # The request head goes out in one send; no reason to let Nagle hold it back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._proxy is not None and self._tls is not None:
                _tunnel(sock, self._server, self._proxy[2])
            if self._tls is not None:
                sock = self._tls.wrap_socket(
                    sock, server_hostname=self._server[0], do_handshake_on_connect=False
                )
                # The wrap detached the raw socket object: watch the new one, then shake hands.
                if not _WATCHDOG.rebind(alarm, sock):
                    raise _DeadlinePassed
                sock.do_handshake()
            # From here each socket operation may wait up to the read timeout (as urllib3).
            sock.settimeout(settings.read_timeout_s)
        except BaseException:
            cut = _WATCHDOG.disarm(alarm)
            sock.close()
            if cut:
                raise _DeadlinePassed from None
            raise
        return Connection(sock), alarm

    def open_connection(self, deadline: float) -> Connection:
        """`connect`, for a caller that keeps the deadline itself from here on (the fetch
        worker's loop); `_DeadlinePassed` if the deadline cut it first."""
        conn, alarm = self.connect(deadline)
        if _WATCHDOG.disarm(alarm):
            conn.close()
            raise _DeadlinePassed
        return conn

    # -- credentials ----------------------------------------------------------------------------

    @staticmethod
    def _credentials_function(
        session: boto3.session.Session,
        provider: CredentialsProvider | botocore.credentials.Credentials | None,
    ) -> Callable[[], Credentials]:
        """A function returning current credentials for each request, raising EbsError."""
        if provider is None:
            try:
                provider = session.get_credentials()
            except botocore.exceptions.BotoCoreError as exc:
                raise translate(exc) from None
        if provider is None:

            def missing() -> Credentials:
                # boto3 also creates its client without credentials and fails on the call.
                raise translate(botocore.exceptions.NoCredentialsError())

            return missing
        if isinstance(provider, botocore.credentials.Credentials):
            # Refreshable credentials refresh themselves inside get_frozen_credentials() when
            # they near expiry (under their own lock); frozen ones never change mid-signature.
            return provider.get_frozen_credentials
        return provider

    def refresh_credentials(self) -> None:
        """Ask for the credentials, so that a refresh coming due happens here, on the caller's
        thread (the fetch worker's refresher), rather than inside a request. Never raises: a
        refresh that failed is met again, and reported, by the request that needs it."""
        with contextlib.suppress(Exception):
            self._credentials()

    # -- the request ----------------------------------------------------------------------------

    def get_block(
        self, snapshot_id: str, index: int, token: str, *, timeout: float | None = None
    ) -> bytes:
        """Fetch one block and return its bytes only if length and SHA-256 match the headers.

        `timeout` bounds the whole request (connect, headers, body) below its own deadline.
        """
        return self.get_verified_block(snapshot_id, index, token, timeout)[0]

    def get_verified_block(
        self, snapshot_id: str, index: int, token: str, timeout: float | None = None
    ) -> tuple[bytes, str]:
        """`get_block`, with the base64 SHA-256 the bytes were checked against."""
        get = self.prepare_block(snapshot_id, index, token, timeout)
        response = self._send(get)
        body = response.data()
        self.verified(body, response.headers, get.where)
        return body, response.headers["x-amz-checksum"]

    def prepare_block(
        self, snapshot_id: str, index: int, token: str, timeout: float | None = None
    ) -> PreparedGet:
        """The signed GetSnapshotBlock request, for `_send` here or for the fetch worker's loop
        (`fetchloop`), which sends it on its own sockets with the same rules."""
        where: dict[str, Any] = {"snapshot_id": snapshot_id, "block_index": index}
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            # botocore validates BlockIndex (an integer, min 0) before sending anything.
            raise EbsError(
                f"Parameter validation failed:\nInvalid value for parameter BlockIndex, "
                f"value: {index}, valid min value: 0",
                code="ParamValidationError",
                **where,
            )
        path = f"/snapshots/{quote(snapshot_id, safe=_LABEL_SAFE)}/blocks/{index}"
        query = f"blockToken={encode_query_value(token)}"
        return self._prepare(path, query, BLOCK_SIZE, where, timeout)

    def get_json(
        self,
        path: str,
        params: dict[str, str],
        *,
        where: dict[str, Any],
        timeout: float | None = None,
    ) -> object:
        """A signed GET of a listing: its body parsed as JSON, whole or not at all.

        The transport has framed the whole body (Content-Length or chunked) before this parses
        it; a body that is not JSON (a proxy's HTML page) is a retryable `MalformedListing`.
        """
        query = "&".join(
            f"{encode_query_value(k)}={encode_query_value(v)}" for k, v in sorted(params.items())
        )
        response = self._request(path, query, MAX_LIST_BODY, where, timeout)
        body = response.data()
        try:
            return json.loads(body)
        except ValueError:
            kind = response.headers.get("content-type", "no Content-Type")
            raise EbsError(
                f"the listing's body is not JSON ({kind}, {len(body)} bytes): {body[:60]!r}",
                code="MalformedListing",
                retryable=True,
                **where,
            ) from None

    def _request(
        self, path: str, query: str, max_body: int, where: dict[str, Any], timeout: float | None
    ) -> Response:
        """One signed GET within its deadline; a successful response, or an `EbsError`."""
        return self._send(self._prepare(path, query, max_body, where, timeout))

    def _prepare(
        self, path: str, query: str, max_body: int, where: dict[str, Any], timeout: float | None
    ) -> PreparedGet:
        """A GET of `path` signed now, with the time it may take: REQUEST_BASE_S plus its body
        at MIN_TRANSFER_RATE, or `timeout` if shorter."""
        path = self._base_path + path
        try:
            credentials = self._credentials()
        except Exception as exc:  # missing, or a credential provider failing to refresh
            raise translate(exc, **where) from None
        signed = self._signer.headers(
            credentials, method="GET", host=self._host, path=path, query=query
        )
        head = (
            f"GET {self._absolute_prefix}{path}?{query} HTTP/1.1\r\nHost: {self._host}\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in signed)
            + f"User-Agent: {USER_AGENT}\r\n{self._proxy_head}\r\n"
        ).encode("latin-1")
        limit = REQUEST_BASE_S + max_body / MIN_TRANSFER_RATE
        if timeout is not None:
            limit = min(limit, timeout)
        return PreparedGet(head, path, max_body, limit, where)

    def _send(self, get: PreparedGet) -> Response:
        response = self._exchange(get.head, b"", get.path, get.max_body, get.limit, get.where)
        if response.error is not None:
            raise response.error
        return response

    def send_prepared(
        self, request: botocore.awsrequest.AWSPreparedRequest, **_: Any
    ) -> botocore.awsrequest.AWSResponse:
        """A request botocore built and signed, sent here instead of by urllib3.

        Registered by `EbsClient` as the boto3 client's `before-send` handler, so the calls
        that still go through boto3 (the writes of `upload`, and the reference GET) have the
        same total deadline and body bound as the lean path: urllib3's timeout is per socket
        read, which a trickling answer never trips. botocore parses the answer as usual.
        """
        parts = urlsplit(request.url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        body = request.body
        if hasattr(body, "read"):
            body = body.read()
        data = body.encode() if isinstance(body, str) else bytes(body or b"")
        request_line = f"{request.method} {self._absolute_prefix}{target} HTTP/1.1"
        lines = [request_line, f"Host: {self._host}"]
        for name, value in request.headers.items():
            if name.lower() not in ("host", "content-length"):
                text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
                lines.append(f"{name}: {text}")
        if data or request.method in ("PUT", "POST"):
            lines.append(f"Content-Length: {len(data)}")
        head = ("\r\n".join(lines) + f"\r\n{self._proxy_head}\r\n").encode("latin-1")
        # The answer is at most a block (GetSnapshotBlock); the request body at most one too.
        limit = REQUEST_BASE_S + (len(data) + BLOCK_SIZE) / MIN_TRANSFER_RATE
        where: dict[str, Any] = {"snapshot_id": None, "block_index": None}
        response = self._exchange(head, data, parts.path, BLOCK_SIZE, limit, where)
        return botocore.awsrequest.AWSResponse(
            request.url,
            response.status,
            botocore.awsrequest.HeadersDict(response.headers),
            _BodyStream(response.data()),
        )

    def _exchange(
        self,
        head: bytes,
        body: bytes,
        path: str,
        max_body: int,
        limit: float,
        where: dict[str, Any],
    ) -> Response:
        """One request on a pooled or new connection, cut off `limit` seconds from now."""
        deadline = time.monotonic() + limit
        if not self.limiter.acquire(deadline):
            raise translate(self.limiter.no_turn(limit), **where)
        # Each phase maps its failures to the names boto3 reports for them (client.translate
        # makes all of them retryable), so retry statistics read the same on either path.
        phase = "connect"
        conn: Connection | None = None
        alarm: _Alarm | None = None
        try:
            conn = self._pool.get()
            if conn is None:
                conn, alarm = self.connect(deadline)
            else:
                alarm = _WATCHDOG.arm(conn.sock, deadline)
            phase = "send"
            response = conn.exchange(head, MAX_ERROR_BODY, max_body, body)
        except Exception as exc:
            late = alarm is not None and _WATCHDOG.disarm(alarm)
            if conn is not None:
                if conn.in_body:
                    phase = "body"
                conn.close()
            if late:
                phase = "deadline"
            raise self.network_error(exc, phase, path, where, limit, deadline) from None
        late = _WATCHDOG.disarm(alarm)
        if response.status >= 300:
            # Read once, as botocore reads it (header or body): the caller raises it, and a
            # throttling answer teaches the limiter (the rate grows back with time).
            response.error = self.service_error(response, where)
            if response.error.throttled:
                self.limiter.throttled()
        if response.reusable and not late:
            self._pool.put(conn)
        else:
            conn.close()
        if late and not response.framed:
            # The end of this body may be the watchdog's cut, not the server's.
            raise self.network_error(TimeoutError(), "deadline", path, where, limit)
        return response

    @staticmethod
    def verified(data: bytes | memoryview, headers: dict[str, str], where: dict[str, Any]) -> None:
        """Raise ChecksumMismatch unless `data`'s length and SHA-256 match the headers."""
        announced = headers.get("x-amz-data-length")
        if announced is not None:
            try:
                expected_length = int(announced)
            except ValueError:
                raise ChecksumMismatch(
                    f"the service announced a length of {announced!r} bytes",
                    code="LengthMismatch",
                    retryable=True,
                    **where,
                ) from None
        else:
            expected_length = None
        verify_block(
            data,
            expected_length,
            headers.get("x-amz-checksum-algorithm"),
            headers.get("x-amz-checksum"),
            **where,
        )

    @staticmethod
    def service_error(response: Response, where: dict[str, Any]) -> EbsError:
        """An error response, parsed as botocore's rest-json parser does, then `translate`d."""
        status, body = response.status, response.data()
        text = body.decode("utf-8", errors="replace")
        doc: dict[str, Any] = {}
        stripped = body.strip()
        if stripped:
            try:
                parsed = json.loads(text)
                doc = parsed if isinstance(parsed, dict) else {}
            except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
                doc = {}
        typed = response.headers.get("x-amzn-errortype") or doc.get("code") or doc.get("Code")
        typed = typed or doc.get("__type")
        if not typed and not doc:
            # botocore's "generic" error: a proxy's, load balancer's or captive portal's page
            # (HTML, plain text, nothing), not the service's. Its status is all it says; the
            # page itself would only make the message many lines long.
            code: str = str(status)
            message = http.client.responses.get(status, "")
        else:
            message = doc.get("message", doc.get("Message", "")) or text
            code = str(typed or status).split(":", 1)[0].rsplit("#", 1)[-1]
        error_document: dict[str, Any] = {"Code": code, "Message": message}
        response_document: dict[str, Any] = {
            "Error": error_document,
            "ResponseMetadata": {"HTTPStatusCode": status},
        }
        if isinstance(doc.get("Reason"), str):
            response_document["Reason"] = doc["Reason"]
        client_error = botocore.exceptions.ClientError(response_document, OPERATION)
        return translate(client_error, **where)

    def network_error(
        self,
        exc: BaseException,
        phase: str,
        path: str,
        where: dict[str, Any],
        limit: float,
        deadline: float | None = None,
    ) -> EbsError:
        """A failure below HTTP, named as botocore names it; `translate` marks it retryable.

        A timeout at the request's `deadline` (a socket or connect timeout set to what was
        left of it fires there too) is the deadline's, and says so."""
        url = f"{self.endpoint_url.rstrip('/')}{path[len(self._base_path) :]}"
        timed_out = isinstance(exc, TimeoutError | socket.timeout)
        at_deadline = deadline is not None and time.monotonic() >= deadline - 0.05
        if isinstance(exc, _DeadlinePassed) or (timed_out and at_deadline):
            phase = "deadline"
        if isinstance(exc, Oversized):
            code, message = "OversizedBody", f"{exc} ({url})"
        elif phase == "deadline":
            code = "ReadTimeoutError"
            message = f'Read timeout on endpoint URL: "{url}": no whole answer in {limit:.1f} s'
        elif phase == "connect":
            if timed_out:
                code, message = "ConnectTimeoutError", f'Connect timeout on endpoint URL: "{url}"'
            elif isinstance(exc, ssl.SSLError):
                code, message = "SSLError", f"SSL validation failed for {url} {exc}"
            else:
                code, message = (
                    "EndpointConnectionError",
                    f'Could not connect to the endpoint URL: "{url}"',
                )
        elif timed_out:
            code, message = "ReadTimeoutError", f'Read timeout on endpoint URL: "{url}"'
        elif phase == "body":
            code = "ResponseStreamingError"
            message = f"An error occurred while reading from response stream: {exc}"
        else:
            code = "ConnectionClosedError"
            message = (
                "Connection was closed before we received a valid response from endpoint "
                f'URL: "{url}".'
            )
        return EbsError(message, code=code, retryable=True, **where)

    def close(self) -> None:
        """Close pooled connections; requests in flight finish and close theirs."""
        self._pool.close()

    def __enter__(self) -> FastBlockGetter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tunnel(sock: socket.socket, server: tuple[str, int], headers: dict[str, str]) -> None:
    """Ask an HTTP proxy on `sock` for a CONNECT tunnel to `server`; raises OSError if refused."""
    host = f"[{server[0]}]" if ":" in server[0] else server[0]
    head = f"CONNECT {host}:{server[1]} HTTP/1.1\r\nHost: {host}:{server[1]}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock.sendall(head.encode("latin-1"))
    # Read byte by byte up to the blank line: nothing of the TLS stream may be buffered away.
    reply = b""
    while not reply.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte or len(reply) > 65536:
            raise OSError("the proxy closed the connection during CONNECT")
        reply += byte
    status = reply.split(b" ", 2)[1] if reply.count(b" ") >= 1 else b""
    if status != b"200":
        raise OSError(f"the proxy refused the tunnel: {reply.splitlines()[0][:100]!r}")


def _proxy_for(url: str) -> tuple[str, int, dict[str, str]] | None:
    """(proxy host, port, headers) from HTTP(S)_PROXY unless NO_PROXY exempts `url`'s host."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    proxy_url = proxies.get(parts.scheme)
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]  # not in typeshed
    if not proxy_url or bypass(parts.hostname or "", proxies):
        return None
    if "://" not in proxy_url:
        proxy_url = f"http://{proxy_url}"
    proxy = urlsplit(proxy_url)
    headers: dict[str, str] = {}
    if proxy.username is not None:
        credentials = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}"
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
    return proxy.hostname or "", proxy.port or 8080, headers
