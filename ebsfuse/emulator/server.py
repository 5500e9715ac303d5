"""The HTTP/1.1 layer: routing, authentication check, fault injection, and sending bytes.

Built on the standard library's threading HTTP server (one thread per connection, keep-alive),
tuned for block traffic: responses are written with `sendall` straight from the stored bytes
(no copy; `sendfile` for blocks on disk), Nagle is off, and the listen backlog is deep enough
for a hundred connections opening at once.

Paths under `/_emulator/` are the control plane (counters, faults, clock) and need no
Authorization header; every other request must carry a SigV4-style Authorization header,
whose signature is not checked (the emulator has no secrets).
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import random
import re
import select
import socket
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from . import ec2
from .api import Response, error_response, json_response
from .blocks import BLOCK_SIZE, Block
from .errors import ApiError

if TYPE_CHECKING:
    from .emulator import Emulator

log = logging.getLogger(__name__)

# Bodies larger than this are refused without being read: a block is 512 KiB and a
# StartSnapshot document a few KiB, so 8 MiB only ever catches a broken or hostile client.
MAX_BODY = 8 * 1024 * 1024
# An idle keep-alive connection is closed after this long, so abandoned clients do not pin a
# thread forever; boto3 reopens transparently.
IDLE_TIMEOUT = 120.0
# A trickling body sends one byte this often: never long enough for a per-read socket timeout.
TRICKLE_INTERVAL_S = 1.0
# A stalled body waits at most this long for its client to give up (or the server to stop).
STALL_MAX_S = 600.0
# What an oversized block answer announces as its Content-Length (and sends, if read).
OVERSIZE_BYTES = 64 * 1024 * 1024
LIST_OPERATIONS = ("ListSnapshotBlocks", "ListChangedBlocks")
# A captive portal's or a proxy's page, answered with status 200 in the service's place.
PORTAL_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Sign in to the network</title></head>\n"
    b"<body><h1>Welcome</h1><p>Please sign in to continue.</p></body></html>\n"
)
TOO_MANY_REQUESTS_PAGE = b"<html><body><h1>429 Too Many Requests</h1></body></html>\n"

_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"^/snapshots$"), "StartSnapshot"),
    ("PUT", re.compile(r"^/snapshots/(?P<snapshotId>[^/]+)/blocks/(?P<blockIndex>[^/]+)$"),
     "PutSnapshotBlock"),
    ("GET", re.compile(r"^/snapshots/(?P<snapshotId>[^/]+)/blocks/(?P<blockIndex>[^/]+)$"),
     "GetSnapshotBlock"),
    ("GET", re.compile(r"^/snapshots/(?P<snapshotId>[^/]+)/blocks$"), "ListSnapshotBlocks"),
    ("GET", re.compile(r"^/snapshots/(?P<secondSnapshotId>[^/]+)/changedblocks$"),
     "ListChangedBlocks"),
    ("POST", re.compile(r"^/snapshots/completion/(?P<snapshotId>[^/]+)$"), "CompleteSnapshot"),
]  # fmt: skip


def route(method: str, path: str) -> tuple[str, dict[str, str]] | None:
    """The operation and path parameters for a request, or None for an unknown one."""
    for want, pattern, operation in _ROUTES:
        if method == want:
            match = pattern.match(path)
            if match:
                return operation, {k: unquote(v) for k, v in match.groupdict().items()}
    return None


def parse_query(text: str) -> dict[str, str]:
    """Query parameters; `+` stays a plus (SigV4 clients percent-encode everything else)."""
    out: dict[str, str] = {}
    for part in text.split("&"):
        if part:
            key, _, value = part.partition("=")
            out.setdefault(unquote(key), unquote(value))
    return out


class _BadRequest(Exception):
    """A request the HTTP layer cannot even frame; the connection is closed after answering."""


class Handler(BaseHTTPRequestHandler):
    """One connection; `handle()` loops over its keep-alive requests."""

    protocol_version = "HTTP/1.1"
    server: EmulatorHTTPServer
    timeout = IDLE_TIMEOUT
    rbufsize = 64 * 1024  # fewer recv calls per 512 KiB upload

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate sends; without NODELAY the body can wait for a
        # delayed ACK (40 ms on Linux) of the header segment.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.client_address[0], *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol-level failures (bad request line, unsupported method) in JSON too."""
        self.close_connection = True
        error_code = "ValidationException" if code < 500 else "InternalServerException"
        resp = json_response(code, {"message": message or HTTPStatus(code).phrase})
        resp.headers.append(("x-amzn-ErrorType", error_code))
        with contextlib.suppress(OSError):
            self._send(resp)

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_GET

    # Request handling -----------------------------------------------------------------------

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is not None:
            if not length.isdigit():
                raise _BadRequest("Content-Length is not a number.")
            n = int(length)
            if n > MAX_BODY:
                raise _BadRequest(f"The body of {n} bytes is too large.")
            body = self.rfile.read(n) if n else b""
            if len(body) != n:
                raise _BadRequest("The connection closed in the middle of the body.")
            return body
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        return b""

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise _BadRequest("Malformed chunked body.") from None
            total += size
            if total > MAX_BODY:
                raise _BadRequest("The chunked body is too large.")
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def _handle(self) -> None:
        app = self.server.app
        path, _, query_text = self.path.partition("?")
        try:
            body = self._read_body()
        except _BadRequest as e:
            self.close_connection = True
            self._send(error_response(ApiError("ValidationException", str(e))))
            return
        if path.startswith("/_emulator/"):
            self._send(app.control(self.command, path, body))
            return
        if path == "/" and ("Action=" in query_text or (self.command == "POST" and body)):
            self._send(self._ec2(app, query_text, body))
            return
        found = route(self.command, path)
        if found is None:
            error = ApiError(
                "UnknownOperationException", f"No operation matches {self.command} {path}."
            )
            app.counters_obj.error(error.code)
            self._send(error_response(error))
            return
        operation, params = found
        app.counters_obj.request(operation)
        rng = app.rng
        faults = app.faults
        if faults.take(faults.bare_429_rate, rng):
            # A proxy in front of the service answers: no AWS error type, an HTML page.
            app.counters_obj.injected("bare429")
            self._send(Response(429, [("Content-Type", "text/html")], TOO_MANY_REQUESTS_PAGE))
            return
        try:
            authorization = self.headers.get("Authorization", "")
            if not authorization.startswith("AWS4-HMAC-SHA256"):
                raise ApiError(
                    "AccessDeniedException",
                    "The request is not signed (no AWS4-HMAC-SHA256 Authorization header).",
                    "UNAUTHORIZED_ACCOUNT",
                )
            if faults.denies(authorization):
                raise ApiError(
                    "AccessDeniedException",
                    "User is not authorized to perform this action on this snapshot.",
                    "UNAUTHORIZED_ACCOUNT",
                )
            if faults.take(faults.fail_rate, rng):
                app.counters_obj.injected("InternalServerException")
                raise ApiError("InternalServerException", "Injected internal error.")
            resp = app.api.dispatch(operation, params, parse_query(query_text), self.headers, body)
        except ApiError as e:
            if e.code == "RequestThrottledException":
                app.counters_obj.injected(e.code)
            resp = error_response(e)
        except Exception:
            log.exception("unexpected failure in %s %s", self.command, self.path)
            resp = error_response(ApiError("InternalServerException", "Internal error."))
        if resp.status >= 400:
            app.counters_obj.error(dict(resp.headers).get("x-amzn-ErrorType", "unknown"))
        delay = faults.delay(rng)
        if delay > 0:
            app.counters_obj.held(delay)
            time.sleep(delay)
        listing = resp.status == 200 and operation in LIST_OPERATIONS
        if listing and faults.take(faults.list_fault_rate, rng):
            kind = faults.list_fault
            app.counters_obj.injected(f"list-{kind}")
            self._send(hostile_listing(resp, kind), truncate=kind == "cut")
            return
        if resp.block is not None:
            if faults.take(faults.body_fault_rate, rng):
                kind = faults.body_fault
                app.counters_obj.injected(f"body-{kind}")
                self._send_hostile_block(resp, kind)
                return
            if faults.take(faults.corrupt_rate, rng):
                app.counters_obj.injected("corrupt")
                self._send(corrupted(resp))
                return
        truncate = resp.block is not None and faults.take(faults.truncate_rate, rng)
        self._send(resp, truncate=truncate)

    def _ec2(self, app: Any, query_text: str, body: bytes) -> Response:
        """An EC2 query-protocol request (DescribeSnapshots), form in the body or the query."""
        form = ec2.parse_form(body.decode("utf-8", "replace") if body else query_text)
        app.counters_obj.request(form.get("Action") or "EC2")
        if app.faults.denies(self.headers.get("Authorization", "")):
            status, xml = ec2.error_answer(ec2.UNAUTHORIZED)
        elif app.faults.take(app.faults.ec2_throttle_rate, app.rng):
            app.counters_obj.injected("ec2-throttle")
            status, xml = ec2.error_answer(ec2.THROTTLED)
        else:
            status, xml = ec2.answer(app.store, app.clock.now(), form)
        if status >= 400:
            app.counters_obj.error(xml.split(b"<Code>")[1].split(b"</Code>")[0].decode())
        return Response(status, [("Content-Type", "text/xml;charset=UTF-8")], xml)

    # Sending --------------------------------------------------------------------------------

    def _send(self, resp: Response, truncate: bool = False) -> None:
        block = resp.block
        length = len(resp.body) if block is None else _block_length(block)
        status = HTTPStatus(resp.status)
        lines = [f"HTTP/1.1 {status.value} {status.phrase}"]
        lines += [f"{name}: {value}" for name, value in resp.headers]
        lines.append(f"Content-Length: {length}")
        lines.append(f"x-amzn-RequestId: {uuid.uuid4()}")
        lines.append(f"Date: {email.utils.formatdate(usegmt=True)}")
        if self.close_connection or truncate:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        sock = self.connection
        if self.command == "HEAD":  # a HEAD response carries the headers only
            sock.sendall(head)
            return
        if block is None:
            if truncate:  # a cut page: the head promises more than arrives
                sock.sendall(head + resp.body[: len(resp.body) // 2])
                self.close_connection = True
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                return
            sock.sendall(head + resp.body)
            return
        sock.sendall(head)
        limit = length // 2 if truncate else length
        sent = 0
        if block.path is not None:
            with open(block.path, "rb") as f:
                sent = sock.sendfile(f, 0, limit)
        else:
            for part in (block.data or b"", block.tail):
                take = min(len(part), limit - sent)
                if take <= 0:
                    break
                sock.sendall(memoryview(part)[:take] if take < len(part) else part)
                sent += take
        self.server.app.counters_obj.served(sent)
        if truncate:
            self.server.app.counters_obj.injected("truncated")
            self.close_connection = True
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _send_hostile_block(self, resp: Response, kind: str) -> None:
        """A block answer that trickles, stalls halfway or announces 64 MiB; then hang up."""
        assert resp.block is not None
        data = block_bytes(resp.block)
        announced = OVERSIZE_BYTES if kind == "oversize" else len(data)
        status = HTTPStatus(resp.status)
        lines = [f"HTTP/1.1 {status.value} {status.phrase}"]
        lines += [f"{name}: {value}" for name, value in resp.headers]
        lines += [f"Content-Length: {announced}", "Connection: close"]
        sock = self.connection
        self.close_connection = True
        try:
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            if kind == "trickle":
                # At most STALL_MAX_S of it: a client with no deadline must not pin a thread
                # for the six days 512 KiB take at a byte a second.
                for i in range(min(len(data), int(STALL_MAX_S / TRICKLE_INTERVAL_S))):
                    if self._client_gone(TRICKLE_INTERVAL_S):
                        return
                    sock.sendall(data[i : i + 1])
            elif kind == "stall":
                sock.sendall(data[: len(data) // 2])
                self._client_gone(STALL_MAX_S)
            else:
                sock.sendall(data)
                filler = bytes(1024 * 1024)
                for _ in range((OVERSIZE_BYTES - len(data)) // len(filler)):
                    sock.sendall(filler)
        except OSError:
            pass  # the client hung up, as it should

    def _client_gone(self, seconds: float) -> bool:
        """Wait up to `seconds`; True once the client closed (or the server cut) the socket."""
        poller = select.poll()
        poller.register(self.connection, select.POLLIN | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(seconds * 1000))


def hostile_listing(resp: Response, kind: str) -> Response:
    """A 200 listing answer as a broken network or a proxy delivers it.

    `cut` is the real page (the caller sends half of it); `empty` is `{}`; `html` a captive
    portal's page; `malformed` the real page with an entry that has no token and an index
    past the volume.
    """
    if kind == "empty":
        return Response(200, [("Content-Type", "application/json")], b"{}")
    if kind == "html":
        return Response(200, [("Content-Type", "text/html; charset=utf-8")], PORTAL_PAGE)
    if kind == "malformed":
        doc = json.loads(resp.body)
        key = "Blocks" if "Blocks" in doc else "ChangedBlocks"
        past_end = int(doc.get("VolumeSize", 1)) * 2048 + 7
        doc[key] = [{"BlockIndex": past_end}, *doc[key]]
        body = json.dumps(doc).encode()
        return Response(200, [("Content-Type", "application/json")], body)
    return resp


def corrupted(resp: Response) -> Response:
    """The block answer with one byte flipped: the checksum header no longer matches."""
    assert resp.block is not None
    data = bytearray(block_bytes(resp.block))
    data[len(data) // 3] ^= 0xFF
    return Response(resp.status, list(resp.headers), bytes(data))


def block_bytes(block: Block) -> bytes:
    """A stored block's bytes, from memory or from its file."""
    if block.path is not None:
        with open(block.path, "rb") as f:
            return f.read()
    return (block.data or b"") + block.tail


def _block_length(block: Block) -> int:
    if block.path is not None:
        return BLOCK_SIZE  # block files are written whole, never partial
    return len(block.data or b"") + len(block.tail)


class EmulatorHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that can close every live connection on shutdown."""

    daemon_threads = True
    allow_reuse_address = True
    # Clients open up to ~100 connections at once (AWS's own sizing); the stdlib default of 5
    # would drop SYNs and stall them for a second.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], app: Emulator) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.app = app
        self._live: dict[socket.socket, threading.Thread] = {}
        self._live_lock = threading.Lock()
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn), slow without a network.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"ebs-emulator-conn-{client_address[1] if len(client_address) > 1 else 0}",
            daemon=True,
        )
        with self._live_lock:
            self._live[request] = thread
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            with self._live_lock:
                self._live.pop(request, None)
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)

    def close_connections(self, timeout: float = 5.0) -> None:
        """Cut every live connection and wait for their threads to end."""
        with self._live_lock:
            live = list(self._live.items())
        for sock, _ in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for _, thread in live:
            thread.join(max(0.0, deadline - time.monotonic()))


def control_error(message: str, status: int = 400) -> Response:
    """An error answer of the control plane."""
    return json_response(status, {"message": message})


def parse_control_json(body: bytes) -> dict[str, Any]:
    """A control request's JSON object body ({} when empty); raises ValueError."""
    if not body.strip():
        return {}
    doc = json.loads(body)
    if not isinstance(doc, dict):
        raise ValueError("the body must be a JSON object")
    return doc


def make_rng() -> random.Random:
    """The generator that decides injected faults (its own, so tests can reseed it)."""
    return random.Random()
