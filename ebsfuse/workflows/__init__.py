"""Workflows that chain a private FUSE mount, a read-only loop device and a filesystem mount:
browse and restore."""
