"""How the client reaches the service: region, profile, endpoint, pool size and socket timeouts.

Shared by the boto3 client and the lean transport (`fastget`), which both build on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Connect fails fast (a loopback or VPC endpoint answers in milliseconds); a read may wait on
# a slow block but never forever: the service answers a 512 KiB block in tens of milliseconds,
# so 30 s means something is broken and the attempt is retried.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ClientSettings:
    region: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None
    max_pool_connections: int = 64
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    read_timeout_s: float = READ_TIMEOUT_S
    audit_log: str | None = None
    # Requests per second to this endpoint at most, for every request of the process (None:
    # only what throttling teaches; see ratelimit.py).
    max_rps: float | None = None


def signing_region(settings: ClientSettings, configured: str | None) -> str | None:
    """The region requests are signed for: the option, else the AWS configuration's, else
    `us-east-1` where a custom endpoint (an emulator) is given, which needs some region."""
    region = settings.region or configured
    endpoint_given = (
        settings.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_EBS")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    if region is None and endpoint_given:
        region = "us-east-1"
    return region
