"""Listing pages as evidence (`ebsfuse.ebs.pages`), without a server: only a complete, well-formed
page becomes a `BlockPage`; anything else raises a retryable error and teaches nothing."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import botocore.exceptions
import pytest

from ebsfuse import BLOCK_SIZE
from ebsfuse.ebs.client import translate
from ebsfuse.ebs.errors import EbsError
from ebsfuse.ebs.pages import MAX_VOLUME_GIB, block_page, changed_page

SID = "snap-0123456789abcdef0"


def good(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "Blocks": [{"BlockIndex": 7, "BlockToken": "AAA="}, {"BlockIndex": 3, "BlockToken": "B"}],
        "ExpiryTime": 1767225600.5,
        "VolumeSize": 1,
        "BlockSize": BLOCK_SIZE,
        "NextToken": "next",
    }
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not ...}


def refused(doc: object, **kwargs: Any) -> EbsError:
    with pytest.raises(EbsError) as info:
        block_page(doc, snapshot_id=SID, start_index=3, **kwargs)
    error = info.value
    assert error.snapshot_id == SID and error.block_index == 3
    assert "\n" not in str(error)
    return error


def test_a_good_page_is_taken_sorted_with_its_expiry() -> None:
    page = block_page(good(), snapshot_id=SID, volume_size_gib=1)
    assert page.blocks == [(3, "B"), (7, "AAA=")]
    assert page.next_token == "next" and page.volume_size_gib == 1
    assert page.expiry == datetime.fromtimestamp(1767225600.5, UTC)
    iso = block_page(good(ExpiryTime="2026-12-08T10:00:00Z"), snapshot_id=SID)
    assert iso.expiry == datetime(2026, 12, 8, 10, tzinfo=UTC)
    # moto sends no ExpiryTime and the index as text: both still describe the blocks exactly.
    moto = block_page(
        good(ExpiryTime=..., Blocks=[{"BlockIndex": "12", "BlockToken": "t"}]), snapshot_id=SID
    )
    assert moto.blocks == [(12, "t")] and moto.expiry is None
    last = block_page(good(NextToken=...), snapshot_id=SID)
    assert last.next_token is None


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ({}, "VolumeSize is missing"),  # what botocore makes of a cut or foreign body
        ([], "not a JSON object"),
        ("<html>", "not a JSON object"),
        (good(VolumeSize="1"), "VolumeSize is '1'"),
        (good(VolumeSize=True), "VolumeSize is True"),
        (good(BlockSize=...), "BlockSize is missing"),
        (good(Blocks={"BlockIndex": 1}), "not a list of entries"),
        (good(Blocks=[7]), "not a list of entries"),
        (good(Blocks=[{"BlockIndex": 2}]), "BlockToken is missing"),
        (good(Blocks=[{"BlockIndex": 2, "BlockToken": ""}]), "BlockToken is ''"),
        (good(Blocks=[{"BlockIndex": 2, "BlockToken": 5}]), "BlockToken is 5"),
        (good(Blocks=[{"BlockIndex": "x", "BlockToken": "t"}]), "BlockIndex is 'x'"),
        (good(Blocks=[{"BlockIndex": -1, "BlockToken": "t"}]), "outside the volume"),
        (good(Blocks=[{"BlockIndex": 2048, "BlockToken": "t"}]), "outside the volume"),
        (good(Blocks=[{"BlockIndex": 2.0, "BlockToken": "t"}]), "BlockIndex is 2.0"),
        (good(Blocks=[{"BlockIndex": 4, "BlockToken": t} for t in "tu"]), "listed twice"),
        (good(ExpiryTime="soon"), "ExpiryTime is 'soon'"),
        (good(ExpiryTime=float("nan")), "ExpiryTime is nan"),
        (good(NextToken=17), "NextToken is 17"),
    ],
)  # fmt: skip
def test_anything_else_is_a_retryable_malformed_listing(doc: object, words: str) -> None:
    error = refused(doc)
    assert (error.code, error.retryable) == ("MalformedListing", True)
    assert words in error.message


def test_volume_size_must_be_the_mounts_and_within_ebs_limits() -> None:
    error = refused(good(VolumeSize=2), volume_size_gib=1)
    assert (error.code, error.retryable) == ("MalformedListing", True)
    for gib in (0, -5, MAX_VOLUME_GIB + 1, 2**60):
        error = refused(good(VolumeSize=gib))
        assert (error.code, error.retryable) == ("InvalidVolumeSize", False)
    assert block_page(good(VolumeSize=MAX_VOLUME_GIB), snapshot_id=SID).volume_size_gib == 65536
    error = refused(good(BlockSize=4096))
    assert (error.code, error.retryable) == ("UnsupportedBlockSize", False)


def test_changed_pages() -> None:
    doc = {
        "ChangedBlocks": [
            {"BlockIndex": 9, "FirstBlockToken": "f"},
            {"BlockIndex": 4000, "SecondBlockToken": "s"},  # past the second's 1 GiB: allowed
            {"BlockIndex": 2, "FirstBlockToken": "f2", "SecondBlockToken": None},
        ],
        "VolumeSize": 1,
        "BlockSize": BLOCK_SIZE,
    }
    page = changed_page(doc, snapshot_id=SID)
    changed = [c for _, c in page.blocks]
    assert [i for i, _ in page.blocks] == [c.index for c in changed] == [2, 9, 4000]
    assert (changed[1].first_token, changed[1].second_token) == ("f", None)
    assert (changed[2].first_token, changed[2].second_token) == (None, "s")
    doc["ChangedBlocks"] = [{"BlockIndex": 1}]
    with pytest.raises(EbsError, match="neither token"):
        changed_page(doc, snapshot_id=SID)
    with pytest.raises(EbsError, match="VolumeSize is missing"):
        changed_page({"ChangedBlocks": []}, snapshot_id=SID)


def client_error(status: int, code: str | None, message: str = "") -> EbsError:
    response: dict[str, Any] = {
        "Error": {"Code": code or str(status), "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return translate(botocore.exceptions.ClientError(response, "GetSnapshotBlock"))


def test_bare_429_and_untyped_503_are_throttling() -> None:
    for status, code in ((429, None), (429, "TooManyRequests"), (503, None), (503, "SlowDown")):
        error = client_error(status, code)
        assert (error.retryable, error.throttled) == (True, True), (status, code)
    typed = client_error(503, "ServiceUnavailableException")
    assert (typed.retryable, typed.throttled) == (True, False)
    assert (client_error(502, None).retryable, client_error(502, None).throttled) == (True, False)


def test_error_messages_are_one_short_line() -> None:
    page = "<html>\n<body>\n" + "x" * 5000 + "\n</body></html>"
    error = client_error(500, "InternalServerException", page)
    text = str(error)
    assert "\n" not in text and len(text) < 400
    assert EbsError("a\r\nb\tc").message == "a b c"
