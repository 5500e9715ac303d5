"""The read path with no FUSE in it: the one block pipeline (`pipeline`) every command reads
through, block map (tokens), cache, single-flight reader with its retry budget, readahead, the
image (offsets to blocks), partitions and statistics. Testable
without a mount; imports only `ebsfuse.ebs`."""
