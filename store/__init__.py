"""The shared bottom for etcd: the one client and its watch stream, the watch loop, and the key schema."""
