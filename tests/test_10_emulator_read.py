"""Emulator conformance: ListSnapshotBlocks, GetSnapshotBlock, ListChangedBlocks, tokens."""

from __future__ import annotations

import re
from typing import Any

import pytest
from botocore.exceptions import ClientError

from ebsfuse.emulator import Emulator
from tests import emulator_fixtures as fx
from tests.emulator_fixtures import (
    BLOCK,
    changed_all,
    content,
    error_of,
    list_all,
    make_client,
    read,
    upload,
)

emulator, client, tmp_dir = fx.emulator, fx.client, fx.tmp_dir  # fixtures

TOKEN = re.compile(r"^[A-Za-z0-9+/=]{1,256}$")


def test_list_pages(emulator: Emulator, client: Any) -> None:
    sid = emulator.create_synthetic("size=1,pattern=every:3,seed=4")  # 683 blocks
    expected = list(range(0, 2048, 3))
    pages = []
    args: dict[str, Any] = {"SnapshotId": sid, "MaxResults": 300}
    while True:
        page = client.list_snapshot_blocks(**args)
        pages.append(page)
        assert page["VolumeSize"] == 1
        assert page["BlockSize"] == BLOCK
        assert page["ExpiryTime"].year >= 2024
        if "NextToken" not in page:
            break
        assert TOKEN.match(page["NextToken"])
        args["NextToken"] = page["NextToken"]
    assert [len(p["Blocks"]) for p in pages] == [300, 300, 83]
    indexes = [b["BlockIndex"] for p in pages for b in p["Blocks"]]
    assert indexes == expected  # unique and ascending
    assert all(TOKEN.match(b["BlockToken"]) for p in pages for b in p["Blocks"])
    # The default page is 10000: one page, no NextToken.
    page = client.list_snapshot_blocks(SnapshotId=sid)
    assert len(page["Blocks"]) == 683 and "NextToken" not in page
    # Exactly MaxResults blocks left: no trailing empty page.
    exact = emulator.create_synthetic("size=1,pattern=first:200")
    page = client.list_snapshot_blocks(SnapshotId=exact, MaxResults=200)
    assert len(page["Blocks"]) == 200 and "NextToken" not in page


def test_starting_block_index_and_next_token_precedence(emulator: Emulator, client: Any) -> None:
    sid = emulator.create_synthetic("size=1,pattern=every:3")
    page = client.list_snapshot_blocks(SnapshotId=sid, StartingBlockIndex=1000, MaxResults=100)
    assert page["Blocks"][0]["BlockIndex"] == 1002
    assert [b["BlockIndex"] for b in page["Blocks"]] == list(range(1002, 1002 + 300, 3))
    nxt = client.list_snapshot_blocks(
        SnapshotId=sid, NextToken=page["NextToken"], StartingBlockIndex=0, MaxResults=100
    )
    assert nxt["Blocks"][0]["BlockIndex"] == 1302  # NextToken wins over StartingBlockIndex
    past = client.list_snapshot_blocks(SnapshotId=sid, StartingBlockIndex=5000)
    assert past["Blocks"] == [] and "NextToken" not in past


def test_page_token_errors(emulator: Emulator, client: Any) -> None:
    sid = emulator.create_synthetic("size=1,pattern=all")
    other = emulator.create_synthetic("size=1,pattern=all,seed=1")
    token = client.list_snapshot_blocks(SnapshotId=sid, MaxResults=100)["NextToken"]
    for bad_sid, bad_token in [
        (sid, "garbage"),
        (sid, "QUJD"),
        (sid, token[:-4] + "AAAA"),
        (other, token),  # another snapshot's token
    ]:
        with pytest.raises(ClientError) as exc:
            client.list_snapshot_blocks(SnapshotId=bad_sid, NextToken=bad_token)
        assert error_of(exc) == ("ValidationException", "INVALID_PAGE_TOKEN", 400)
    with pytest.raises(ClientError) as exc:  # a ListSnapshotBlocks token is no changed-blocks one
        client.list_changed_blocks(SecondSnapshotId=sid, NextToken=token)
    assert error_of(exc) == ("ValidationException", "INVALID_PAGE_TOKEN", 400)
    emulator.advance_clock(3599)
    client.list_snapshot_blocks(SnapshotId=sid, NextToken=token)
    emulator.advance_clock(2)  # page tokens last 60 minutes
    with pytest.raises(ClientError) as exc:
        client.list_snapshot_blocks(SnapshotId=sid, NextToken=token)
    assert error_of(exc) == ("ValidationException", "INVALID_PAGE_TOKEN", 400)


def test_page_token_ttl_setting(emulator: Emulator, client: Any) -> None:
    emulator.set_faults(page_token_ttl=5)
    sid = emulator.create_synthetic("size=1,pattern=all")
    token = client.list_snapshot_blocks(SnapshotId=sid, MaxResults=100)["NextToken"]
    emulator.advance_clock(6)
    with pytest.raises(ClientError) as exc:
        client.list_snapshot_blocks(SnapshotId=sid, NextToken=token)
    assert error_of(exc)[1] == "INVALID_PAGE_TOKEN"


def test_get_block(emulator: Emulator, client: Any) -> None:
    sid = emulator.create_snapshot(blocks={0: content(1), 1500: content(2)})
    tokens = list_all(client, sid)
    resp = client.get_snapshot_block(SnapshotId=sid, BlockIndex=1500, BlockToken=tokens[1500])
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert resp["DataLength"] == BLOCK
    assert resp["ChecksumAlgorithm"] == "SHA256"
    assert resp["BlockData"].read() == content(2)
    assert read(client, sid, 0, tokens[0]) == content(1)


def test_block_token_binding(emulator: Emulator, client: Any) -> None:
    a = emulator.create_snapshot(blocks={0: content(1), 1: content(2)})
    b = emulator.create_snapshot(blocks={0: content(1), 1: content(2)})
    ta, tb = list_all(client, a), list_all(client, b)
    bad = [
        (a, 0, ta[1]),  # another index
        (a, 0, tb[0]),  # another snapshot
        (a, 0, "AAAA"),
        (a, 0, ta[0][:-2] + ("AA" if not ta[0].endswith("AA") else "BB")),
        (a, 5, ta[0]),  # a block that was never written
    ]
    for sid, index, token in bad:
        with pytest.raises(ClientError) as exc:
            client.get_snapshot_block(SnapshotId=sid, BlockIndex=index, BlockToken=token)
        assert error_of(exc) == ("ValidationException", "INVALID_BLOCK_TOKEN", 400)
    with pytest.raises(ClientError) as exc:
        client.get_snapshot_block(SnapshotId=a, BlockIndex=4096, BlockToken=ta[0])
    assert error_of(exc) == ("ValidationException", "INVALID_BLOCK", 400)


def test_block_token_expiry_and_relisting(emulator: Emulator, client: Any) -> None:
    sid = emulator.create_snapshot(blocks={3: content(3)})
    first = client.list_snapshot_blocks(SnapshotId=sid)
    old = first["Blocks"][0]["BlockToken"]
    assert 6.99 * 86400 < (first["ExpiryTime"].timestamp() - emulator.clock.now()) <= 7 * 86400
    emulator.advance_clock(86400)
    new = list_all(client, sid)[3]
    assert new != old  # a new listing issues new tokens ...
    assert read(client, sid, 3, old) == content(3)  # ... and the old ones stay valid
    emulator.advance_clock(6 * 86400 + 1)  # past the first listing's ExpiryTime
    with pytest.raises(ClientError) as exc:
        read(client, sid, 3, old)
    assert error_of(exc) == ("ValidationException", "INVALID_BLOCK_TOKEN", 400)
    assert read(client, sid, 3, new) == content(3)


def test_short_token_ttl(emulator: Emulator, client: Any) -> None:
    emulator.set_faults(token_ttl=1)
    sid = emulator.create_snapshot(blocks={0: content(1)})
    page = client.list_snapshot_blocks(SnapshotId=sid)
    assert page["ExpiryTime"].timestamp() == pytest.approx(emulator.clock.now() + 1, abs=0.5)
    token = page["Blocks"][0]["BlockToken"]
    assert read(client, sid, 0, token) == content(1)
    emulator.advance_clock(1.01)
    with pytest.raises(ClientError) as exc:
        read(client, sid, 0, token)
    assert error_of(exc)[1] == "INVALID_BLOCK_TOKEN"


def test_tokens_survive_restart_with_data_dir(tmp_dir: Any) -> None:
    with Emulator(data_dir=str(tmp_dir)) as emu:
        sid = emu.create_snapshot(blocks={2: content(2)})
        token = list_all(make_client(emu.endpoint), sid)[2]
    with Emulator(data_dir=str(tmp_dir)) as emu:
        assert read(make_client(emu.endpoint), sid, 2, token) == content(2)


def test_reads_refused_until_completed(emulator: Emulator, client: Any) -> None:
    pending = client.start_snapshot(VolumeSize=1)["SnapshotId"]
    failed = emulator.create_snapshot(status="error", blocks={0: content(1)})
    for sid, status in [(pending, "pending"), (failed, "error")]:
        for call in (
            lambda s=sid: client.list_snapshot_blocks(SnapshotId=s),
            lambda s=sid: client.list_changed_blocks(SecondSnapshotId=s),
            lambda s=sid: client.get_snapshot_block(SnapshotId=s, BlockIndex=0, BlockToken="AAAA"),
        ):
            with pytest.raises(ClientError) as exc:
                call()
            assert error_of(exc)[0] == "ValidationException"
            assert status in exc.value.response["Error"]["Message"]


def test_child_token_reads_inherited_block(client: Any) -> None:
    parent = upload(client, {0: content(1), 1: content(2)})
    child = upload(client, {1: content(3)}, parent=parent)
    tokens = list_all(client, child)
    assert read(client, child, 0, tokens[0]) == content(1)
    with pytest.raises(ClientError):  # a child's token is bound to the child
        read(client, parent, 0, tokens[0])


# ListChangedBlocks ----------------------------------------------------------------------------


def _by_index(entries: list[Any]) -> dict[int, Any]:
    indexes = [e["BlockIndex"] for e in entries]
    assert indexes == sorted(set(indexes))
    return {e["BlockIndex"]: e for e in entries}


def test_changed_blocks_parent_child(client: Any) -> None:
    parent = upload(client, {0: content(1), 1: content(2), 2: content(3)})
    child = upload(
        client, {1: content(20), 2: content(3), 9: content(9)}, volume_size=2, parent=parent
    )
    changed = _by_index(changed_all(client, child, parent))
    assert sorted(changed) == [1, 9]  # 2 was rewritten with the same content
    assert "FirstBlockToken" in changed[1] and "SecondBlockToken" in changed[1]
    assert "FirstBlockToken" not in changed[9]  # the parent lacks block 9
    assert read(client, parent, 1, changed[1]["FirstBlockToken"]) == content(2)
    assert read(client, child, 1, changed[1]["SecondBlockToken"]) == content(20)
    assert read(client, child, 9, changed[9]["SecondBlockToken"]) == content(9)
    page = client.list_changed_blocks(FirstSnapshotId=parent, SecondSnapshotId=child)
    assert page["VolumeSize"] == 2 and page["BlockSize"] == BLOCK and "ExpiryTime" in page
    # Reversed: the newer snapshot first; a block only the first has lacks SecondBlockToken.
    reverse = _by_index(changed_all(client, parent, child))
    assert sorted(reverse) == [1, 9]
    assert "SecondBlockToken" not in reverse[9] and "FirstBlockToken" in reverse[9]
    assert read(client, child, 9, reverse[9]["FirstBlockToken"]) == content(9)
    assert changed_all(client, child, child) == []


def test_changed_blocks_without_first(client: Any) -> None:
    parent = upload(client, {0: content(1), 4: content(2)})
    child = upload(client, {4: content(3), 5: content(4)}, parent=parent)
    changed = _by_index(changed_all(client, child))
    assert sorted(changed) == [0, 4, 5]  # every block of the second snapshot
    assert all("FirstBlockToken" not in e for e in changed.values())
    assert read(client, child, 0, changed[0]["SecondBlockToken"]) == content(1)


def test_changed_blocks_siblings_and_unrelated(emulator: Emulator, client: Any) -> None:
    root = upload(client, {0: content(1), 1: content(2)})
    left = upload(client, {1: content(10), 2: content(11)}, parent=root)
    right = upload(client, {1: content(10), 3: content(12)}, parent=root)
    changed = _by_index(changed_all(client, right, left))
    assert sorted(changed) == [2, 3]  # 1 holds the same content in both
    assert "SecondBlockToken" not in changed[2] and "FirstBlockToken" not in changed[3]
    stranger = upload(client, {0: content(1)})
    with pytest.raises(ClientError) as exc:
        client.list_changed_blocks(FirstSnapshotId=stranger, SecondSnapshotId=left)
    assert error_of(exc) == ("ValidationException", "UNRELATED_SNAPSHOTS", 400)
    with pytest.raises(ClientError) as exc:
        client.list_changed_blocks(FirstSnapshotId="snap-0123456789abcdef0", SecondSnapshotId=left)
    assert error_of(exc) == ("ResourceNotFoundException", "SNAPSHOT_NOT_FOUND", 404)
    pending = client.start_snapshot(VolumeSize=1, ParentSnapshotId=root)["SnapshotId"]
    with pytest.raises(ClientError) as exc:
        client.list_changed_blocks(FirstSnapshotId=pending, SecondSnapshotId=left)
    assert "pending" in exc.value.response["Error"]["Message"]


def test_changed_blocks_pagination(emulator: Emulator, client: Any) -> None:
    base = emulator.create_synthetic("size=2,pattern=all")
    child = emulator.create_snapshot(
        parent=base, blocks={i: content(i) for i in range(0, 4096, 16)}
    )  # 256 changed blocks over a 4096-block synthetic parent
    pages = []
    args: dict[str, Any] = {"FirstSnapshotId": base, "SecondSnapshotId": child, "MaxResults": 100}
    while True:
        page = client.list_changed_blocks(**args)
        pages.append([e["BlockIndex"] for e in page["ChangedBlocks"]])
        if "NextToken" not in page:
            break
        args["NextToken"] = page["NextToken"]
    assert [len(p) for p in pages] == [100, 100, 56]
    assert [i for p in pages for i in p] == list(range(0, 4096, 16))
    page = client.list_changed_blocks(
        FirstSnapshotId=base, SecondSnapshotId=child, StartingBlockIndex=4000
    )
    assert [e["BlockIndex"] for e in page["ChangedBlocks"]] == list(range(4000, 4096, 16))
    with pytest.raises(ClientError) as exc:
        client.list_changed_blocks(
            FirstSnapshotId=base, SecondSnapshotId=child, NextToken="bm9wZQ=="
        )
    assert error_of(exc)[1] == "INVALID_PAGE_TOKEN"
    everything = client.list_changed_blocks(SecondSnapshotId=child, MaxResults=10000)
    assert len(everything["ChangedBlocks"]) == 4096 and "NextToken" not in everything
