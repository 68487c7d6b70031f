"""The nftables applier the firewalls drive (Links.nft: `nft(ns, commands, what)`) as state: one namespace's
tables, each holding its sets' elements and its rules."""

import copy
import json

from wire.errors import KernelError

ENOENT = "Error: Could not process rule: No such file or directory"


class FakeNftables:
    """Applies a JSON batch as nftables does: all or nothing; `add` of what exists changes nothing; `delete` of a
    table that does not exist, anything in a missing table, elements of a missing set and removal of elements
    not in their set fail the whole batch (as ENOENT does in the kernel). `list table` answers in nft's JSON: its
    sets with their elements, then its rules, a rule's counter statements holding what `drop()` counted against
    it since its table was made. Raw integers in a `typeof` set's elements are listed as nftables 1.0.6 lists
    them: a JSON number up to 64 bits, above that a "0x..." string without leading zeros.

    `list table` with terse (libnftables' terse output, `nft -t`) leaves the sets' elements out; `list set` answers
    that one set with its elements; `list chain` that chain's rules; `list chains` every chain of the family (base
    chains with their hook and priority), of every table. A set is listed as declared (its type, and
    its timeout and size if it has them). `record` adds an element as the packet path's set updates do.

    `refuse`: a reason every batch fails with (a kernel without the feature); `calls`: (namespace, what) of each
    batch, to check which namespace it went to.
    """

    def __init__(self, refuse=None):
        self.tables = {}  # (family, name) -> {"sets": {set name: {element as sorted JSON}}, "rules": [rule]}
        self.hits = {}  # (family, table, rule comment) -> (packets, bytes): the kernel's counters
        self.calls = []
        self.refuse = refuse

    def __call__(self, ns, commands, what, terse=False):
        self.calls.append((ns, what))
        if self.refuse:
            raise KernelError(f"{what}: {self.refuse}")
        tables = copy.deepcopy(self.tables)
        hits = dict(self.hits)
        out = []
        for command in commands:
            (verb, body), = command.items()
            (kind, obj), = body.items()
            if kind == "chains" and verb == "list":
                out += [{"chain": dict(chain)} for (family, _), table in tables.items() if family == obj["family"]
                        for chain in table["chains"].values()]
                continue
            key = (obj.get("family"), obj.get("name") if kind == "table" else obj.get("table"))
            if kind == "table" and verb == "add":
                tables.setdefault(key, {"sets": {}, "types": {}, "decl": {}, "chains": {}, "rules": []})
                continue
            if key not in tables:
                raise KernelError(f"{what}: {ENOENT}")
            table = tables[key]
            if kind == "table" and verb == "delete":
                del tables[key]
                hits = {k: v for k, v in hits.items() if k[:2] != key}  # counters go with their rules
            elif kind == "table" and verb == "list":
                out += [{"set": self._listed_set(key, name, set() if terse else elems, table["types"][name],
                                                 table["decl"].get(name, {}))}
                        for name, elems in table["sets"].items()]
                out += [{"rule": self._counted(key, rule, hits)} for rule in table["rules"]]
            elif kind == "set" and verb == "list":
                if obj["name"] not in table["sets"]:
                    raise KernelError(f"{what}: {ENOENT}")
                out.append({"set": self._listed_set(key, obj["name"], set() if terse else table["sets"][obj["name"]],
                                                    table["types"][obj["name"]], table["decl"].get(obj["name"], {}))})
            elif kind == "chain" and verb == "list":
                out += [{"rule": self._counted(key, rule, hits)} for rule in table["rules"]
                        if rule.get("chain") == obj["name"]]
            elif kind == "chain" and verb == "add":
                table["chains"].setdefault(obj["name"], {k: v for k, v in obj.items() if k != "policy"})
            elif kind == "set":
                table["sets"].setdefault(obj["name"], set())
                table["types"].setdefault(obj["name"], obj["type"])
                table["decl"].setdefault(obj["name"], {k: obj[k] for k in ("timeout", "size") if k in obj})
            elif kind == "rule":
                table["rules"].append(dict(obj, expr=[dict(e) if "counter" not in e else {"counter": {"packets": 0}}
                                                      for e in obj["expr"]]))
            elif kind == "element":
                if obj["name"] not in table["sets"]:
                    raise KernelError(f"{what}: {ENOENT}")
                elems = {json.dumps(e, sort_keys=True) for e in obj["elem"]}
                if verb == "add":
                    table["sets"][obj["name"]] |= elems
                elif not elems <= table["sets"][obj["name"]]:
                    raise KernelError(f"{what}: {ENOENT}")
                else:
                    table["sets"][obj["name"]] -= elems
        self.tables, self.hits = tables, hits
        return json.dumps({"nftables": out}) if out else ""

    @staticmethod
    def _listed_set(key, name, elems, kind, declared=None):
        def shown(value):
            if isinstance(value, dict) and "concat" in value:
                return {"concat": [shown(v) for v in value["concat"]]}
            if isinstance(kind, dict) and isinstance(value, str) and value.startswith("0x"):
                number = int(value, 16)
                return number if number < 1 << 64 else f"0x{number:x}"
            return value

        listed = {"family": key[0], "table": key[1], "name": name,
                  "type": ["ifname", "integer"] if isinstance(kind, dict) else kind, **(declared or {})}
        if elems:
            listed["elem"] = [shown(json.loads(e)) for e in sorted(elems)]
        return listed

    @staticmethod
    def _counted(key, rule, hits):
        packets, octets = hits.get((*key, rule.get("comment")), (0, 0))
        return dict(rule, expr=[{"counter": {"packets": packets, "bytes": octets}} if "counter" in e else e
                                for e in rule["expr"]])

    def drop(self, comment, packets, octets, family="bridge", table="vxnet"):
        """The kernel dropping packets by the rule with that comment (its counter grows)."""
        key = (family, table)
        assert any(r.get("comment") == comment for r in self.tables[key]["rules"]), comment
        before = self.hits.get((*key, comment), (0, 0))
        self.hits[(*key, comment)] = (before[0] + packets, before[1] + octets)

    def record(self, elem, name, family="bridge", table="vxnet_policy_udp"):
        """The packet path adding an element to a set (a dynamic set's `update`): no batch, no call recorded."""
        self.tables[(family, table)]["sets"][name].add(json.dumps(elem, sort_keys=True))

    def sets(self, family="bridge", table="vxnet"):
        """A table's sets' elements (as sorted JSON text)."""
        return {name: sorted(elems) for name, elems in self.tables[(family, table)]["sets"].items()}
