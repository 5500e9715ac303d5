"""Self-validating block tokens and page tokens.

Nothing is stored per token: a listing of a 64 TiB volume hands out millions of them. A token
carries its own expiry and a truncated HMAC-SHA256 (keyed with a per-emulator secret) over
everything it is bound to, so checking one needs only the secret and the request:

- block token = base64(version | expiry in ms | MAC(snapshot id, block index, expiry))
- page token  = base64(version | kind | flags | next block index | expiry in ms | MAC(...))

A token presented for another snapshot or another block index fails the MAC exactly like a
forged or garbled one. Both encodings use the standard base64 alphabet, as the model's pattern
`^[A-Za-z0-9+/=]+$` requires, and stay far below its 256-character limit.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass

_VERSION = 1
# 15 MAC bytes make a block token exactly 24 bytes, i.e. 32 base64 characters with no
# padding; 120 bits is far more than an emulator's forgery resistance needs.
_BLOCK_MAC_LEN = 15
_BLOCK = struct.Struct(">BQ")  # version, expiry (ms since the epoch)
_BLOCK_LEN = _BLOCK.size + _BLOCK_MAC_LEN

_PAGE_MAC_LEN = 17  # brings the page token to 36 bytes, 48 characters, no padding
_PAGE = struct.Struct(">BcBQQ")  # version, kind, flags, next block index, expiry (ms)
_PAGE_LEN = _PAGE.size + _PAGE_MAC_LEN

KIND_SNAPSHOT_BLOCKS = b"L"
KIND_CHANGED_BLOCKS = b"C"

FLAG_EMPTY_NEXT = 1
"""Page-token flag: the page this token fetches is one of the injected empty pages."""


@dataclass(frozen=True)
class PageState:
    """What a valid page token says: where the next page starts and how it is served."""

    next_index: int
    flags: int


def new_secret() -> bytes:
    """A fresh random key; tokens of one emulator mean nothing to another."""
    return secrets.token_bytes(32)


class TokenCodec:
    """Issues and checks tokens with one secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, message: bytes, length: int) -> bytes:
        return hmac.digest(self._secret, message, hashlib.sha256)[:length]

    # Block tokens ---------------------------------------------------------------------------

    def block_token(self, snapshot_id: str, index: int, expiry: float) -> str:
        """The token that lets `GetSnapshotBlock(snapshot_id, index)` succeed until `expiry`."""
        head = _BLOCK.pack(_VERSION, int(expiry * 1000))
        message = b"B" + head + index.to_bytes(8, "big") + snapshot_id.encode()
        mac = self._mac(message, _BLOCK_MAC_LEN)
        return base64.b64encode(head + mac).decode("ascii")

    def block_tokens(self, snapshot_id: str, indexes: list[int], expiry: float) -> list[str]:
        """Tokens for many blocks of one snapshot sharing one expiry (one listing page)."""
        head = _BLOCK.pack(_VERSION, int(expiry * 1000))
        prefix = b"B" + head
        suffix = snapshot_id.encode()
        secret = self._secret
        digest = hmac.digest
        b64 = base64.b64encode
        out = []
        for index in indexes:
            mac = digest(secret, prefix + index.to_bytes(8, "big") + suffix, "sha256")
            out.append(b64(head + mac[:_BLOCK_MAC_LEN]).decode("ascii"))
        return out

    def check_block_token(self, token: str, snapshot_id: str, index: int, now: float) -> bool:
        """True when `token` was issued for this snapshot and block and has not expired."""
        raw = _decode(token, _BLOCK_LEN)
        if raw is None:
            return False
        head, mac = raw[: _BLOCK.size], raw[_BLOCK.size :]
        version, expiry_ms = _BLOCK.unpack(head)
        if version != _VERSION:
            return False
        message = b"B" + head + index.to_bytes(8, "big") + snapshot_id.encode()
        if not hmac.compare_digest(mac, self._mac(message, _BLOCK_MAC_LEN)):
            return False
        return now * 1000 < expiry_ms

    # Page tokens ----------------------------------------------------------------------------

    def page_token(
        self, kind: bytes, scope: str, next_index: int, flags: int, expiry: float
    ) -> str:
        """A NextToken resuming a listing at `next_index`; `scope` names the snapshot(s)."""
        head = _PAGE.pack(_VERSION, kind, flags, next_index, int(expiry * 1000))
        mac = self._mac(b"P" + head + scope.encode(), _PAGE_MAC_LEN)
        return base64.b64encode(head + mac).decode("ascii")

    def read_page_token(self, token: str, kind: bytes, scope: str, now: float) -> PageState | None:
        """The state a page token carries, or None when it is garbled, foreign or expired."""
        raw = _decode(token, _PAGE_LEN)
        if raw is None:
            return None
        head, mac = raw[: _PAGE.size], raw[_PAGE.size :]
        version, got_kind, flags, next_index, expiry_ms = _PAGE.unpack(head)
        if version != _VERSION or got_kind != kind:
            return None
        if not hmac.compare_digest(mac, self._mac(b"P" + head + scope.encode(), _PAGE_MAC_LEN)):
            return None
        if now * 1000 >= expiry_ms:
            return None
        return PageState(next_index=next_index, flags=flags)


def _decode(token: str, length: int) -> bytes | None:
    """Strict base64 decoding to exactly `length` bytes, None for anything else."""
    if len(token) > 256:
        return None
    try:
        raw = base64.b64decode(token.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None
    return raw if len(raw) == length else None
