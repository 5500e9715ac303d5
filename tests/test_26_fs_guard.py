"""No exception of any kind leaves a FUSE handler (`fuse.fs.guarded`), tested without a mount:
an unexpected one is EIO and one log line, a failed block EIO without a second line, and the
kernel's own errors pass through unchanged. Every handler of `SnapshotFS` is wrapped."""

from __future__ import annotations

import errno
import logging

import pyfuse3
import pytest
import trio

from ebsfuse.ebs.errors import EbsError
from ebsfuse.fuse.fs import SnapshotFS, guarded

HANDLERS = ("getattr", "lookup", "opendir", "readdir", "open", "read", "release", "statfs")


class Handlers:
    """Stand-ins that fail the ways a real handler can."""

    def __init__(self, failure: BaseException) -> None:
        self.failure = failure

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        raise self.failure


def errno_of(failure: BaseException) -> int:
    with pytest.raises(pyfuse3.FUSEError) as caught:
        trio.run(Handlers(failure).read, 1, 0, 4096)
    return caught.value.errno


def test_an_unexpected_exception_is_eio_and_one_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="ebsfuse.fuse.fs")
    assert errno_of(OverflowError("int too large to convert\nto C long")) == errno.EIO
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "read failed: OverflowError" in errors[0].getMessage()
    assert errors[0].exc_info is None  # the traceback only at debug level


def test_a_failed_block_is_eio_without_another_error_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="ebsfuse.fuse.fs")
    error = EbsError("boom", snapshot_id="snap-0123456789abcdef0", block_index=3, code="X")
    assert errno_of(error) == errno.EIO
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_the_kernels_own_errors_pass_through() -> None:
    assert errno_of(pyfuse3.FUSEError(errno.ENOENT)) == errno.ENOENT


@pytest.mark.parametrize("name", HANDLERS)
def test_every_handler_of_the_filesystem_is_guarded(name: str) -> None:
    assert getattr(getattr(SnapshotFS, name), "__wrapped__", None) is not None, name
