"""kernel/events.py NftCommits over nf_tables notifications as the kernel sends them (object messages, then one
NFT_MSG_NEWGEN naming the committing task): this process's commits are not reported, anyone else's are, a commit
read in two parts is judged by its NEWGEN, and objects whose NEWGEN never comes are reported once overdue."""

import struct

import pytest

from kernel import events as ev
from kernel import names

OURS = names.nft_committer("0a1b2c3d")


def _msg(msg_type: int, payload: bytes) -> bytes:
    length = ev.NLMSG_HDR.size + len(payload)
    pad = (-length) % ev.NLMSG_ALIGNTO
    return ev.NLMSG_HDR.pack(length, msg_type, 0, 0, 0) + payload + b"\0" * pad


def _attr(kind: int, value: bytes) -> bytes:
    length = ev.NLA_HDR.size + len(value)
    return ev.NLA_HDR.pack(length, kind) + value + b"\0" * ((-length) % 4)


def newgen(name: str, gen: int = 7) -> bytes:
    payload = (b"\0\0\0\0" + _attr(1, struct.pack(">I", gen)) + _attr(2, struct.pack(">I", 4242))
               + _attr(ev.NFTA_GEN_PROC_NAME, name.encode() + b"\0"))
    return _msg((ev.NFNL_SUBSYS_NFTABLES << 8) | ev.NFT_MSG_NEWGEN, payload)


NEWSETELEM = _msg((ev.NFNL_SUBSYS_NFTABLES << 8) | 12, b"\0\0\0\0" + _attr(2, b"allow_all4\0"))
DELSETELEM = _msg((ev.NFNL_SUBSYS_NFTABLES << 8) | 14, b"\0\0\0\0" + _attr(2, b"allow_all4\0"))


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_committer_is_read_from_a_newgen():
    assert ev.committer(newgen(OURS)[ev.NLMSG_HDR.size:]) == OURS
    assert ev.committer(newgen("nft")[ev.NLMSG_HDR.size:]) == "nft"
    assert ev.committer(b"\0\0\0\0") is None


def test_fifty_own_commits_report_nothing_and_a_foreign_one_is_reported():
    commits = ev.NftCommits(OURS, Clock())
    reported = [commits.feed(NEWSETELEM + DELSETELEM + newgen(OURS, gen)) for gen in range(50)]
    assert reported == [set()] * 50 and commits.due() is None
    assert commits.feed(NEWSETELEM + newgen("nft")) == {"nft"}  # control: the same change, by someone else


def test_a_commit_read_in_two_parts_is_judged_by_its_newgen():
    clock = Clock()
    commits = ev.NftCommits(OURS, clock)
    assert commits.feed(NEWSETELEM) == set() and commits.due() == clock.now + ev.PENDING_SECONDS
    assert commits.feed(newgen(OURS)) == set() and commits.due() is None
    assert commits.feed(NEWSETELEM) == set()
    assert commits.feed(newgen("nft")) == {"nft"}


def test_objects_without_their_newgen_are_reported_once_overdue():
    clock = Clock()
    commits = ev.NftCommits(OURS, clock)
    commits.feed(DELSETELEM)
    clock.now += ev.PENDING_SECONDS / 2
    assert commits.overdue(clock.now) == set()
    clock.now += ev.PENDING_SECONDS
    assert commits.overdue(clock.now) == {"nft"}
    assert commits.overdue(clock.now) == set() and commits.due() is None  # reported once


def test_without_a_committer_of_its_own_every_commit_is_reported():
    commits = ev.NftCommits(None, Clock())
    assert commits.feed(NEWSETELEM + newgen(OURS)) == {"nft"}


def test_the_committer_name_fits_the_kernels_comm_and_is_checked():
    assert len(OURS) <= 15 and OURS.startswith(names.NFT_COMMITTER_PREFIX)
    with pytest.raises(ValueError, match="committer tag"):
        names.nft_committer("not-hex!")
