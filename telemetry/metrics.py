"""Every Prometheus metric vxnet exports, declared once (prometheus-client), in the process-wide default
registry. Code that counts imports the object from here and calls .labels(...).inc() / .observe(); values that
are read from elsewhere when scraped (endpoints and peers per network, the nft drop counters, SAs and key age)
are collectors that plugin/metrics.py registers, and are named here too so this file is the list.

Labels carry bounded values only (method names, outcomes, kinds, short network IDs of this host's networks),
never endpoint IDs or addresses: each label value is a time series kept for the life of the process.
"""

from prometheus_client import Counter, Histogram, Info

NAMESPACE = "vxnet"

# Plugin calls as dockerd makes them: method is the libnetwork path's last part (CreateEndpoint, RequestAddress);
# outcome is "ok" or the error's kind (the wire/errors.py class name, or "internal").
PLUGIN_CALLS = Counter("plugin_calls", "Plugin API calls served, by method and outcome",
                       ["method", "outcome"], namespace=NAMESPACE)
# dockerd waits for each call; Join and CreateEndpoint are on the `docker run` path (milliseconds), and etcd
# round trips dominate, so buckets span 1 ms to 10 s.
PLUGIN_CALL_SECONDS = Histogram("plugin_call_seconds", "Time to answer a plugin API call", ["method"],
                                namespace=NAMESPACE,
                                buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))

# etcd requests (op: the v3 gateway method, kv/range, kv/txn, lease/keepalive...); errors: unreachable or refused.
ETCD_REQUESTS = Counter("etcd_requests", "etcd requests made", ["op"], namespace=NAMESPACE)
ETCD_ERRORS = Counter("etcd_errors", "etcd requests that failed (unreachable, or refused by etcd)", ["op"],
                      namespace=NAMESPACE)
ETCD_SECONDS = Histogram("etcd_request_seconds", "etcd request latency", ["op"], namespace=NAMESPACE,
                         buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))

# A watch that starts over from a full read (first start, compaction, broken stream, etcd outage).
WATCH_RESYNCS = Counter("watch_resyncs", "Full re-reads of a watched etcd prefix", ["watch"], namespace=NAMESPACE)

# Kernel state found different from the desired state and put back (kind: fdb, neighbour, link, anti-spoofing,
# isolation, sa, policy, ipsec-firewall, health...).
REPAIRS = Counter("repairs", "Kernel objects repaired by the reconciler, by kind", ["kind"], namespace=NAMESPACE)
RECONCILE_PASSES = Counter("reconcile_passes", "Reconciler passes, by trigger (event, periodic, start)",
                           ["trigger"], namespace=NAMESPACE)

BUILD_INFO = Info("build", "vxnet's version and the Python running it", namespace=NAMESPACE)

# Read when scraped (plugin/metrics.py collectors):
#   vxnet_endpoints{network}                 this host's endpoints per network
#   vxnet_peers{network}                     remote endpoints programmed per network
#   vxnet_dropped_packets_total{reason}      nft counters: isolation, anti-spoofing, cleartext
#   vxnet_ipsec_sas                          ESP SAs of ours in the kernel
#   vxnet_ipsec_key_age_seconds              age of the primary key
