"""The FUSE glue: filesystem operations over `core.image`, the daemon's life cycle and
readiness, kernel tuning and the mount table."""
