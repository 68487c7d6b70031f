"""Fakes that model state (not call recorders), shared by the unit tests: one fake per collaborator, one module
each, re-exported here (`from tests.fakes import FakeKV`)."""

from tests.fakes.dataplane import FakeDataPlane
from tests.fakes.encryption import FakeEncryption
from tests.fakes.firewall import FakeFirewall
from tests.fakes.kv import FakeKV, FakeWatchStream
from tests.fakes.links import FakeLinks
from tests.fakes.nftables import FakeNftables
from tests.fakes.policy_firewall import FakePolicyFirewall
from tests.fakes.xfrm import FakeXfrm

__all__ = ["FakeDataPlane", "FakeEncryption", "FakeFirewall", "FakeKV", "FakeLinks", "FakeNftables",
           "FakePolicyFirewall", "FakeWatchStream", "FakeXfrm"]
