"""Command-line parsing of the snapshot tools (upload, download, diff, info).

Kept apart from cli.py so the tools grow without touching the mount's commands; `register`
adds their sub-commands to the main parser.
"""

from __future__ import annotations

import argparse
import json

from .cli import add_client_arguments, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("upload", help="upload a raw disk image as a new snapshot")
    up.add_argument("image", metavar="IMAGE")
    add_client_arguments(up)
    up.add_argument("--description", default="", help="snapshot description")
    up.add_argument("--workers", type=positive_int, default=64, help="parallel uploads (64)")
    up.add_argument("--json", action="store_true", help="print the result as JSON")
    up.set_defaults(func=cmd_upload)


def cmd_upload(args: argparse.Namespace) -> int:
    from .client import ClientSettings, EbsClient
    from .upload import upload_image

    client = EbsClient(
        ClientSettings(
            region=args.region,
            profile=args.profile,
            endpoint_url=args.endpoint_url,
            max_pool_connections=args.workers,
        )
    )
    result = upload_image(client, args.image, description=args.description, workers=args.workers)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(result.snapshot_id)
    return 0
