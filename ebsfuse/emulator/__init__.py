"""An offline server faithful to the EBS direct APIs, for tests and benchmarks.

boto3's unmodified `ebs` client talks to it through `endpoint_url=` (or the environment
variable AWS_ENDPOINT_URL_EBS) with any credentials. See `Emulator` for the Python API and
`python -m ebsfuse.emulator --help` for the command line.
"""

from .emulator import Emulator

__all__ = ["Emulator"]
