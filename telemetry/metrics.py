"""Every Prometheus metric vxnet exports, declared once (prometheus-client), in the process-wide default
registry. Code that counts imports the object from here and calls .labels(...).inc() / .observe(); values that
are read from elsewhere when scraped (endpoints and peers per network, the nft drop counters, SAs and key age)
are collectors that plugin/metrics.py registers, and are named here too so this file is the list.

Labels carry bounded values only (method names, outcomes, kinds, short network IDs of this host's networks),
never endpoint IDs or addresses: each label value is a time series kept for the life of the process.
"""

from prometheus_client import Counter, Gauge, Histogram, Info

NAMESPACE = "vxnet"

# Plugin calls as dockerd makes them: method is the call's path without its slash (NetworkDriver.CreateEndpoint,
# IpamDriver.RequestAddress: both drivers have a GetCapabilities); outcome is "ok" or the error's kind (the
# wire/errors.py class name, or "internal" for a crash). Unknown paths are not counted (an unbounded label).
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
# isolation, sa, policy (an IPsec policy), ipsec-firewall, network-policy (a network's policy table), health...).
REPAIRS = Counter("repairs", "Kernel objects repaired by the reconciler, by kind", ["kind"], namespace=NAMESPACE)
RECONCILE_PASSES = Counter("reconcile_passes", "Reconciler passes, by trigger (event, periodic, start)",
                           ["trigger"], namespace=NAMESPACE)

# Identities of this host's endpoints (plugin/endpoint_identity.py): the window from an endpoint's Join to its
# identity in its etcd record, during which rules selecting it by service, label or container do not apply (fail
# closed). It is the container's start after the Join (dockerd holds the container while it starts, and the
# inspect waits for that) plus an inspect and an etcd transaction: buckets from 10 ms to a minute.
IDENTITY_SECONDS = Histogram("identity_seconds", "Time from an endpoint's Join to its identity in etcd",
                             namespace=NAMESPACE, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
ENGINE_UP = Gauge("engine_connected", "1 while the Docker engine's event stream is followed (identities)",
                  namespace=NAMESPACE)

BUILD_INFO = Info("build", "vxnet's version and the Python running it", namespace=NAMESPACE)

# Read when scraped (plugin/metrics.py collectors): (name without the namespace, help). network is the first 12
# characters of the network ID (its namespace's name, vxnet-<them>); reason is one of DROP_REASONS.
ENDPOINTS = ("endpoints", "This host's endpoints (containers joined) per network")
PEERS = ("peers", "Remote endpoints in the peer table per network with a namespace on this host")
DROPPED_PACKETS = ("dropped_packets", "Packets dropped by vxnet's nftables rules (their counters), by reason")
DROPPED_BYTES = ("dropped_bytes", "Bytes dropped by vxnet's nftables rules (their counters), by reason")
IPSEC_SAS = ("ipsec_sas", "ESP security associations of vxnet's in the kernel (reqid 0x76786e01)")
IPSEC_KEY_AGE = ("ipsec_key_age_seconds", "Seconds since the primary ESP key became primary")
# isolation: between networks through the host (inet vxnet); anti-spoofing: a frame from a container with an
# address or MAC not its own (bridge vxnet in each network's namespace); cleartext: VXLAN of an encrypted network
# without IPsec (inet vxnet_ipsec); policy: a new connection to a local member that a network's policy does not
# allow (bridge vxnet_policy in its namespace; audit mode drops nothing and counts nothing here).
DROP_REASONS = ("isolation", "anti-spoofing", "cleartext", "policy")
