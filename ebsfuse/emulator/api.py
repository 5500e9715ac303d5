"""The six EBS direct API operations, independent of HTTP.

Each handler takes the request's path parameters, query, headers and body, validates them
against botocore's `ebs` model (names, ranges, patterns), applies the store's rules and
returns a `Response`. Nothing here touches a socket: the HTTP layer (server.py) routes,
authenticates, injects faults and writes the bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .blocks import BLOCK_SIZE, Block
from .clock import Clock
from .errors import ApiError, validation
from .faults import Faults, Throttle
from .metrics import Counters
from .store import MAX_VOLUME_GIB, Snapshot, Store, merged_indexes
from .tokens import (
    FLAG_EMPTY_NEXT,
    KIND_CHANGED_BLOCKS,
    KIND_SNAPSHOT_BLOCKS,
    TokenCodec,
)

_SNAPSHOT_ID = re.compile(r"^snap-[0-9a-f]+$")
_DIGITS = re.compile(r"^[0-9]{1,20}$")
_KMS_ARN = re.compile(r"arn:aws[a-z\-]*:kms:.*:[0-9]{12}:key/.*")
_NO_SPACE = re.compile(r"^\S+$")
MIN_RESULTS, MAX_RESULTS = 100, 10000  # MaxResults range of both list operations
MAX_TAGS = 50
JSON_TYPE = "application/json"


# A gate holds a block's answer at most this long: a test that forgets to release one fails
# on its own timeout, never with a server thread stuck for good.
GATE_MAX_HOLD_S = 60.0


class Gate:
    """Holds GetSnapshotBlock answers for one block until released; counts who arrived."""

    def __init__(self) -> None:
        self._released = threading.Event()
        self._lock = threading.Lock()
        self.arrived = 0

    def pass_through(self) -> None:
        with self._lock:
            self.arrived += 1
        self._released.wait(GATE_MAX_HOLD_S)

    def release(self) -> None:
        self._released.set()


class Gates:
    """The emulator's gates by (snapshot id, block index): a test's way to know a request is
    under way, and to decide when it ends, instead of guessing with sleeps."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gates: dict[tuple[str, int], Gate] = {}

    def close(self, snapshot_id: str, index: int) -> Gate:
        with self._lock:
            gate = self._gates[(snapshot_id, index)] = Gate()
        return gate

    def arrivals(self) -> list[dict[str, Any]]:
        """Each closed gate and the requests it holds, as JSON."""
        with self._lock:
            gates = list(self._gates.items())
        return [
            {"snapshot_id": sid, "block_index": index, "arrived": gate.arrived}
            for (sid, index), gate in gates
        ]

    def release_all(self) -> None:
        with self._lock:
            gates, self._gates = list(self._gates.values()), {}
        for gate in gates:
            gate.release()

    def wait(self, snapshot_id: str, index: int) -> None:
        with self._lock:
            gate = self._gates.get((snapshot_id, index))
        if gate is not None:
            gate.pass_through()


@dataclass
class Response:
    """What to send: status, headers, and either a JSON body or one block's bytes."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    block: Block | None = None


def json_response(status: int, doc: Mapping[str, Any]) -> Response:
    """A JSON document response."""
    body = json.dumps(doc, separators=(",", ":")).encode()
    return Response(status, [("Content-Type", JSON_TYPE)], body)


def error_response(error: ApiError) -> Response:
    """The wire form of an error, as botocore's rest-json parser reads it."""
    resp = json_response(error.status, error.body())
    resp.headers.append(("x-amzn-ErrorType", error.code))
    return resp


def check_snapshot_id(value: str | None, what: str = "SnapshotId") -> str:
    """A well-formed snapshot id, or ValidationException INVALID_SNAPSHOT_ID."""
    if value is None or not 1 <= len(value) <= 64 or not _SNAPSHOT_ID.match(value):
        raise validation(f"{what} {value!r} is not a valid snapshot id.", "INVALID_SNAPSHOT_ID")
    return value


def _int_text(value: str | None, name: str, low: int, high: int, reason: str) -> int:
    if value is None or not _DIGITS.match(value) or not low <= int(value) <= high:
        raise validation(f"{name} must be an integer from {low} to {high}, not {value!r}.", reason)
    return int(value)


class Api:
    """The operations, bound to one store, token key, fault settings and counters."""

    def __init__(
        self,
        store: Store,
        codec: TokenCodec,
        faults: Faults,
        clock: Clock,
        throttle: Throttle,
        counters: Counters,
    ) -> None:
        self.store = store
        self.codec = codec
        self.faults = faults
        self.clock = clock
        self.throttle = throttle
        self.counters = counters
        self.gates = Gates()
        self.handlers: dict[str, Callable[..., Response]] = {
            "StartSnapshot": self.start_snapshot,
            "PutSnapshotBlock": self.put_snapshot_block,
            "CompleteSnapshot": self.complete_snapshot,
            "GetSnapshotBlock": self.get_snapshot_block,
            "ListSnapshotBlocks": self.list_snapshot_blocks,
            "ListChangedBlocks": self.list_changed_blocks,
        }

    def dispatch(
        self,
        operation: str,
        params: Mapping[str, str],
        query: Mapping[str, str],
        headers: Any,
        body: bytes,
    ) -> Response:
        """Run one operation; raises ApiError for every refusal.

        `headers` is the request's header block (`email.message.Message`, case-insensitive
        `get`), as every handler takes it.
        """
        return self.handlers[operation](params, query, headers, body)

    # Helpers --------------------------------------------------------------------------------

    def _snapshot(self, value: str | None, what: str = "SnapshotId") -> Snapshot:
        return self.store.get(check_snapshot_id(value, what))

    def _require_completed(self, snap: Snapshot) -> None:
        status = snap.status(self.clock.now())
        if status != "completed":
            raise validation(
                f"The snapshot '{snap.snapshot_id}' is {status}; only completed snapshots "
                "can be read.",
                "INVALID_PARAMETER_VALUE",
            )

    def _throttle(self, snap: Snapshot) -> None:
        if not self.throttle.allow(snap.snapshot_id, self.faults.throttle_rps):
            raise ApiError(
                "RequestThrottledException",
                f"Too many requests for snapshot '{snap.snapshot_id}'; slow down.",
                "RESOURCE_LEVEL_THROTTLE",
            )

    def _block_index(self, snap: Snapshot, value: str | None) -> int:
        if value is None or not _DIGITS.match(value) or int(value) >= snap.nblocks:
            raise validation(
                f"Block index {value!r} is not within the {snap.volume_size} GiB volume "
                f"(0 .. {snap.nblocks - 1}).",
                "INVALID_BLOCK",
            )
        return int(value)

    # StartSnapshot --------------------------------------------------------------------------

    def start_snapshot(
        self, params: Mapping[str, str], query: Mapping[str, str], headers: Any, body: bytes
    ) -> Response:
        try:
            doc = json.loads(body or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise validation("The request body is not valid JSON.") from None
        if not isinstance(doc, dict):
            raise validation("The request body must be a JSON object.")
        size = doc.get("VolumeSize")
        if size is None:
            raise validation("VolumeSize is required.", "INVALID_VOLUME_SIZE")
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_VOLUME_GIB:
            raise validation(
                f"VolumeSize must be from 1 to {MAX_VOLUME_GIB} GiB, not {size!r}.",
                "INVALID_VOLUME_SIZE",
            )
        parent_id = doc.get("ParentSnapshotId")
        if parent_id is not None:
            check_snapshot_id(parent_id if isinstance(parent_id, str) else None, "ParentSnapshot")
        tags = _tags(doc.get("Tags"))
        description = doc.get("Description", "")
        if not isinstance(description, str) or len(description) > 255:
            raise validation("Description must be a string of at most 255 characters.")
        token = doc.get("ClientToken")
        if token is not None and (
            not isinstance(token, str) or len(token) > 255 or not _NO_SPACE.match(token)
        ):
            raise validation("ClientToken must be 1 to 255 non-blank characters.")
        encrypted = doc.get("Encrypted")
        if encrypted is not None and not isinstance(encrypted, bool):
            raise validation("Encrypted must be true or false.")
        if encrypted is not None and parent_id is not None:
            raise validation("ParentSnapshotId and Encrypted cannot be given in the same request.")
        kms = doc.get("KmsKeyArn")
        if kms is not None:
            if not isinstance(kms, str) or not 1 <= len(kms) <= 2048 or not _KMS_ARN.match(kms):
                raise validation("KmsKeyArn is not a KMS key ARN.", "INVALID_CUSTOMER_KEY")
            if not encrypted:
                raise validation("KmsKeyArn requires Encrypted to be true.")
        timeout = doc.get("Timeout", 60)
        if isinstance(timeout, bool) or not isinstance(timeout, int) or not 10 <= timeout <= 4320:
            raise validation(f"Timeout must be from 10 to 4320 minutes, not {timeout!r}.")
        fingerprint = json.dumps(
            {k: v for k, v in doc.items() if k != "ClientToken"}, sort_keys=True
        )
        snap = self.store.start(
            volume_size=size,
            parent_id=parent_id,
            tags=tags,
            description=description,
            client_token=token,
            encrypted=bool(encrypted),
            kms_key_arn=kms,
            timeout_minutes=timeout,
            fingerprint=fingerprint,
        )
        doc = snap.describe()
        doc["Status"] = snap.status(self.clock.now())
        return json_response(201, doc)

    # PutSnapshotBlock -----------------------------------------------------------------------

    def put_snapshot_block(
        self, params: Mapping[str, str], query: Mapping[str, str], headers: Any, body: bytes
    ) -> Response:
        snap = self._snapshot(params["snapshotId"])
        self._throttle(snap)
        index = self._block_index(snap, params["blockIndex"])
        length = headers.get("x-amz-Data-Length")
        if length is None or not _DIGITS.match(length) or int(length) != BLOCK_SIZE:
            raise validation(f"x-amz-Data-Length must be {BLOCK_SIZE}, not {length!r}.")
        if len(body) != BLOCK_SIZE:
            raise validation(
                f"The body is {len(body)} bytes but x-amz-Data-Length says {BLOCK_SIZE}."
            )
        algorithm = headers.get("x-amz-Checksum-Algorithm")
        if algorithm != "SHA256":
            raise validation(f"x-amz-Checksum-Algorithm must be SHA256, not {algorithm!r}.")
        checksum = headers.get("x-amz-Checksum")
        if checksum is None:
            raise validation("x-amz-Checksum is required.")
        progress = headers.get("x-amz-Progress")
        if progress is not None:
            _int_text(progress, "x-amz-Progress", 0, 100, "INVALID_PARAMETER_VALUE")
        digest = hashlib.sha256(body).digest()
        actual = base64.b64encode(digest).decode("ascii")
        if checksum != actual:
            raise validation(
                f"The checksum {checksum!r} does not match the data of block {index} "
                f"(SHA-256 {actual})."
            )
        self.store.put_block(snap, index, body, digest)
        self.counters.received(len(body))
        return Response(
            201,
            [
                ("Content-Type", JSON_TYPE),
                ("x-amz-Checksum", actual),
                ("x-amz-Checksum-Algorithm", "SHA256"),
            ],
        )

    # CompleteSnapshot -----------------------------------------------------------------------

    def complete_snapshot(
        self, params: Mapping[str, str], query: Mapping[str, str], headers: Any, body: bytes
    ) -> Response:
        snap = self._snapshot(params["snapshotId"])
        count = _int_text(
            headers.get("x-amz-ChangedBlocksCount"),
            "x-amz-ChangedBlocksCount",
            0,
            snap.nblocks,
            "INVALID_PARAMETER_VALUE",
        )
        checksum = headers.get("x-amz-Checksum")
        algorithm = headers.get("x-amz-Checksum-Algorithm")
        if algorithm not in (None, "SHA256"):
            raise validation(f"x-amz-Checksum-Algorithm must be SHA256, not {algorithm!r}.")
        aggregation = headers.get("x-amz-Checksum-Aggregation-Method")
        first = snap.state != "completed"
        self.store.complete(snap, count, checksum, aggregation)
        if first and self.faults.complete_after_s > 0:
            snap.completes_at = self.clock.now() + self.faults.complete_after_s
        return json_response(202, {"Status": snap.status(self.clock.now())})

    # GetSnapshotBlock -----------------------------------------------------------------------

    def get_snapshot_block(
        self, params: Mapping[str, str], query: Mapping[str, str], headers: Any, body: bytes
    ) -> Response:
        snap = self._snapshot(params["snapshotId"])
        self._require_completed(snap)
        self._throttle(snap)
        index = self._block_index(snap, params["blockIndex"])
        token = query.get("blockToken")
        if not token:
            raise validation("blockToken is required.", "INVALID_BLOCK_TOKEN")
        if not self.codec.check_block_token(token, snap.snapshot_id, index, self.clock.now()):
            raise validation(
                f"The block token for block {index} of '{snap.snapshot_id}' is invalid or "
                "has expired.",
                "INVALID_BLOCK_TOKEN",
            )
        self.gates.wait(snap.snapshot_id, index)
        block = snap.resolve(index)
        if block is None:  # only a token issued by a listing passes the MAC, so: a bug
            raise ApiError("InternalServerException", f"block {index} vanished")
        return Response(
            200,
            [
                ("Content-Type", "application/octet-stream"),
                ("x-amz-Data-Length", str(BLOCK_SIZE)),
                ("x-amz-Checksum", base64.b64encode(block.digest).decode("ascii")),
                ("x-amz-Checksum-Algorithm", "SHA256"),
            ],
            block=block,
        )

    # Listings -------------------------------------------------------------------------------

    def _page(
        self,
        kind: bytes,
        scope: str,
        query: Mapping[str, str],
        candidates: Callable[[int, int], list[int]],
    ) -> tuple[list[int], dict[str, Any]]:
        """Shared pagination: which indexes this page covers, and the page's common fields."""
        now = self.clock.now()
        faults = self.faults
        max_results = MAX_RESULTS
        if "maxResults" in query:
            max_results = _int_text(
                query["maxResults"], "maxResults", MIN_RESULTS, MAX_RESULTS,
                "INVALID_PARAMETER_VALUE",
            )  # fmt: skip
        token = query.get("pageToken")
        if token:
            state = self.codec.read_page_token(token, kind, scope, now)
            if state is None:
                raise validation("The page token is invalid or has expired.", "INVALID_PAGE_TOKEN")
            start, empty = state.next_index, bool(state.flags & FLAG_EMPTY_NEXT)
        else:
            start = 0
            if "startingBlockIndex" in query:
                start = _int_text(
                    query["startingBlockIndex"], "startingBlockIndex", 0, 2**63 - 1,
                    "INVALID_PARAMETER_VALUE",
                )  # fmt: skip
            empty = faults.empty_pages
        page: dict[str, Any] = {"ExpiryTime": now + faults.token_ttl}
        page_expiry = now + faults.page_token_ttl
        if empty and faults.empty_pages:
            # An injected empty page: nothing listed, but the client must follow NextToken.
            page["NextToken"] = self.codec.page_token(kind, scope, start, 0, page_expiry)
            return [], page
        found = candidates(start, max_results + 1)
        if len(found) > max_results:
            found = found[:max_results]
            flags = FLAG_EMPTY_NEXT if faults.empty_pages else 0
            page["NextToken"] = self.codec.page_token(
                kind, scope, found[-1] + 1, flags, page_expiry
            )
        return found, page

    def _reported_size(self, gib: int) -> int:
        """The VolumeSize a listing reports: the true one unless a fault overrides it."""
        return int(self.faults.report_volume_size) or gib

    def list_snapshot_blocks(
        self, params: Mapping[str, str], query: Mapping[str, str], headers: Any, body: bytes
    ) -> Response:
        snap = self._snapshot(params["snapshotId"])
        self._require_completed(snap)
        layers = [s.layer for s in snap.lineage()]
        indexes, page = self._page(
            KIND_SNAPSHOT_BLOCKS,
            snap.snapshot_id,
            query,
            lambda start, limit: merged_indexes(layers, start, limit),
        )
        tokens = self.codec.block_tokens(snap.snapshot_id, indexes, page["ExpiryTime"])
        doc: dict[str, Any] = {
            "Blocks": [
                {"BlockIndex": i, "BlockToken": t} for i, t in zip(indexes, tokens, strict=True)
            ],
            "ExpiryTime": page["ExpiryTime"],
            "VolumeSize": self._reported_size(snap.volume_size),
            "BlockSize": BLOCK_SIZE,
        }
        if "NextToken" in page:
            doc["NextToken"] = page["NextToken"]
        return json_response(200, doc)

    def list_changed_blocks(
        self, params: Mapping[str, str], query: Mapping[str, str], headers: Any, body: bytes
    ) -> Response:
        second = self._snapshot(params["secondSnapshotId"], "SecondSnapshotId")
        first_id = query.get("firstSnapshotId")
        first = self._snapshot(first_id, "FirstSnapshotId") if first_id is not None else None
        self._require_completed(second)
        second_line = second.lineage()
        if first is None:
            layers = [s.layer for s in second_line]
        else:
            self._require_completed(first)
            first_line = first.lineage()
            first_members = {id(s) for s in first_line}
            common = next((s for s in second_line if id(s) in first_members), None)
            if common is None:
                raise validation(
                    f"'{first.snapshot_id}' and '{second.snapshot_id}' are not of the same "
                    "lineage.",
                    "UNRELATED_SNAPSHOTS",
                )
            # Only layers written after the common ancestor can make the two differ.
            layers = [s.layer for s in second_line[: second_line.index(common)]]
            layers += [s.layer for s in first_line[: first_line.index(common)]]
        scope = f"{second.snapshot_id}|{first.snapshot_id if first else ''}"
        indexes, page = self._page(
            KIND_CHANGED_BLOCKS,
            scope,
            query,
            lambda start, limit: merged_indexes(layers, start, limit),
        )
        expiry = page["ExpiryTime"]
        changed = []
        for i in indexes:
            theirs = first.resolve(i) if first is not None else None
            ours = second.resolve(i)
            if theirs is not None and ours is not None and theirs.digest == ours.digest:
                continue  # rewritten with the same content: not a change
            entry: dict[str, Any] = {"BlockIndex": i}
            if theirs is not None and first is not None:
                entry["FirstBlockToken"] = self.codec.block_token(first.snapshot_id, i, expiry)
            if ours is not None:
                entry["SecondBlockToken"] = self.codec.block_token(second.snapshot_id, i, expiry)
            changed.append(entry)
        doc: dict[str, Any] = {
            "ChangedBlocks": changed,
            "ExpiryTime": expiry,
            "VolumeSize": self._reported_size(second.volume_size),
            "BlockSize": BLOCK_SIZE,
        }
        if "NextToken" in page:
            doc["NextToken"] = page["NextToken"]
        return json_response(200, doc)


def _tags(value: Any) -> list[dict[str, str]]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_TAGS:
        raise validation(f"Tags must be a list of at most {MAX_TAGS} tags.", "INVALID_TAG")
    tags = []
    for tag in value:
        if not isinstance(tag, dict):
            raise validation("Each tag must be an object with Key and Value.", "INVALID_TAG")
        key, val = tag.get("Key"), tag.get("Value", "")
        if not isinstance(key, str) or not 1 <= len(key) <= 127:
            raise validation("A tag Key must be 1 to 127 characters.", "INVALID_TAG")
        if not isinstance(val, str) or len(val) > 255:
            raise validation("A tag Value must be at most 255 characters.", "INVALID_TAG")
        tags.append({"Key": key, "Value": val})
    return tags
