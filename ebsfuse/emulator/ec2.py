"""EC2 DescribeSnapshots for the emulator's own snapshots: the query protocol, XML answers.

Served on the emulator's port at `/` (boto3's `ec2` client POSTs a form there; a GET with the
same query string works too), so unmodified boto3 pointed at it with `AWS_ENDPOINT_URL_EC2`
lists the snapshots the EBS side serves. What is understood, as ../shared/ebs-direct-api.md
describes the service:

- `SnapshotId.N` (unknown ids: InvalidSnapshot.NotFound; malformed: InvalidSnapshotID.Malformed),
  `Owner.N` (boto3's wire name for OwnerIds; `self` or the account), `RestorableBy.N`
  (accepted, ignored);
- `Filter.N.Name` / `Filter.N.Value.M` for volume-id, status, owner-id, description,
  snapshot-id, tag-key and tag:KEY, values with `*` and `?` wildcards; values within a filter
  are alternatives, filters all apply; another name is InvalidParameterValue;
- `MaxResults` 5..1000 (not with SnapshotIds) and `NextToken`, ordered by snapshot id.

Snapshots made with StartSnapshot carry the placeholder volume `vol-ffffffff`, as AWS's do;
seeded and synthetic ones may name a volume.
"""

from __future__ import annotations

import base64
import fnmatch
import re
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

from .store import Snapshot, Store

XMLNS = "http://ec2.amazonaws.com/doc/2016-11-15/"
MAX_RESULTS = 1000
MIN_RESULTS = 5
_SNAPSHOT_ID = re.compile(r"^snap-[0-9a-f]{8}([0-9a-f]{9})?$")
_FILTERS = ("volume-id", "status", "owner-id", "description", "snapshot-id", "tag-key")


class Ec2Error(Exception):
    """An EC2 error answer: HTTP status, code, message."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def parse_form(text: str) -> dict[str, str]:
    """The parameters of a query-protocol request (form body or query string)."""
    return dict(parse_qsl(text, keep_blank_values=True))


def answer(store: Store, now: float, form: Mapping[str, str]) -> tuple[int, bytes]:
    """(HTTP status, XML body) for one EC2 query request."""
    request_id = secrets.token_hex(16)
    try:
        action = form.get("Action")
        if action != "DescribeSnapshots":
            raise Ec2Error(
                "InvalidAction", f"The action {action} is not valid for this web service."
            )
        return 200, _describe(store, now, form, request_id)
    except Ec2Error as error:
        return error_answer(error, request_id)


# Answers for the emulator's EC2 faults: a caller whose policy lacks the action, and EC2's
# throttling (which it answers 503 RequestLimitExceeded, unlike EBS's 429).
UNAUTHORIZED = Ec2Error(
    "UnauthorizedOperation", "You are not authorized to perform this operation.", 403
)
THROTTLED = Ec2Error("RequestLimitExceeded", "Request limit exceeded.", 503)


def error_answer(error: Ec2Error, request_id: str | None = None) -> tuple[int, bytes]:
    """(HTTP status, XML body) of an EC2 error answer."""
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
        f"<Code>{escape(error.code)}</Code><Message>{escape(str(error))}</Message>"
        f"</Error></Errors><RequestID>{request_id or secrets.token_hex(16)}</RequestID></Response>"
    )
    return error.status, body.encode()


def _numbered(form: Mapping[str, str], prefix: str) -> list[str]:
    """`Prefix.1`, `Prefix.2`, ... in order."""
    found = []
    for key, value in form.items():
        head, _, number = key.rpartition(".")
        if head == prefix and number.isdigit():
            found.append((int(number), value))
    return [value for _, value in sorted(found)]


def _filters(form: Mapping[str, str]) -> list[tuple[str, list[str]]]:
    filters = []
    numbers = sorted(
        {int(k.split(".")[1]) for k in form if k.startswith("Filter.") and k.count(".") >= 2}
    )
    for n in numbers:
        name = form.get(f"Filter.{n}.Name", "")
        if name not in _FILTERS and not name.startswith("tag:"):
            raise Ec2Error("InvalidParameterValue", f"The filter '{name}' is invalid")
        filters.append((name, _numbered(form, f"Filter.{n}.Value")))
    return filters


def _matcher(name: str, values: list[str]) -> Callable[[Snapshot, str], bool]:
    def any_value(candidates: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(c, v) for c in candidates for v in values)

    def match(snap: Snapshot, status: str) -> bool:
        tags = {t.get("Key", ""): t.get("Value", "") for t in snap.tags}
        if name == "volume-id":
            return any_value([snap.volume_id])
        if name == "status":
            return any_value([status])
        if name == "owner-id":
            return any_value([snap.owner_id])
        if name == "description":
            return any_value([snap.description])
        if name == "snapshot-id":
            return any_value([snap.snapshot_id])
        if name == "tag-key":
            return any_value(list(tags))
        key = name[len("tag:") :]
        return key in tags and any_value([tags[key]])

    return match


def _describe(store: Store, now: float, form: Mapping[str, str], request_id: str) -> bytes:
    ids = _numbered(form, "SnapshotId")
    owners = _numbered(form, "Owner") + _numbered(form, "OwnerId")  # boto3 sends Owner.N
    matchers = [_matcher(name, values) for name, values in _filters(form)]
    limit = _max_results(form, bool(ids))
    for sid in ids:
        if not _SNAPSHOT_ID.match(sid):
            raise Ec2Error("InvalidSnapshotID.Malformed", f'Invalid id: "{sid}"')
    known = set(store.ids())
    missing = [sid for sid in ids if sid not in known]
    if missing:
        raise Ec2Error("InvalidSnapshot.NotFound", f"The snapshot '{missing[0]}' does not exist.")
    after = _token_position(form.get("NextToken"))
    chosen: list[tuple[Snapshot, str]] = []
    next_token = None
    for sid in sorted(ids or known):
        if after is not None and sid <= after:
            continue
        snap = store.get(sid)
        status = snap.status(now)
        if owners and not any(o in ("self", snap.owner_id) for o in owners):
            continue
        if not all(match(snap, status) for match in matchers):
            continue
        if limit is not None and len(chosen) == limit:
            next_token = base64.urlsafe_b64encode(chosen[-1][0].snapshot_id.encode()).decode()
            break
        chosen.append((snap, status))
    items = "".join(_item(snap, status) for snap, status in chosen)
    tail = f"<nextToken>{next_token}</nextToken>" if next_token else ""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<DescribeSnapshotsResponse xmlns="{XMLNS}">'
        f"<requestId>{request_id}</requestId><snapshotSet>{items}</snapshotSet>{tail}"
        "</DescribeSnapshotsResponse>"
    ).encode()


def _max_results(form: Mapping[str, str], with_ids: bool) -> int | None:
    text = form.get("MaxResults")
    if text is None:
        return None
    if with_ids:
        raise Ec2Error(
            "InvalidParameterCombination",
            "The parameter snapshotIdSet cannot be used with the parameter maxResults",
        )
    if not text.isdigit() or not MIN_RESULTS <= int(text) <= MAX_RESULTS:
        raise Ec2Error(
            "InvalidParameterValue",
            f"Value ( {text} ) for parameter maxResults is invalid. "
            f"Expecting a value between {MIN_RESULTS} and {MAX_RESULTS}.",
        )
    return int(text)


def _token_position(token: str | None) -> str | None:
    if not token:
        return None
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise Ec2Error("InvalidParameterValue", "The nextToken is invalid") from None


def _item(snap: Snapshot, status: str) -> str:
    started = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(snap.start_time))
    millis = int((snap.start_time % 1) * 1000)
    fields: list[tuple[str, Any]] = [
        ("snapshotId", snap.snapshot_id),
        ("volumeId", snap.volume_id),
        ("status", status),
        ("startTime", f"{started}.{millis:03d}Z"),
        ("progress", "100%" if status == "completed" else "0%"),
        ("ownerId", snap.owner_id),
        ("volumeSize", snap.volume_size),
        ("description", snap.description),
        ("encrypted", "true" if snap.encrypted else "false"),
    ]
    if snap.kms_key_arn:
        fields.append(("kmsKeyId", snap.kms_key_arn))
    body = "".join(f"<{k}>{escape(str(v))}</{k}>" for k, v in fields)
    if snap.tags:
        tags = "".join(
            f"<item><key>{escape(t.get('Key', ''))}</key><value>{escape(t.get('Value', ''))}"
            "</value></item>"
            for t in snap.tags
        )
        body += f"<tagSet>{tags}</tagSet>"
    return f"<item>{body}</item>"
