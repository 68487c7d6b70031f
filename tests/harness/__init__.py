"""Test harness: a real etcd, simulated Docker hosts on one machine, the busybox test image, the plugin process.

Everything here cleans up by process ID and by the names of what it made itself; nothing is found by a broad
name. Stdlib only, so any test layer may import it.
"""
