"""NBD: the network block device protocol, spoken from userspace (doc/proto.md of NetworkBlockDevice/nbd)."""
