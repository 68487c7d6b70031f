"""The nftables applier Firewall drives (Links.nft) as state: one namespace's tables."""

import json

from wire.errors import KernelError


class FakeNftables:
    """What Links.nft does, for one namespace: applies add/delete of our table as nftables would (a transaction,
    all or nothing; deleting a missing table fails), and answers `list table` in nft's JSON."""

    def __init__(self, refuse=None):
        self.tables = {}  # (family, name) -> [rule commands]
        self.calls = []
        self.refuse = refuse

    def __call__(self, ns, commands, what):
        self.calls.append((ns, what))
        if self.refuse:
            raise KernelError(f"{what}: {self.refuse}")
        tables = {k: list(v) for k, v in self.tables.items()}
        out = []
        for command in commands:
            (verb, body), = command.items()
            kind, obj = next(iter(body.items()))
            key = (obj.get("family"), obj.get("name") if kind == "table" else obj.get("table"))
            if verb == "add" and kind == "table":
                tables.setdefault(key, [])
            elif verb == "delete" and kind == "table":
                if key not in tables:
                    raise KernelError(f"{what}: Error: Could not process rule: No such file or directory")
                del tables[key]
            elif verb == "add" and kind == "rule":
                tables[key].append(dict(obj, expr=[dict(e) if "counter" not in e else {"counter": {"packets": 0}}
                                                   for e in obj["expr"]]))
            elif verb == "list":
                if key not in tables:
                    raise KernelError(f"{what}: Error: No such file or directory")
                out += [{"rule": rule} for rule in tables[key]]
        self.tables = tables
        return json.dumps({"nftables": out}) if out else ""
