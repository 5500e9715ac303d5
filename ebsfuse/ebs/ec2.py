"""EC2 DescribeSnapshots: the one place ebsfuse asks EC2 about snapshots.

The EBS direct APIs know nothing of volumes, start times or tags; EC2's DescribeSnapshots
does. Two callers use this module: the mount's image mtimes (`start_times`) and the catalogue
mounts, which list every completed snapshot a query matches (`SnapshotQuery`, `list_snapshots`).

Answers are kept small on purpose: a catalogue can hold 100,000 snapshots, so each becomes a
`SnapshotRecord` of four fields (about 200 bytes), not boto3's dict with its tags. Pages are
1000 snapshots, the most EC2 gives. Every failure is one `EbsfuseError` line that names the
operation, the service's error code and what to do (a missing permission names the IAM
action); no call waits longer than its timeouts times its few attempts.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .errors import EbsfuseError, UsageError

GIB = 1024**3
# EC2's largest page (MaxResults is 5..1000).
PAGE_SIZE = 1000
# A DescribeSnapshots page of 1000 answers in well under a second; these bound a dead or
# black-holed endpoint, and botocore's standard retry mode (3 attempts, backoff with jitter,
# throttling included) rides out a brief throttle. Worst case: about 3 x (5 + 20) s.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 20.0
ATTEMPTS = 3
# For the mtime lookup of a mount of named snapshots (one small answer).
QUICK_TIMEOUT_S = 3.0
VOLUME_ID_RE = re.compile(r"^vol-[0-9a-f]{8}([0-9a-f]{9})?$")
_SHORTHAND_RE = re.compile(r"^Name=(?P<name>[^,]+),Values=(?P<values>.*)$")


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    """What a catalogue keeps of one snapshot: enough to list it without any EBS call."""

    snapshot_id: str
    volume_id: str
    start_time: float  # seconds since the epoch, UTC
    size_bytes: int

    @property
    def start_datetime(self) -> datetime:
        return datetime.fromtimestamp(self.start_time, UTC)


@dataclass(frozen=True)
class SnapshotQuery:
    """A DescribeSnapshots query: the AWS CLI's --filters and --owner-ids, and volumes."""

    volume_ids: list[str] = field(default_factory=list)
    filters: list[tuple[str, list[str]]] = field(default_factory=list)
    owner_ids: list[str] = field(default_factory=list)

    def request(self) -> dict[str, Any]:
        """DescribeSnapshots parameters (without paging).

        Only completed snapshots are asked for unless the query names a status itself
        (pending and error snapshots cannot be read). Without --owner-ids a query by filters
        alone means the caller's own snapshots (`self`): EC2 would otherwise list every public
        snapshot it can see as well, which is never what a mount wants.
        """
        filters = [{"Name": name, "Values": values} for name, values in self.filters]
        if self.volume_ids:
            filters.append({"Name": "volume-id", "Values": list(self.volume_ids)})
        if not any(name == "status" for name, _ in self.filters):
            filters.append({"Name": "status", "Values": ["completed"]})
        request: dict[str, Any] = {"Filters": filters}
        if self.owner_ids:
            request["OwnerIds"] = list(self.owner_ids)
        elif not self.volume_ids:
            request["OwnerIds"] = ["self"]
        return request

    def describe(self) -> str:
        """The query in words, for log lines and refusals."""
        parts = [f"volume {v}" for v in self.volume_ids]
        parts += [f"{name}={','.join(values)}" for name, values in self.filters]
        if self.owner_ids:
            parts.append(f"owner {','.join(self.owner_ids)}")
        return "; ".join(parts) or "all snapshots"


def validate_volume_id(volume_id: str) -> str:
    if not VOLUME_ID_RE.match(volume_id):
        raise UsageError(
            f"{volume_id} is not a volume id (expected vol- and 8 or 17 hex digits, "
            "e.g. vol-0123456789abcdef0)"
        )
    return volume_id


def parse_filter(text: str) -> list[tuple[str, list[str]]]:
    """The AWS CLI's --filters value: `Name=N,Values=a,b` or JSON `[{"Name":..,"Values":[..]}]`."""
    text = text.strip()
    if text.startswith("["):
        try:
            doc = json.loads(text)
            return [(str(f["Name"]), [str(v) for v in f["Values"]]) for f in doc]
        except (ValueError, KeyError, TypeError):
            raise UsageError(
                f"--filters {text!r}: not a JSON list of {{Name, Values}} objects"
            ) from None
    match = _SHORTHAND_RE.match(text)
    values = [v for v in match.group("values").split(",") if v] if match else []
    if match is None or not values:
        raise UsageError(
            f"--filters {text!r}: expected Name=NAME,Values=V1,V2 "
            "(e.g. Name=tag:Backup,Values=daily)"
        )
    return [(match.group("name"), values)]


def ec2_client(region: str | None, profile: str | None, *, quick: bool = False) -> Any:
    """boto3's EC2 client with bounded timeouts; AWS_ENDPOINT_URL_EC2 is honoured by boto3.

    `quick`: one attempt with short timeouts, for a nicety (an image's mtime) that must not
    hold up a mount where EC2 is not reachable.
    """
    import boto3
    import botocore.config

    if region is None and os.environ.get("AWS_ENDPOINT_URL_EC2"):
        region = os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    session = boto3.session.Session(profile_name=profile, region_name=region)
    config = botocore.config.Config(
        connect_timeout=QUICK_TIMEOUT_S if quick else CONNECT_TIMEOUT_S,
        read_timeout=QUICK_TIMEOUT_S if quick else READ_TIMEOUT_S,
        retries={"mode": "standard", "total_max_attempts": 1 if quick else ATTEMPTS},
    )
    return session.client("ec2", config=config)


def _record(item: dict[str, Any]) -> SnapshotRecord | None:
    """A record of a completed snapshot, or None for any other state."""
    if item.get("State") != "completed":
        return None
    start = item["StartTime"]
    return SnapshotRecord(
        snapshot_id=item["SnapshotId"],
        volume_id=item.get("VolumeId") or "vol-ffffffff",
        start_time=start.timestamp(),
        size_bytes=int(item["VolumeSize"]) * GIB,
    )


def list_snapshots(client: Any, query: SnapshotQuery) -> Iterator[SnapshotRecord]:
    """Every completed snapshot `query` matches, page by page; EbsfuseError on failure."""
    request = query.request()
    token = None
    while True:
        page_request = dict(request, MaxResults=PAGE_SIZE)
        if token:
            page_request["NextToken"] = token
        page = _call(client, page_request)
        for item in page.get("Snapshots", []):
            record = _record(item)
            if record is not None:
                yield record
        token = page.get("NextToken")
        if not token:
            return


def start_times(client: Any, snapshot_ids: list[str]) -> dict[str, datetime]:
    """StartTime of each of `snapshot_ids` that EC2 knows; EbsfuseError on failure."""
    page = _call(client, {"SnapshotIds": list(snapshot_ids)})
    return {s["SnapshotId"]: s["StartTime"] for s in page.get("Snapshots", [])}


def _call(client: Any, request: dict[str, Any]) -> dict[str, Any]:
    import botocore.exceptions

    try:
        answer: dict[str, Any] = client.describe_snapshots(**request)
        return answer
    except botocore.exceptions.ClientError as error:
        raise describe_error(error.response.get("Error", {})) from None
    except botocore.exceptions.NoCredentialsError:
        raise EbsfuseError(
            "EC2 DescribeSnapshots: no AWS credentials found (configure a profile, "
            "environment variables or an instance role)"
        ) from None
    except botocore.exceptions.BotoCoreError as error:
        raise EbsfuseError(f"EC2 DescribeSnapshots failed: {error}") from None


def describe_error(error: dict[str, Any]) -> EbsfuseError:
    """One line for an EC2 error answer, saying what to do where something can be done."""
    code = str(error.get("Code", "error"))
    message = " ".join(str(error.get("Message", "")).split())[:300]
    if code in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException"):
        hint = "the caller needs the IAM permission ec2:DescribeSnapshots"
        return EbsfuseError(f"EC2 DescribeSnapshots: {code}: {hint} ({message})")
    if code.startswith("Invalid") or code == "UnknownParameter":
        return UsageError(f"EC2 DescribeSnapshots refused the query: {code}: {message}")
    return EbsfuseError(f"EC2 DescribeSnapshots failed: {code}: {message}")
