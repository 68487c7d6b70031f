"""The store client against a real 3-member etcd cluster on loopback: a member that loses its leader (here: the
other two die, as they would be cut off by a partition) ends the watch streamed from it and refuses calls with
"no leader" rather than staying open and silent, because the client asks for a member with a leader; once a
quorum is back the same member serves again. (Failover between members under load: tests/e2e/test_etcd_cluster.py.)"""

import threading
import time

import pytest

from store.kvstore import EtcdKV
from tests.harness.etcd_cluster import EtcdCluster
from tests.harness.proc import wait_until
from wire.errors import StoreUnavailable


@pytest.fixture
def cluster(tmp_path):
    made = EtcdCluster.loopback(str(tmp_path / "cluster"))
    try:
        yield made.start()
    finally:
        made.stop()


def test_a_member_without_a_leader_ends_its_watch_and_refuses_until_a_quorum_is_back(cluster):
    m1, m2, m3 = cluster.members
    kv = EtcdKV([m1.url])
    events, ended = [], []
    stream = kv.watch("/cluster/", kv.revision() + 1)

    def read():
        try:
            events.extend(stream)
            ended.append("closed without error")
        except StoreUnavailable as exc:
            ended.append(str(exc))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        kv.put("/cluster/a", "1")
        wait_until(lambda: [e.key for e in events] == ["/cluster/a"], 10, "the watch on m1 to deliver the put")

        m2.kill()
        m3.kill()
        started = time.monotonic()
        wait_until(lambda: ended, 10, "m1's watch to end once m1 has no leader")
        assert "no leader" in ended[0], ended
        with pytest.raises(StoreUnavailable, match="refused kv/range: HTTP 503 etcdserver: no leader"):
            kv.get("/cluster/a")
        assert time.monotonic() - started < 10
    finally:
        stream.close()
        reader.join(5)

    m2.start()  # a quorum again (m1 and m2): the same member serves reads, writes and a new watch
    wait_until(lambda: m1.healthy(), 20, "m1 to have a leader again")
    assert kv.get("/cluster/a").value == "1"
    assert kv.put("/cluster/b", "2") > 0
