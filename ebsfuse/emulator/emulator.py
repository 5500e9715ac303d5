"""`Emulator`: the public face of the emulator -- configuration, life cycle, seeding, counters.

It wires the store, token codec, fault settings and counters to the HTTP server, and answers
the control plane (`/_emulator/...`) that lets a test drive an emulator in another process.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

from .api import Api, Gate, Response, json_response
from .blocks import BLOCK_SIZE
from .clock import Clock
from .faults import (
    DEFAULT_PAGE_TOKEN_TTL,
    DEFAULT_THROTTLE_RPS,
    DEFAULT_TOKEN_TTL,
    Faults,
    Throttle,
)
from .metrics import Counters
from .persist import DataDir
from .server import (
    EmulatorHTTPServer,
    control_error,
    make_rng,
    parse_control_json,
)
from .store import MAX_PENDING, PLACEHOLDER_VOLUME, Store
from .synthetic import SpecError, parse_spec
from .tokens import TokenCodec, new_secret

log = logging.getLogger(__name__)

GIB = 1024**3
# serve_forever's poll interval bounds how long stop() waits for the accept loop to notice.
_POLL_INTERVAL = 0.05


class Emulator:
    """An offline EBS direct API server; see README "Emulator" for the knobs."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        data_dir: str | None = None,
        latency_ms: float = 0,
        jitter_ms: float = 0,
        throttle_rps: float = DEFAULT_THROTTLE_RPS,
        fail_rate: float = 0.0,
        truncate_rate: float = 0.0,
        empty_pages: bool = False,
        token_ttl: float = DEFAULT_TOKEN_TTL,
        page_token_ttl: float = DEFAULT_PAGE_TOKEN_TTL,
        max_pending: int = MAX_PENDING,
        **more_faults: Any,
    ) -> None:
        self.host = host
        self.port = port
        self.faults = Faults()
        self.faults.update(
            latency_ms=latency_ms,
            jitter_ms=jitter_ms,
            throttle_rps=throttle_rps,
            fail_rate=fail_rate,
            truncate_rate=truncate_rate,
            empty_pages=empty_pages,
            token_ttl=token_ttl,
            page_token_ttl=page_token_ttl,
            **more_faults,
        )
        self.clock = Clock()
        self.data_dir = DataDir(data_dir) if data_dir is not None else None
        secret = self.data_dir.secret() if self.data_dir is not None else new_secret()
        self.store = Store(self.clock, self.data_dir, max_pending)
        self.counters_obj = Counters()
        self.rng = make_rng()
        self.api = Api(
            self.store, TokenCodec(secret), self.faults, self.clock, Throttle(), self.counters_obj
        )
        self._server: EmulatorHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # Life cycle -----------------------------------------------------------------------------

    def start(self) -> Emulator:
        """Bind and serve in a background thread; returns once connections are accepted."""
        with self._lock:
            if self._server is not None:
                return self
            server = EmulatorHTTPServer((self.host, self.port), self)
            self._server = server
            self._thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": _POLL_INTERVAL},
                name="ebs-emulator-accept",
                daemon=True,
            )
            self._thread.start()
        log.info("EBS direct API emulator listening on %s", self.endpoint)
        return self

    @property
    def endpoint(self) -> str:
        """The URL to pass as boto3's endpoint_url, e.g. http://127.0.0.1:8080."""
        if self._server is None:
            raise RuntimeError("the emulator is not started")
        address, port = self._server.server_address[:2]
        host = address.decode() if isinstance(address, bytes) else str(address)
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in str(host):
            host = f"[{host}]"
        return f"http://{host}:{port}"

    def _gates_control(self, method: str, doc: dict[str, Any]) -> Response:
        """POST {"snapshot_id", "block_index"} closes a gate, {"release": true} opens them
        all; GET says how many requests each closed gate holds. For tests of a separate
        emulator process, as `gate()` is for an emulator in the test's own."""
        gates = self.api.gates
        if method == "POST" and doc.get("release"):
            gates.release_all()
        elif method == "POST":
            gates.close(str(doc["snapshot_id"]), int(doc["block_index"]))
        return json_response(200, {"gates": gates.arrivals()})

    def gate(self, snapshot_id: str, index: int) -> Gate:
        """Hold every GetSnapshotBlock answer of one block until `release()` (at most
        GATE_MAX_HOLD_S); `arrived` counts the requests held. For tests that must know a
        request is under way, instead of guessing with latency and sleeps."""
        return self.api.gates.close(snapshot_id, index)

    def stop(self) -> None:
        """Stop serving, cut live connections, join threads; safe to call twice."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        self.api.gates.release_all()  # no server thread left waiting on a gate
        server.shutdown()
        server.server_close()
        server.close_connections()
        if thread is not None:
            thread.join()
        log.info("EBS direct API emulator stopped")

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # Seeding --------------------------------------------------------------------------------

    def create_snapshot(
        self,
        image: bytes | None = None,
        *,
        blocks: dict[int, bytes] | None = None,
        volume_size_gib: int | None = None,
        parent: str | None = None,
        status: str = "completed",
        description: str = "",
        encrypted: bool = False,
        start_time: datetime | None = None,
        volume_id: str = PLACEHOLDER_VOLUME,
        tags: dict[str, str] | None = None,
    ) -> str:
        """Create a snapshot directly (no HTTP) and return its id.

        `image` is a whole volume image (length a multiple of 512 KiB); its all-zero blocks
        are not stored, as a sparse upload would skip them. `blocks` gives explicit
        index -> 512 KiB contents and is applied over `image`.
        """
        content: dict[int, bytes] = {}
        if image is not None:
            if len(image) % BLOCK_SIZE:
                raise ValueError("image length must be a multiple of 512 KiB")
            view = memoryview(image)
            zero = bytes(BLOCK_SIZE)
            for index in range(len(image) // BLOCK_SIZE):
                chunk = view[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE]
                if chunk != zero:
                    content[index] = bytes(chunk)
        if blocks:
            content.update(blocks)
        if volume_size_gib is None:
            span = len(image) if image is not None else 0
            if content:
                span = max(span, (max(content) + 1) * BLOCK_SIZE)
            volume_size_gib = max(1, math.ceil(span / GIB))
            if parent is not None:
                volume_size_gib = max(volume_size_gib, self.store.get(parent).volume_size)
        snap = self.store.seed(
            blocks=content,
            volume_size=volume_size_gib,
            parent_id=parent,
            status=status,
            description=description,
            encrypted=encrypted,
            start_time=start_time.timestamp() if start_time is not None else None,
            volume_id=volume_id,
            tags=[{"Key": k, "Value": v} for k, v in (tags or {}).items()],
        )
        return snap.snapshot_id

    def create_daily_chain(
        self,
        volume_id: str,
        days: int,
        *,
        volume_size_gib: int = 1,
        written_blocks: int = 200,
        changed_per_day: int = 20,
        first_day: datetime | None = None,
        seed: int = 0,
    ) -> list[tuple[str, dict[int, bytes]]]:
        """Daily snapshots of one volume, as Data Lifecycle Manager makes them: day 0 writes
        `written_blocks` blocks, each later day rewrites `changed_per_day` of them (a child of
        the day before). Returns each day's (snapshot id, its blocks' contents)."""
        rng = random.Random(seed)
        start = first_day or datetime(2026, 11, 1, 3, 0, tzinfo=UTC)
        content = {i: rng.randbytes(BLOCK_SIZE) for i in range(written_blocks)}
        chain: list[tuple[str, dict[int, bytes]]] = []
        parent = None
        for day in range(days):
            changes = content
            if parent is not None:
                rewritten = rng.sample(range(written_blocks), changed_per_day)
                changes = {i: rng.randbytes(BLOCK_SIZE) for i in rewritten}
            content = {**content, **changes}
            parent = self.create_snapshot(
                blocks=changes,
                volume_size_gib=volume_size_gib,
                parent=parent,
                start_time=start + timedelta(days=day),
                volume_id=volume_id,
                description=f"daily {day}",
            )
            chain.append((parent, content))
        return chain

    def create_catalogue(self, count: int, volumes: int = 1) -> list[str]:
        """`count` empty 1 GiB snapshots over `volumes` volumes (vol-...01, vol-...02, ...),
        started an hour apart: an account with many snapshots, for DescribeSnapshots."""
        start = datetime(2015, 1, 1, tzinfo=UTC)
        return [
            self.create_snapshot(
                blocks={},
                volume_size_gib=1,
                start_time=start + timedelta(hours=i),
                volume_id=f"vol-{i % volumes + 1:017x}",
            )
            for i in range(count)
        ]

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Delete a snapshot, as EC2's DeleteSnapshot does (in-memory emulators only)."""
        self.store.delete(snapshot_id)

    def create_synthetic(self, spec: str) -> str:
        """Create a synthetic snapshot from SPEC (see synthetic.py) and return its id."""
        return self.store.add_synthetic(parse_spec(spec)).snapshot_id

    # Knobs and counters ---------------------------------------------------------------------

    def set_faults(self, **settings: Any) -> None:
        """Change fault settings at once (any field of `Faults`: latency_ms, fail_rate,
        list_fault and list_fault_rate, body_fault and body_fault_rate, corrupt_rate,
        bare_429_rate, report_volume_size, max_faults, ...); ValueError on bad ones."""
        self.faults.update(**settings)

    def counters(self) -> dict[str, Any]:
        """Requests by operation, injected faults, errors by code, block bytes in and out."""
        return self.counters_obj.snapshot()

    def reset_counters(self) -> None:
        """Zero every counter."""
        self.counters_obj.reset()

    def advance_clock(self, seconds: float) -> None:
        """Make time pass for tokens and snapshot timeouts, without sleeping."""
        self.clock.advance(seconds)

    def seed_faults(self, seed: int) -> None:
        """Make the random fault decisions reproducible."""
        self.rng.seed(seed)

    # Control plane (HTTP) -------------------------------------------------------------------

    def control(self, method: str, path: str, body: bytes) -> Response:
        """Answer a `/_emulator/...` request (no authentication)."""
        try:
            doc = parse_control_json(body) if method == "POST" else {}
            if method == "GET" and path == "/_emulator/counters":
                return json_response(200, self.counters())
            if method == "GET" and path == "/_emulator/faults":
                return json_response(200, self.faults.as_dict())
            if method == "POST" and path == "/_emulator/faults":
                self.set_faults(**doc)
                return json_response(200, self.faults.as_dict())
            if method == "POST" and path == "/_emulator/reset":
                self.reset_counters()
                return json_response(200, {})
            if method == "POST" and path == "/_emulator/clock":
                self.advance_clock(float(doc.get("advance", 0)))
                return json_response(200, {"now": self.clock.now()})
            if method == "POST" and path == "/_emulator/synthetic":
                return json_response(200, {"SnapshotId": self.create_synthetic(str(doc["spec"]))})
            if method == "GET" and path == "/_emulator/snapshots":
                return json_response(200, {"SnapshotIds": self.store.ids()})
            if path == "/_emulator/gates":
                return self._gates_control(method, doc)
        except (ValueError, KeyError, TypeError, SpecError) as e:
            return control_error(str(e))
        return control_error(f"no control endpoint {method} {path}", 404)
