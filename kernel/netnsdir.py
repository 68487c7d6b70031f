"""The folder that network namespaces are mounted in (/run/netns), made the way iproute2 makes it: the one
place that mounts or unmounts it, and that repairs namespaces an earlier ordering hid.

The kernel fact. A namespace is named by bind-mounting its nsfs file onto a file in the folder. iproute2's first
`ip netns add` turns the folder into a mount of its own: if it is not a mount point yet, it bind-mounts it onto
itself (MS_BIND|MS_REC), then makes it shared (MS_SHARED|MS_REC) so namespaces added later propagate into mount
namespaces that were copied from this one (dockerd's managed plugins, `unshare`). On a freshly booted machine
/run/netns is a plain folder. A namespace that someone mounted there before that first `ip netns add` stays on
the folder's file in the lower layer: the recursive self-bind puts a copy of its mount on top, so the path still
works, but unmounting by path only ever removes the top copy; the original is covered, can no longer be named
by any path, keeps the namespace (and its devices) alive, and makes the file's removal fail with EBUSY. Where
the folder's parent is a shared mount (systemd's /run) the self-bind joins the parent's peer group and mounts
propagate through both layers, so nothing hides; on a private parent (a VM without systemd, a private mount
namespace) it does.

So vxnet, before its first namespace, makes the folder what `ip netns add` would make it: a later `ip netns add`
then finds a mount point and only sets it shared again. And where namespaces are hidden already (a vxnet before
this one, or anyone else, mounted first), `prepare` re-homes every namespace in the folder: it holds each one
open, takes the layers down, makes the folder again, and mounts each namespace back on its own file, once.
"""

import dataclasses
import logging
import os
from typing import Dict, List, Optional

from kernel.syscalls import MNT_DETACH, MS_BIND, MS_REC, MS_SHARED, libc_call

log = logging.getLogger(__name__)

MOUNTINFO = "/proc/self/mountinfo"


@dataclasses.dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo (proc(5)): mount id, parent id, mount point, filesystem type, and the
    peer group it propagates in (its `shared:N` tag; None when private or slave only)."""
    id: int
    parent: int
    point: str
    fstype: str
    peer: Optional[int] = None


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \ooo octal escapes (seq_path's " \t\n\\").
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> List[Mount]:
    """Mounts in the order the kernel lists them: `id parent major:minor root point options... - fstype ...`."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right:
            continue
        peer = next((int(f[7:]) for f in fields[6:] if f.startswith("shared:")), None)
        mounts.append(Mount(int(fields[0]), int(fields[1]), _unescape(fields[4]), right.split()[0], peer))
    return mounts


def _read_mounts() -> List[Mount]:
    with open(MOUNTINFO) as f:
        return parse_mountinfo(f.read())


def _stacked(mounts: List[Mount], point: str, parent: int) -> Optional[Mount]:
    """The topmost of the mounts attached at point on the mount `parent` (each later one on the one before)."""
    below = [m for m in mounts if m.point == point and m.parent == parent]
    if not below:
        return None
    top = below[-1]
    while True:
        above = [m for m in mounts if m.point == point and m.parent == top.id]
        if not above:
            return top
        top = above[-1]


def reached(mounts: List[Mount], path: str) -> Optional[Mount]:
    """The mount that path lookup ends in for an absolute, resolved path: from the root mount down, at each
    component the mounts attached there on the mount reached so far. Mounts a later one covers are listed in
    mountinfo at the same points (a tmpfs over /run leaves /run/netns listed), so the point alone says nothing."""
    ids = {m.id for m in mounts}
    current = next((m for m in reversed(mounts) if m.point == "/" and m.parent not in ids), None)
    if current is None:
        return None
    current = _stacked(mounts, "/", current.id) or current
    parts = [p for p in path.split("/") if p]
    for i in range(len(parts)):
        current = _stacked(mounts, "/" + "/".join(parts[:i + 1]), current.id) or current
    return current


def top_mount(mounts: List[Mount], point: str) -> Optional[Mount]:
    """The mount path lookup reaches at `point` if a mount is there, else None (point is no mount point)."""
    found = reached(mounts, point)
    return found if found is not None and found.point == point else None


def namespace_mounts(mounts: List[Mount], folder: str) -> List[Mount]:
    """nsfs mounts on files directly in folder, at any layer."""
    return [m for m in mounts if m.fstype == "nsfs" and os.path.dirname(m.point) == folder]


def _layer(mounts: List[Mount], folder: str) -> Optional[int]:
    """The id of the mount whose files path lookup sees in folder (the folder's own mount, or the one it is in)."""
    found = reached(mounts, folder)
    return found.id if found is not None else None


def visible(mounts: List[Mount], folder: str) -> List[Mount]:
    """Namespace mounts that paths in folder reach."""
    layer = _layer(mounts, folder)
    return [m for m in namespace_mounts(mounts, folder) if m.parent == layer]


def hidden(mounts: List[Mount], folder: str) -> List[Mount]:
    """Namespace mounts no path can reach because the folder's own mount covers them: they sit on the layer
    below, and no mount of their peer group is on top (under a shared parent each layer holds a peer of the same
    mount, and unmounting the reachable one takes the others with it: nothing is hidden there)."""
    top = top_mount(mounts, folder)
    if top is None:
        return []
    by_id = {m.id: m for m in mounts}
    below, mount = set(), top
    while mount.parent in by_id:  # the self-binds stacked under the top one, and the mount they all sit on
        below.add(mount.parent)
        mount = by_id[mount.parent]
        if mount.point != folder:
            break
    reachable = {(m.point, m.peer) for m in visible(mounts, folder) if m.peer is not None}
    return [m for m in namespace_mounts(mounts, folder)
            if m.parent in below and (m.point, m.peer) not in reachable]


def prepare(folder: str) -> List[str]:
    """Make folder a shared mount of itself, as `ip netns add` does, repairing hidden namespaces first. Idempotent.
    Returns the names of the namespaces that had to be mounted back (empty when nothing was wrong)."""
    os.makedirs(folder, exist_ok=True)
    folder = os.path.realpath(folder)
    mounts = _read_mounts()
    top = top_mount(mounts, folder)
    present = visible(mounts, folder)
    if top is not None and not hidden(mounts, folder):
        _mount(folder, folder, MS_SHARED | MS_REC)  # what iproute2 does every time: propagation is shared
        return []
    if top is None and not present:
        _make_folder(folder)
        return []
    # Namespaces mounted on the plain folder (a recursive self-bind would hide them), or hidden already.
    return _rehome(folder)


def _make_folder(folder: str) -> None:
    # Nothing is mounted inside yet, so the recursive bind copies nothing (iproute2 passes MS_REC as well).
    _mount(folder, folder, MS_BIND | MS_REC)
    _mount(folder, folder, MS_SHARED | MS_REC)


def _rehome(folder: str) -> List[str]:
    """Hold every namespace of the folder open (topmost layer first: that is what its name reached), take every
    layer and every namespace mount down, make the folder anew and mount each namespace back on its file."""
    held: Dict[str, int] = {}
    try:
        while True:
            mounts = _read_mounts()
            top = top_mount(mounts, folder)
            reachable = visible(mounts, folder)
            for m in reachable:
                name = os.path.basename(m.point)
                if name not in held:
                    held[name] = os.open(m.point, os.O_RDONLY | os.O_CLOEXEC)
            if top is not None:
                # The whole layer goes at once, its namespace mounts with it; the next layer down shows.
                libc_call("umount2", folder.encode(), MNT_DETACH)
                continue
            if not reachable:
                break
            for m in reachable:
                libc_call("umount2", m.point.encode(), MNT_DETACH)
        _make_folder(folder)
        for name, fd in sorted(held.items()):
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0o444))
            _mount(f"/proc/self/fd/{fd}", path, MS_BIND)
        log.warning("namespace folder %s was made after namespaces were mounted in it; mounted %d back "
                    "where `ip netns` and vxnet reach them: %s", folder, len(held), ", ".join(sorted(held)))
        return sorted(held)
    finally:
        for fd in held.values():
            os.close(fd)


def _mount(source: str, target: str, flags: int) -> None:
    libc_call("mount", source.encode(), target.encode(), b"none", flags, None)
