"""The test image: busybox from Debian's busybox-static, no registry needed.

Built once (docker import of a rootfs, then docker save) and cached as a tarball keyed by the busybox binary;
every daemon gets it with docker load, so the image ID is the same on every simulated host.

As a command, it makes sure one daemon has the image:
    python3 -m tests.harness.images [--host unix:///var/run/docker.sock]
"""

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Callable, Optional

from tests.harness.proc import HarnessError, run

IMAGE = "vxnet-test/busybox:latest"
BUSYBOX = "/bin/busybox"
RECIPE = "1"  # bump when the rootfs layout below changes, so cached tarballs are rebuilt
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE_DIR = os.path.join(REPO, "build", "images")

Docker = Callable[..., subprocess.CompletedProcess]


def docker_cli(host: Optional[str] = None) -> Docker:
    """A `docker(*args, check=True, timeout=60)` callable for one daemon (host: a DOCKER_HOST URL)."""
    prefix = ["docker"] + (["-H", host] if host else [])

    def docker(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return run(prefix + list(args), timeout=timeout, check=check)

    return docker


def _cache_key(tag: str) -> str:
    digest = hashlib.sha256(f"{RECIPE} {tag}".encode())
    with open(BUSYBOX, "rb") as f:
        digest.update(f.read())
    return digest.hexdigest()[:16]


def rootfs_tar(path: str) -> None:
    """Write a rootfs tar: busybox with a relative symlink per applet, and the directories a container expects."""
    applets = run([BUSYBOX, "--list"]).stdout.split()

    def entry(name: str, kind: bytes, mode: int, link: str = "") -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.linkname, info.mtime = kind, mode, link, 0
        return info

    with tarfile.open(path, "w") as tar:
        for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "root", "var", "run"):
            tar.addfile(entry(d, tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755))
        with open(BUSYBOX, "rb") as f:
            data = f.read()
        info = entry("bin/busybox", tarfile.REGTYPE, 0o755)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for applet in sorted(set(applets) - {"busybox"}):
            tar.addfile(entry(f"bin/{applet}", tarfile.SYMTYPE, 0o777, "busybox"))
        for name, text in (("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"), ("etc/group", "root:x:0:\n")):
            info = entry(name, tarfile.REGTYPE, 0o644)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))


def tarball(docker: Docker, cache_dir: str = CACHE_DIR, tag: str = IMAGE) -> str:
    """Path of the cached `docker save` tarball, building it through `docker` (any daemon) when missing."""
    path = os.path.join(cache_dir, f"busybox-{_cache_key(tag)}.tar")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        rootfs = os.path.join(tmp, "rootfs.tar")
        rootfs_tar(rootfs)
        docker("import", "-c", "ENV PATH=/bin", "-c", 'CMD ["sh"]', rootfs, tag)
        saved = os.path.join(tmp, "image.tar")
        docker("save", "-o", saved, tag)
        os.replace(saved, path)  # atomic: a concurrent builder sees the whole file or none
    return path


def has_image(docker: Docker, tag: str = IMAGE) -> bool:
    return docker("image", "inspect", "--format", "{{.Id}}", tag, check=False).returncode == 0


def load(docker: Docker, path: str, tag: str = IMAGE) -> None:
    """docker load the tarball unless the daemon has the image already."""
    if not has_image(docker, tag):
        docker("load", "-q", "-i", path, timeout=120)
    if not has_image(docker, tag):
        raise HarnessError(f"{path} loaded but {tag} is not there")


def ensure(docker: Docker, tag: str = IMAGE) -> str:
    """Make sure this daemon has the test image; return the tarball it came from."""
    path = tarball(docker, tag=tag)
    load(docker, path, tag)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", help="DOCKER_HOST of the daemon (default: the docker CLI's own)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    ensure(docker_cli(args.host))
    print(f"{IMAGE} ready ({time.monotonic() - started:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
