"""A fake PolicyFirewall (netdriver/policy_nft.py) that models the kernel's policy tables: per namespace the mode,
audit flag and the four element sets, changed the way the real batches change them (an update against a missing
table fails, as nftables does; an ensure of a table made for the same mode and audit flag changes its elements
only, else replaces it). `writes` counts what was written, so a test can tell "nothing changed" from "replaced with
the same"; `replaced` counts whole replacements per namespace (which the real one pays for with its UDP records)."""

from typing import Dict, List, Optional, Tuple

from netdriver.policy import EMPTY, SETS, Elements, apply
from wire.errors import InvalidRequest, KernelError


def _frozen(elements) -> Elements:
    return Elements(**{s: frozenset(getattr(elements, s)) for s in SETS})


class FakePolicyFirewall:
    def __init__(self):
        self.tables: Dict[str, Tuple[str, bool, Elements]] = {}  # ns -> (mode, audit, elements)
        self.replaced: Dict[str, int] = {}  # ns -> how many times the table was made whole
        self.writes: List[Tuple[str, str]] = []  # (operation, ns): ensure | update | remove
        self.fail_next: Optional[str] = None  # an operation name whose next call raises KernelError

    # -- what a test does to the "kernel" ------------------------------------------------------------------------
    def lose(self, ns: str) -> None:
        """Someone ran `nft delete table bridge vxnet_policy` in ns."""
        self.tables.pop(ns, None)

    def elements(self, ns: str) -> Elements:
        return self.tables[ns][2] if ns in self.tables else EMPTY

    def _maybe_fail(self, op: str) -> None:
        if self.fail_next == op:
            self.fail_next = None
            raise KernelError(f"{op}: injected failure")

    # -- PolicyFirewall ----------------------------------------------------------------------------------------
    def ensure_policy(self, ns: str, mode: str, audit: bool, elements) -> None:
        if mode not in ("open", "exposed", "deny"):
            raise InvalidRequest(f"policy mode {mode!r}")
        if mode == "open":
            self.remove_policy(ns)
            return
        self._maybe_fail("ensure")
        have = self.tables.get(ns)
        if have is None or have[:2] != (mode, audit):
            self.replaced[ns] = self.replaced.get(ns, 0) + 1
        self.tables[ns] = (mode, audit, _frozen(elements))
        self.writes.append(("ensure", ns))

    def update_policy(self, ns: str, diff) -> None:
        if diff.add.size() == 0 and diff.remove.size() == 0:
            return  # the real one sends no batch
        self._maybe_fail("update")
        if ns not in self.tables:
            raise KernelError(f"policy elements in {ns}: No such file or directory")
        mode, audit, have = self.tables[ns]
        self.tables[ns] = (mode, audit, apply(have, diff))
        self.writes.append(("update", ns))

    def remove_policy(self, ns: str) -> None:
        self._maybe_fail("remove")
        self.tables.pop(ns, None)
        self.writes.append(("remove", ns))

    def policy_drift(self, ns: str, mode: str, audit: bool, elements) -> Optional[str]:
        problems = []
        have = self.tables.get(ns)
        if mode == "open":
            if have is not None:
                problems.append("policy table present on an open network")
        elif have is None:
            problems.append("policy table missing")
        elif have != (mode, audit, _frozen(elements)):
            problems.append("policy table differs")
        return "; ".join(problems) or None
