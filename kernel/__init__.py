"""The shared bottom for the kernel: the one netlink thread and namespace entry, links, FDB and neighbours,
nftables, XFRM, the libc calls Python lacks, every kernel object name, the namespace folder. Imports neither
etcd nor HTTP."""
