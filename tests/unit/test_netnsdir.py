"""Reading /proc/self/mountinfo for the namespace folder: layers, hidden namespaces, escaped paths."""

from kernel import netnsdir

# The layers seen after a namespace was mounted on the plain folder and `ip netns add` then self-bound it, on a
# private parent (the first copy of "a" unmounted by path, its original hidden) and on a shared one (peers).
PRIVATE = """\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
64 27 0:4 net:[4026532178] /run/netns/a rw - nsfs nsfs rw
65 27 254:0 /run/netns /run/netns rw,relatime shared:1 - ext4 /dev/vda rw
67 65 0:4 net:[4026532190] /run/netns/other rw shared:3 - nsfs nsfs rw
"""
SHARED = """\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
63 27 0:39 / /run rw,relatime shared:1 - tmpfs tmpfs rw
65 63 0:39 /netns /run/netns rw,relatime shared:1 - tmpfs tmpfs rw
67 65 0:4 net:[4026532247] /run/netns/other rw shared:3 - nsfs nsfs rw
68 63 0:4 net:[4026532247] /run/netns/other rw shared:3 - nsfs nsfs rw
"""


def test_hidden_namespace_on_a_private_parent():
    mounts = netnsdir.parse_mountinfo(PRIVATE)
    assert netnsdir.top_mount(mounts, "/run/netns").id == 65
    assert [m.id for m in netnsdir.hidden(mounts, "/run/netns")] == [64]
    assert [m.id for m in netnsdir.namespace_mounts(mounts, "/run/netns")] == [64, 67]


def test_peers_under_a_shared_parent_hide_nothing():
    mounts = netnsdir.parse_mountinfo(SHARED)
    assert netnsdir.top_mount(mounts, "/run/netns").id == 65
    assert netnsdir.hidden(mounts, "/run/netns") == []
    assert netnsdir.hidden(mounts[:4] + [netnsdir.Mount(68, 63, "/run/netns/other", "nsfs", None)],
                           "/run/netns")[0].id == 68  # not a peer of the reachable one: hidden


def test_a_covered_mount_is_not_the_folder():
    """A tmpfs over /run leaves the machine's /run/netns listed at the same point, but lookup never reaches it."""
    mounts = netnsdir.parse_mountinfo(PRIVATE + "80 27 0:60 / /run rw - tmpfs tmpfs rw\n")
    assert netnsdir.top_mount(mounts, "/run/netns") is None
    assert netnsdir.reached(mounts, "/run/netns").id == 80
    assert netnsdir.hidden(mounts, "/run/netns") == [] and netnsdir.visible(mounts, "/run/netns") == []


def test_no_mount_point_no_layers():
    mounts = netnsdir.parse_mountinfo(PRIVATE.splitlines()[0] + "\n64 27 0:4 net:[1] /run/netns/a rw - nsfs nsfs rw")
    assert netnsdir.top_mount(mounts, "/run/netns") is None
    assert netnsdir.hidden(mounts, "/run/netns") == []


def test_escaped_paths_and_stacked_mounts():
    text = ("27 1 254:0 / / rw - ext4 /dev/vda rw\n"
            "70 27 0:50 / /var/lib/my\\040plugin rw - tmpfs tmpfs rw\n"
            "71 70 0:50 / /var/lib/my\\040plugin rw - tmpfs tmpfs rw\n"
            "72 27 0:51 / /a\\134b rw - tmpfs tmpfs rw\n")
    mounts = netnsdir.parse_mountinfo(text)
    assert [m.point for m in mounts[1:]] == ["/var/lib/my plugin", "/var/lib/my plugin", "/a\\b"]
    assert netnsdir.top_mount(mounts, "/var/lib/my plugin").id == 71
