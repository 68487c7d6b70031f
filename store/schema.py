"""Every etcd key vxnet uses, and the only code that builds one.

The tree, under PREFIX (`/vxnet/v1`; VXNET_KEY_PREFIX in plugin/config.py may move it, the tree stays):

  schema                              {"major": M, "minor": m, "written_by": "0.2.0"}: the layout of this tree
                                      (store/compat.py). Written by the first plugin (create-if-absent), minor
                                      raised by newer plugins of the same major; a plugin refuses a major newer
                                      than its SCHEMA_MAJOR. The prefix's "v1" is a name, not this number: a
                                      major that moves the tree elsewhere still writes its major here first, so
                                      that older plugins stop instead of serving an empty tree
  networks/<network>                  Network (netdriver/models.py): one docker network as this plugin knows it
  segments/<segment>                  {"vni": N, "encrypted": bool}: one overlay. Every network on a segment
                                      shares its VNI and its encryption
  vnis/<vni>                          segment name: the VNI allocation, taken by create-if-absent
  members/<segment>/<host>            {"network_id": ...}: hosts that have the overlay's namespace; the member
                                      SWARM_HOLDER holds a Swarm network's segment from AllocateNetwork to
                                      FreeNetwork
  endpoints/<network>/<endpoint>      Endpoint: written at CreateEndpoint, removed at DeleteEndpoint
  policy/<segment>/<rule>             Rule (netdriver/policy.py): one allow rule of the overlay segment (so in
                                      force on every host of `-o overlay=NAME`, whose network IDs differ), written
                                      by `vxnet policy allow` (create-if-absent: the same rule is the same key),
                                      removed by `vxnet policy rm` and, all of them, with the segment's last
                                      network record (in that transaction) and again when the segment is released
  peers/<segment>/<endpoint>          PeerRecord: written at Join under the host's lease, removed at Leave; what
                                      other hosts program (netdriver/watcher.py watches this prefix)
  services/<service>                  {"version": N, "ports": ["80/tcp", ...]}: the target ports a Swarm
                                      service publishes (every mode), written by the plugins on managers from
                                      the engine's services (netdriver/service_ports.py) and merged into its
                                      tasks' exposed ports on every host; removed with the service
  hosts/<host>                        {"vtep", "version", "name", "instance", "health"} under the host's lease:
                                      who is alive (netdriver/hosts.py); version is its plugin's (wire/
                                      version.py), name is for people, instance tells a restart from a copy,
                                      health is its address on the health overlay
  departed/<host>                     {"since": unix time, "name", "vtep"}: when a live plugin first saw
                                      hosts/<host> gone (create-if-absent); deleted when the host registers
                                      again, or once `vxnet gc` has collected what it held (netdriver/gc.py)
  health/<address>                    host ID, under the host's lease: its address on the health overlay that
                                      `vxnet doctor` probes (netdriver/health.py), taken by create-if-absent
  ipam/pools/<space>/<pool>           {"cidr", "space", "hosts": [holder, ...], "created"} (ipam_driver/store.py)
  ipam/addresses/<space>/<pool>/<address>
                                      {"address", "pool", "kind": "gateway"|"container", "hosts", "created"}
  encryption/keyring                  the ESP key ring, sealed with the cluster secret; the key's full name is
                                      the sealing's associated data (encrypt/keys.py)

The parts:
  <network>   a Docker network ID (64 hex digits) or a Swarm network ID (wire/protocol.py)
  <endpoint>  a Docker endpoint ID (64 hex digits)
  <rule>      a rule ID: 12 hex digits of a hash of the rule's content (netdriver/policy.py rule_id)
  <segment>   the network ID, or `overlay-<NAME>` for networks made with `-o overlay=NAME`
  <vni>       a VXLAN network identifier in decimal
  <service>   a Swarm service ID (25 lowercase letters and digits, as wire/protocol.py SWARM_ID)
  <host>      a host ID (plugin/identity.py: letters, digits, '.', '_', '-'), or SWARM_HOLDER
  <space>     an IPAM address space: vxnet-local or vxnet-global
  <pool>      the pool's CIDR with '/' written '_' (10.1.0.0_24, fd00:1::_64): a part holds no slash
  <address>   an IPv4 address in dotted quad (of a pool, or of the health overlay's subnet), or an IPv6 address
              of a pool in the canonical form ipaddress writes (RFC 5952: fd00:1::5), never the user's text,
              so that one address has one key (ipam_driver/pools.py)

Every part passes through `_part` before it reaches a key: never a slash, a NUL, "." or "..", so no value can
reach into another part of the tree ("../../etc/passwd" as an endpoint ID would be three parts, read back as
another network's). The decoders check values first; this is the backstop before etcd.
"""

import re
from typing import Dict, Optional, Tuple

from wire.errors import InvalidRequest

PREFIX = "/vxnet/v1"

# A member and IPAM holder name no host can have (host IDs never start with '@', plugin/identity.py): the Swarm
# manager's hold on a network's segment, and the Swarm allocator's holds on pools and addresses.
SWARM_HOLDER = "@swarm"

# The layout of the tree, in its schema record (store/compat.py). MAJOR: a change older plugins cannot read
# (a key moved, a value's meaning changed); MINOR: additions older plugins ignore. 1.0: every store before the
# record existed (it reads as 1.0); 1.1: the record itself, and the plugin's version in hosts/<host>.
SCHEMA_MAJOR = 1
SCHEMA_MINOR = 1

# The tree, as listed above and in the README's "Looking inside" (tests/unit/test_schema.py compares the three).
SCHEMA_RECORD = "schema"
NETWORK = "networks/<network>"
SEGMENT = "segments/<segment>"
VNI = "vnis/<vni>"
MEMBER = "members/<segment>/<host>"
ENDPOINT = "endpoints/<network>/<endpoint>"
POLICY = "policy/<segment>/<rule>"
PEER = "peers/<segment>/<endpoint>"
SERVICE = "services/<service>"
HOST = "hosts/<host>"
DEPARTED = "departed/<host>"
HEALTH = "health/<address>"
POOL = "ipam/pools/<space>/<pool>"
ADDRESS = "ipam/addresses/<space>/<pool>/<address>"
KEYRING = "encryption/keyring"
TEMPLATES = (SCHEMA_RECORD, NETWORK, SEGMENT, VNI, MEMBER, ENDPOINT, POLICY, PEER, SERVICE, HOST, DEPARTED, HEALTH,
             POOL, ADDRESS, KEYRING)

_KEY_PART = re.compile(r"[A-Za-z0-9@_.:-]+")
_PLACEHOLDER = re.compile(r"<([a-z]+)>")


def _part(prefix: str, value) -> str:
    if not isinstance(value, str) or not _KEY_PART.fullmatch(value) or value in (".", ".."):
        raise InvalidRequest(f"etcd key under {prefix}: {value!r} cannot be a key part")
    return value


def pool_part(cidr) -> str:
    """A pool's CIDR as a key part: 10.1.0.0/24 -> 10.1.0.0_24."""
    return str(cidr).replace("/", "_")


class Schema:
    """The keys of one tree (prefix: PREFIX unless the settings move it). Full keys for get/put/commit, and
    prefixes (ending in "/") for get_prefix, watch and range compares."""

    def __init__(self, prefix: str = PREFIX):
        self.root = prefix.rstrip("/") + "/"

    def __repr__(self) -> str:
        return f"Schema({self.root})"

    def _fill(self, template: str, parts: Dict[str, str], whole: bool) -> str:
        """template with its placeholders filled from parts, in order. whole: every placeholder must be given
        (a key); otherwise the key's prefix up to the first placeholder not given (a range)."""
        out = self.root
        for i, segment in enumerate(template.split("/")):
            name = _PLACEHOLDER.fullmatch(segment)
            if name is None:
                out += segment + "/"
                continue
            if name.group(1) not in parts:
                if whole:
                    raise TypeError(f"{template}: no value for <{name.group(1)}>")
                return out
            out += _part(self.root, parts.pop(name.group(1))) + "/"
        if parts:
            raise TypeError(f"{template} has no {', '.join(parts)}")
        return out if not whole else out[:-1]

    def key(self, template: str, **parts: str) -> str:
        return self._fill(template, parts, whole=True)

    def prefix(self, template: str, **parts: str) -> str:
        """The range of every key of template that starts with the parts given (leading parts only)."""
        return self._fill(template, parts, whole=False)

    def parse(self, template: str, key: str) -> Optional[Dict[str, str]]:
        """A key of template -> its parts by name; None for a key of any other shape."""
        if not key.startswith(self.root):
            return None
        names, found = template.split("/"), key[len(self.root):].split("/")
        if len(names) != len(found):
            return None
        parts = {}
        for name, value in zip(names, found):
            placeholder = _PLACEHOLDER.fullmatch(name)
            if placeholder is None:
                if name != value:
                    return None
            else:
                parts[placeholder.group(1)] = value
        return parts

    # -- the layout of the tree (store/compat.py) -------------------------------------------------------------
    def schema_record(self) -> str:
        return self.key(SCHEMA_RECORD)

    # -- the network driver (netdriver/store.py) ---------------------------------------------------------------
    def network(self, network: str) -> str:
        return self.key(NETWORK, network=network)

    def segment(self, segment: str) -> str:
        return self.key(SEGMENT, segment=segment)

    def vni(self, vni: int) -> str:
        return self.key(VNI, vni=str(int(vni)))

    def member(self, segment: str, host: str) -> str:
        return self.key(MEMBER, segment=segment, host=host)

    def endpoint(self, network: str, endpoint: str) -> str:
        return self.key(ENDPOINT, network=network, endpoint=endpoint)

    # -- policy rules (netdriver/policy_store.py) ------------------------------------------------------------------
    def policy_rule(self, segment: str, rule: str) -> str:
        return self.key(POLICY, segment=segment, rule=rule)

    def policy_rules(self, segment: str) -> str:
        """The range of one segment's rules."""
        return self.prefix(POLICY, segment=segment)

    def policy_rule_of(self, key: str) -> Optional[Tuple[str, str]]:
        """policy/<segment>/<rule> -> (segment, rule), None for anything else."""
        parts = self.parse(POLICY, key)
        return (parts["segment"], parts["rule"]) if parts else None

    def peer(self, segment: str, endpoint: str) -> str:
        return self.key(PEER, segment=segment, endpoint=endpoint)

    # -- the ports of Swarm services (netdriver/service_ports.py) -------------------------------------------------
    def service(self, service: str) -> str:
        return self.key(SERVICE, service=service)

    def service_of(self, key: str) -> Optional[str]:
        """services/<service> -> the service ID, None for anything else."""
        parts = self.parse(SERVICE, key)
        return parts["service"] if parts else None

    def host(self, host: str) -> str:
        return self.key(HOST, host=host)

    def departed(self, host: str) -> str:
        return self.key(DEPARTED, host=host)

    # -- the health overlay (netdriver/health.py) -----------------------------------------------------------------
    def health(self, address: str) -> str:
        return self.key(HEALTH, address=address)

    # -- IPAM (ipam_driver/store.py) -----------------------------------------------------------------------------
    def pool(self, space: str, cidr) -> str:
        return self.key(POOL, space=space, pool=pool_part(cidr))

    def address(self, space: str, cidr, address) -> str:
        return self.key(ADDRESS, space=space, pool=pool_part(cidr), address=str(address))

    def addresses(self, space: str, cidr) -> str:
        return self.prefix(ADDRESS, space=space, pool=pool_part(cidr))

    # -- encryption (encrypt/keys.py) ----------------------------------------------------------------------------
    def keyring(self) -> str:
        return self.key(KEYRING)

    def peer_of(self, key: str) -> Optional[Tuple[str, str]]:
        """peers/<segment>/<endpoint> -> (segment, endpoint), None for anything else."""
        parts = self.parse(PEER, key)
        return (parts["segment"], parts["endpoint"]) if parts else None
