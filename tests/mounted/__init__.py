"""Through the kernel and real processes: FUSE mounts, the drekifs command, peer daemons, nsd,
network namespaces."""
