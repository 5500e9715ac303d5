"""Snapshot tools over the same client: download, upload, hash, diff, info, and their progress
display."""
