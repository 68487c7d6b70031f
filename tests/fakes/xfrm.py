"""The kernel's XFRM tables (kernel.xfrm.Xfrm) as state."""

from kernel.xfrm import PolicyState, SAState
from wire.errors import KernelError


class FakeXfrm:
    """The kernel's SA table (dst, spi) and policy table (src, dst, dport, dir), as Xfrm shows them."""

    def __init__(self):
        self.sa = {}
        self.sp = {}
        self.after_change = lambda: None
        self.fail_for = set()  # peers whose SAs the "kernel" refuses
        self.ops = []

    def _changed(self, op):
        self.ops.append(op)
        self.after_change()

    def ensure_sa(self, sa):
        if sa.src in self.fail_for or sa.dst in self.fail_for:
            raise KernelError(f"add ESP SA {sa.src} -> {sa.dst}: injected failure")
        state = SAState(sa.src, sa.dst, sa.spi, sa.reqid, 0, "rfc4106(gcm(aes))", sa.key, sa.icv_bits, sa.dport,
                        0, 0, 0, 0)
        if self.sa.get((sa.dst, sa.spi)) != state:
            self.sa[(sa.dst, sa.spi)] = state
            self._changed(("add_sa", sa.src, sa.dst, sa.spi))

    def delete_sa(self, dst, spi):
        if self.sa.pop((dst, spi), None) is not None:
            self._changed(("del_sa", dst, spi))
            return True
        return False

    def sas(self, ours_only=True):
        return [s for s in self.sa.values() if s.ours or not ours_only]

    def ensure_policy(self, p):
        state = PolicyState(p.src, p.dst, p.dport, 17, p.direction, p.spi, p.reqid, False)
        if self.sp.get((p.src, p.dst, p.dport, p.direction)) != state:
            self.sp[(p.src, p.dst, p.dport, p.direction)] = state
            self._changed(("set_policy", p.direction, p.src, p.dst, p.spi))

    def delete_policy(self, src, dst, dport, direction):
        if self.sp.pop((src, dst, dport, direction), None) is not None:
            self._changed(("del_policy", direction, src, dst))
            return True
        return False

    def policies(self, ours_only=True):
        return [p for p in self.sp.values() if p.ours or not ours_only]

    def remove_ours(self):
        for p in self.policies():
            self.delete_policy(p.src, p.dst, p.dport, p.direction)
        for s in self.sas():
            self.delete_sa(s.dst, s.spi)
