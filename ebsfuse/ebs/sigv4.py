"""AWS Signature Version 4 for bodiless requests, with the signing key cached.

The block fetch path signs about a thousand GETs a second. botocore's `SigV4Auth` rebuilds
the whole HMAC chain (four HMACs) and a case-insensitive header map for every request; here the
derived signing key depends only on (secret key, date, region, service), so it is computed once
per UTC day and credential set, and each request costs one SHA-256 of the canonical request plus
one HMAC: a few microseconds.

What is signed matches botocore's `SigV4Auth` for the same request (the tests compare the two
signatures for a fixed timestamp): the signed headers are `host`, `x-amz-date` and, with
temporary credentials, `x-amz-security-token`; the payload hash is that of the empty body; the
canonical URI is the request path percent-encoded once more (everything but `/` and `~`), as
botocore does for every service but S3; query keys and values are percent-encoded with only
unreserved characters left bare, so a block token's `+`, `/` and `=` become `%2B`, `%2F`, `%3D`.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from typing import NamedTuple, Protocol
from urllib.parse import quote, urlsplit

ALGORITHM = "AWS4-HMAC-SHA256"
# SHA-256 of the empty string: the payload hash of a request without a body.
EMPTY_PAYLOAD_SHA256 = hashlib.sha256(b"").hexdigest()
# RFC 3986 unreserved characters (besides letters and digits) stay bare in SigV4 encoding.
UNRESERVED = "-_.~"
_DEFAULT_PORTS = {"http": 80, "https": 443}


class Credentials(Protocol):
    """What signing needs; botocore's `ReadOnlyCredentials` (frozen credentials) fits."""

    @property
    def access_key(self) -> str: ...

    @property
    def secret_key(self) -> str: ...

    @property
    def token(self) -> str | None: ...


class StaticCredentials(NamedTuple):
    """A plain set of credentials, for tests and callers without botocore objects."""

    access_key: str
    secret_key: str
    token: str | None = None


def encode_query_value(value: str) -> str:
    """Percent-encode a query key or value the way SigV4 (and botocore) expects."""
    return quote(value, safe=UNRESERVED)


def host_header(url: str) -> str:
    """The Host value botocore signs for `url`: no default port, IPv6 in brackets."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None and parts.port != _DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{parts.port}"
    return host


def amz_date(now: float | None = None) -> str:
    """The `x-amz-date` timestamp (basic ISO 8601, UTC) for `now` (default: the clock)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))


class Signer:
    """Signs GET requests for one region and service; thread-safe.

    `headers()` returns the headers to add to the request, Authorization included.
    """

    # Keys of at most this many (secret, day) pairs are kept: today's and yesterday's for a
    # request signed across midnight, times a rotation of credentials. Tiny on purpose.
    _MAX_KEYS = 8

    def __init__(self, region: str, service: str) -> None:
        self.region = region
        self.service = service
        self._scope_tail = f"{region}/{service}/aws4_request"
        self._keys: dict[tuple[str, str], bytes] = {}
        self._lock = threading.Lock()

    def signing_key(self, secret_key: str, day: str) -> bytes:
        """kSigning = HMAC chain over day, region, service, "aws4_request"; cached."""
        cache_key = (secret_key, day)
        key = self._keys.get(cache_key)
        if key is not None:
            return key
        key = f"AWS4{secret_key}".encode()
        for part in (day, self.region, self.service, "aws4_request"):
            key = hmac.digest(key, part.encode(), "sha256")
        with self._lock:
            if len(self._keys) >= self._MAX_KEYS:
                self._keys.clear()
            self._keys[cache_key] = key
        return key

    def headers(
        self,
        credentials: Credentials,
        *,
        method: str,
        host: str,
        path: str,
        query: str,
        timestamp: str | None = None,
    ) -> list[tuple[str, str]]:
        """Headers that sign `method host path?query` (no body).

        `path` and `query` are exactly as they go on the request line (already encoded); the
        query holds `key=value` pairs joined by `&`. `timestamp` (x-amz-date format) is for tests.
        """
        stamp = timestamp or amz_date()
        day = stamp[:8]
        token = credentials.token
        # Canonical headers: lower-case names in byte order; the values here need no trimming.
        if token:
            canonical_headers = f"host:{host}\nx-amz-date:{stamp}\nx-amz-security-token:{token}\n"
            signed = "host;x-amz-date;x-amz-security-token"
        else:
            canonical_headers = f"host:{host}\nx-amz-date:{stamp}\n"
            signed = "host;x-amz-date"
        if "&" in query:
            query = "&".join(sorted(query.split("&"), key=lambda p: p.partition("=")[::2]))
        canonical_request = "\n".join(
            (
                method,
                quote(path, safe="/~"),
                query,
                canonical_headers,
                signed,
                EMPTY_PAYLOAD_SHA256,
            )
        )
        scope = f"{day}/{self._scope_tail}"
        string_to_sign = (
            f"{ALGORITHM}\n{stamp}\n{scope}\n"
            f"{hashlib.sha256(canonical_request.encode()).hexdigest()}"
        )
        signature = hmac.new(
            self.signing_key(credentials.secret_key, day), string_to_sign.encode(), "sha256"
        ).hexdigest()
        out = [
            ("X-Amz-Date", stamp),
            (
                "Authorization",
                f"{ALGORITHM} Credential={credentials.access_key}/{scope}, "
                f"SignedHeaders={signed}, Signature={signature}",
            ),
        ]
        if token:
            out.append(("X-Amz-Security-Token", token))
        return out
