"""The fail-closed ESP firewall (encrypt.firewall.Firewall) as state."""


class FakeFirewall:
    def __init__(self, log):
        self.log = log
        self.present = False

    def ensure(self):
        self.present = True
        self.log.append(("firewall",))

    def remove(self):
        self.present = False
