"""nftables without forking `nft`: libnftables, the library the nft command is itself built on (libnftables.so.1,
package libnftables1, which the nftables package depends on), through ctypes, as kernel/syscalls.py does for libc.

Why not the command: `nsenter --net=... nft -j -f -` costs 15-20 ms per batch here, and most of it is not the
fork. When a netlink socket that committed deletions in nf_tables closes, the kernel waits for the deferred
destruction of what was deleted (an RCU grace period, 10-20 ms on this 2-CPU machine); every `nft` process
closes its socket on exit, so every batch that deletes anything paid for it. A context kept open per
namespace applies the same batch in 0.2-2 ms and pays that wait only once, when the namespace goes.

A context's netlink socket belongs to the namespace of the thread that opened it, so whoever owns the contexts
creates and uses them inside the right namespace (kernel/links.py, on its netlink thread). Not thread-safe:
one thread per context.
"""

import ctypes
import json
from typing import Dict, Optional, Tuple

SONAME = "libnftables.so.1"
# <nftables/libnftables.h>: NFT_CTX_DEFAULT, NFT_CTX_OUTPUT_JSON, NFT_CTX_OUTPUT_TERSE. JSON output also makes
# nft_run_cmd_from_buffer read its input as JSON (it falls back to the nft syntax if that fails); terse output
# (`nft -t`) lists sets without their elements.
_CTX_DEFAULT = 0
_OUTPUT_JSON = 1 << 4
_OUTPUT_TERSE = 1 << 11

_lib = None


class NftablesError(Exception):
    """libnftables is missing, or refused a batch (the message is its error output)."""


def _load():
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL(SONAME, use_errno=True)
        except OSError as exc:
            raise NftablesError(f"cannot load {SONAME} ({exc}): install nftables (it brings libnftables1)") \
                from None
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_free.restype = None
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_output_set_flags.restype = None
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_int
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        _lib = lib
    return _lib


def require() -> None:
    """NftablesError naming the package if the library cannot be loaded (checked at start-up)."""
    _load()


class Context:
    """One libnftables context (one netlink socket, in the namespace of the thread that made it)."""

    def __init__(self):
        lib = _load()
        ctx = lib.nft_ctx_new(_CTX_DEFAULT)
        if not ctx:
            raise NftablesError("nft_ctx_new failed")
        lib.nft_ctx_output_set_flags(ctx, _OUTPUT_JSON)
        if lib.nft_ctx_buffer_output(ctx) or lib.nft_ctx_buffer_error(ctx):
            lib.nft_ctx_free(ctx)
            raise NftablesError("cannot buffer libnftables output")
        self._lib = lib
        self._ctx: Optional[int] = ctx

    def run(self, commands: list, terse: bool = False) -> str:
        """Apply a list of JSON commands (`{"add": ...}`, `{"list": ...}`) as one transaction: all or nothing.
        Returns the JSON output (for list commands: one JSON document per command, one after the other);
        terse: sets are listed without their elements. NftablesError with nft's own message if refused."""
        if not self._ctx:
            raise NftablesError("libnftables context already closed")
        text = (to_nft_syntax(commands) if _declares_typeof(commands)
                else json.dumps({"nftables": commands})).encode()
        if terse:
            self._lib.nft_ctx_output_set_flags(self._ctx, _OUTPUT_JSON | _OUTPUT_TERSE)
        try:
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, text)
        finally:
            if terse:
                self._lib.nft_ctx_output_set_flags(self._ctx, _OUTPUT_JSON)
        out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
        if rc != 0:
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
            raise NftablesError(err.strip()[:300] or f"libnftables returned {rc}")
        return out

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


def _declares_typeof(commands: list) -> bool:
    """True if a command adds a set whose key is given by expressions (`"type": {"typeof": expr}`, the JSON of
    nftables 1.1): the JSON parser of nftables 1.0.6 (Debian 12) knows only named types, so the batch goes in
    nft syntax, which declares `typeof` sets since 0.9.4. The output stays JSON either way."""
    return any(isinstance(body.get("set", {}).get("type"), dict)
               for command in commands for body in command.values() if isinstance(body, dict))


def _value(value) -> str:
    """A right-hand value or set element in nft syntax. Strings are quoted (nft reads a quoted string as the
    same symbol, address or name as a bare one), except set references (@name) and raw integers (0x...)."""
    if isinstance(value, bool) or value is None:
        raise NftablesError(f"cannot write {value!r} in nft syntax")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if value.startswith("@") or value.startswith("0x"):
            return value
        if '"' in value or "\\" in value or "\n" in value:
            raise NftablesError(f"cannot quote {value!r} in nft syntax")
        return f'"{value}"'
    if isinstance(value, dict) and "concat" in value:
        return " . ".join(_value(v) for v in value["concat"])
    if isinstance(value, dict) and "prefix" in value:
        return f"{value['prefix']['addr']}/{int(value['prefix']['len'])}"
    if isinstance(value, dict) and "set" in value:
        return "{ " + ", ".join(_value(v) for v in value["set"]) + " }"
    return _expression(value)


def _expression(expr) -> str:
    """A left-hand expression (meta, payload by name or raw, concatenation) in nft syntax."""
    if isinstance(expr, dict) and "meta" in expr:
        return f"meta {expr['meta']['key']}"
    if isinstance(expr, dict) and "payload" in expr:
        payload = expr["payload"]
        if "base" in payload:
            return f"@{payload['base']},{int(payload['offset'])},{int(payload['len'])}"
        return f"{payload['protocol']} {payload['field']}"
    if isinstance(expr, dict) and "concat" in expr:
        return " . ".join(_expression(e) for e in expr["concat"])
    raise NftablesError(f"cannot write expression {expr!r} in nft syntax")


def _statement(stmt: dict) -> str:
    (kind, body), = stmt.items()
    if kind == "match":
        op = "" if body["op"] == "==" else f"{body['op']} "
        return f"{_expression(body['left'])} {op}{_value(body['right'])}"
    if kind in ("counter", "drop", "accept") and body is None:
        return kind
    if kind == "jump":
        return f"jump {body['target']}"
    if kind == "limit":
        return f"limit rate {int(body['rate'])}/{body['per']} burst {int(body['burst'])} packets"
    if kind == "log":
        threshold = f" queue-threshold {int(body['queue-threshold'])}" if "queue-threshold" in body else ""
        return (f"log prefix {_value(body['prefix'])} group {int(body['group'])} snaplen {int(body['snaplen'])}"
                + threshold)
    raise NftablesError(f"cannot write statement {stmt!r} in nft syntax")


def _command(verb: str, body: dict) -> str:
    (kind, obj), = body.items()
    where = f"{obj['family']} {obj.get('table', obj.get('name'))}"
    if kind == "table":
        return f"{verb} table {obj['family']} {obj['name']}"
    if kind == "set" and verb == "add":
        key = obj["type"]
        if isinstance(key, dict):
            key = "typeof " + _expression(key["typeof"])
        else:
            key = "type " + (" . ".join(key) if isinstance(key, list) else key)
        flags = f" flags {', '.join(obj['flags'])};" if obj.get("flags") else ""
        return f"add set {where} {obj['name']} {{ {key};{flags} }}"
    if kind == "chain" and verb == "add" and "hook" not in obj:  # a regular chain: reached by a jump
        return f"add chain {where} {obj['name']}"
    if kind == "chain" and verb == "add":
        return (f"add chain {where} {obj['name']} {{ type {obj['type']} hook {obj['hook']} priority "
                f"{int(obj['prio'])}; policy {obj['policy']}; }}")
    if kind == "rule" and verb == "add":
        comment = f" comment {_value(obj['comment'])}" if obj.get("comment") else ""
        return f"add rule {where} {obj['chain']} {' '.join(_statement(s) for s in obj['expr'])}{comment}"
    if kind == "element" and verb in ("add", "delete"):
        return f"{verb} element {where} {obj['name']} {{ {', '.join(_value(e) for e in obj['elem'])} }}"
    raise NftablesError(f"cannot write {verb} {kind} in nft syntax")


def to_nft_syntax(commands: list) -> str:
    """The same batch in nft syntax, one command a line (one transaction, as the JSON would be): the commands
    and expressions vxnet's tables are made of (netdriver/isolation.py), NftablesError for anything else."""
    lines = []
    for command in commands:
        (verb, body), = command.items()
        lines.append(_command(verb, body))
    return "\n".join(lines) + "\n"


def rule_counters(output: str) -> Dict[str, Tuple[int, int]]:
    """The counters of the commented rules in a `list` command's JSON output: comment -> (packets, bytes), summed
    over the rule's counter statements (a rule without one counts (0, 0)). Rules without a comment are not ours
    to report and are left out; so is everything that is not a rule (tables, chains, sets, metainfo).

    Wire (nft -j list ...): {"nftables": [{"metainfo": {...}}, {"table": {...}}, {"chain": {...}},
    {"rule": {"family", "table", "chain", "handle", "comment", "expr": [..., {"counter": {"packets": N,
    "bytes": M}}, {"drop": null}]}}, ...]}"""
    out: Dict[str, Tuple[int, int]] = {}
    for item in json.loads(output or "{}").get("nftables", []):
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict) or not isinstance(rule.get("comment"), str):
            continue
        packets = octets = 0
        for expr in rule.get("expr") or []:
            counter = expr.get("counter") if isinstance(expr, dict) else None
            if isinstance(counter, dict):
                packets += int(counter.get("packets", 0))
                octets += int(counter.get("bytes", 0))
        before = out.get(rule["comment"], (0, 0))
        out[rule["comment"]] = (before[0] + packets, before[1] + octets)
    return out
