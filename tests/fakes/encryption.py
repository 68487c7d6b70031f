"""The encryption manager (encrypt.manager.EncryptionManager) as state."""

from wire.errors import EncryptionUnavailable


class FakeEncryption:
    """The EncryptionManager surface the driver and PeerSync use, as state."""

    def __init__(self, unavailable=None):
        self.unavailable = unavailable
        self.holders = {}
        self.firewall = False
        self.lost = {}  # kind -> objects someone else removed (lose()), put back by repair()

    def lose(self, kind, count=1):
        self.lost[kind] = self.lost.get(kind, 0) + count

    def repair(self):
        repaired, self.lost = self.lost, {}
        return repaired

    def require(self):
        if self.unavailable:
            raise EncryptionUnavailable(self.unavailable)
        self.firewall = True

    def set_peers(self, holder, vteps):
        vteps = set(vteps)
        if vteps:
            self.holders[holder] = vteps
        else:
            self.holders.pop(holder, None)

    def sync_all(self, holders):
        self.holders = {h: set(v) for h, v in holders.items() if v}
