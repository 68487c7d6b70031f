"""The fail-closed ESP firewall (encrypt.firewall.Firewall) as state."""


class FakeFirewall:
    """`installed`: the table is in the modelled kernel; `present()` reads it as the real one lists the table."""

    def __init__(self, log):
        self.log = log
        self.installed = False

    def ensure(self):
        self.installed = True
        self.log.append(("firewall",))

    def remove(self):
        self.installed = False

    def present(self):
        return self.installed
