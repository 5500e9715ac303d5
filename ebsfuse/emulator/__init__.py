"""An offline server faithful to the EBS direct APIs, for tests and benchmarks.

boto3's unmodified `ebs` client talks to it through `endpoint_url=` (or the environment
variable AWS_ENDPOINT_URL_EBS) with any credentials. See `Emulator` for the Python API and
`python -m ebsfuse.emulator --help` for the command line.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .emulator import Emulator


def __getattr__(name: str) -> Any:
    # Loaded on first use, so `ebsfuse --help` and the mount command do not load the server.
    if name == "Emulator":
        from .emulator import Emulator

        return Emulator
    raise AttributeError(name)


__all__ = ["Emulator"]
