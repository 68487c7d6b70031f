"""Run one command inside a qemu guest with a stock Debian kernel: this machine's kernel has no ESP.

The guest (each point checked by running it on this machine):
- kernel: Debian's `linux-image-amd64` dependency (linux-image-6.1.*-amd64), fetched with `apt-get download` and
  unpacked with `dpkg -x` under build/ipsec-guest/ (nothing goes into /boot). Its bzImage is unpacked to the ELF
  vmlinux, booted through its PVH entry (`-kernel vmlinux`), which skips the real-mode setup and decompression:
  seconds faster under TCG.
- initramfs: static busybox + the modules the checks need (and, from modules.dep-style `depends=` in each
  module, what they need), loaded in order by /init. ESP also needs a default RNG: sha3_generic, then
  jitterentropy_rng, then drbg.
- root: this machine's / shared read-only over virtio-9p, with a tmpfs overlay on top, made the guest's root with
  switch_root (so mount namespaces made inside see it as / too), so the guest runs the host's python3,
  site-packages, ip, nft, tcpdump and etcd as they are. The guest's /run and /tmp are fresh tmpfs (the host's
  are other processes' live state), so anything of the host's that lives there is invisible through that share.
- this checkout: shared on its own (9p tag `checkout`, read-only, with a tmpfs overlay) and mounted at its host
  path, wherever that is: under /tmp, under /root, with spaces in it.
- the command: a script in a host folder of its own, shared as 9p tag `vxnetrun` and mounted at /run/vxnet-cmd;
  beside it a file naming the checkout's path. Nothing path-like goes on the kernel command line (it splits at
  spaces). The output comes back over the serial console, the exit code on a marker line.
- no network card at all (`-nic none`): the guest's traffic stays in its own namespaces.
- qemu with TCG (`-accel tcg,thread=multi -cpu max`): /dev/kvm here only runs PVM guests.

    python3 -m tests.ipsec.guest -- ip -br link      # by hand: prepare (cached) and run one command
"""

import dataclasses
import glob
import hashlib
import io
import lzma
import os
import re
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.join(REPO, "build", "ipsec-guest")
META_PACKAGE = "linux-image-amd64"
BUSYBOX = "/bin/busybox"
QEMU = "qemu-system-x86_64"
EXIT_MARKER = "VXNET-GUEST-EXIT"

# Loaded in this order (each after its dependencies). 9p, virtio and overlay mount the host root; veth, bridge,
# vxlan and nf_tables (whose libcrc32c wants crc32c; nft_meta_bridge for the anti-spoofing table's iifname in the
# bridge family; nft_limit, nft_log and nfnetlink_log for the drop chains' rate-limited NFLOG) build the simulated
# hosts; the rest is ESP with
# rfc4106(gcm(aes)) and the default RNG it needs (drbg's default is HMAC-SHA512, seeded by jitterentropy, which
# hashes with SHA-3). The second half is dockerd with Swarm's VIP mode (tests/ipsec/inguest_vip.py): iptables-nft's
# nft_compat with the matches and targets dockerd and libnetwork's load balancer use (nat, conntrack, addrtype,
# MASQUERADE, mark, ipvs), br_netfilter (dockerd asks for it at start), ip_vs with the round-robin scheduler Swarm
# programs, and xt_u32/xt_REDIRECT that the embedded DNS and overlay rules name.
MODULES = (
    "virtio_pci", "9pnet_virtio", "9p", "overlay",
    "veth", "bridge", "vxlan", "crc32c_generic", "nf_tables", "nft_meta_bridge", "nft_limit", "nft_log",
    "nfnetlink_log",
    "xfrm_user", "esp4", "aead", "gf128mul", "ghash_generic", "ctr", "gcm", "seqiv",
    "sha512_generic", "sha3_generic", "jitterentropy_rng", "drbg",
    "br_netfilter", "nf_conntrack", "nf_nat", "nft_compat", "nft_chain_nat", "xt_conntrack", "xt_addrtype",
    "xt_MASQUERADE", "xt_nat", "xt_mark", "xt_comment", "xt_tcpudp", "xt_REDIRECT", "xt_u32", "xt_ipvs",
    "ip_vs", "ip_vs_rr", "ip_tables", "iptable_filter", "iptable_nat", "iptable_mangle",
)

_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Modules the kernel asks for on its own are noted, not loaded: everything comes from /modules/order. (Requests for
# crypto-<instance> are normal: the kernel asks before building the instance from a loaded template.)
printf '#!/bin/sh\necho "$*" >>/modprobe.log\nexit 1\n' >/bin/modprobe-report
chmod 755 /bin/modprobe-report
echo /bin/modprobe-report >/proc/sys/kernel/modprobe
for m in $(cat /modules/order); do
  insmod /modules/$m.ko || echo "vxnet-guest: insmod $m failed"
done
mkdir -p /mnt/lower /mnt/rw /mnt/root
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /mnt/lower \
  || echo "vxnet-guest: 9p mount failed"
mount -t tmpfs -o size=256m tmpfs /mnt/rw
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work /mnt/root \
  || echo "vxnet-guest: overlay mount failed"
for d in proc sys dev run tmp; do mkdir -p /mnt/root/$d; done
mount -t proc proc /mnt/root/proc
mount -t sysfs sysfs /mnt/root/sys
mount -t devtmpfs devtmpfs /mnt/root/dev
mkdir -p /mnt/root/dev/pts && mount -t devpts devpts /mnt/root/dev/pts
# What udev would add (nft -f - reads /dev/stdin).
ln -sf /proc/self/fd /mnt/root/dev/fd
for i in 0:stdin 1:stdout 2:stderr; do ln -sf /proc/self/fd/${i%%:*} /mnt/root/dev/${i#*:}; done
mount -t tmpfs tmpfs /mnt/root/run
mount -t tmpfs tmpfs /mnt/root/tmp
# The command's folder, then the checkout at its own path: after /tmp's tmpfs, so a checkout under /tmp shows.
mkdir -p /mnt/root/run/vxnet-cmd
mount -t 9p -o trans=virtio,version=9p2000.L,ro vxnetrun /mnt/root/run/vxnet-cmd \
  || echo "vxnet-guest: 9p mount of the command folder failed"
checkout=$(cat /mnt/root/run/vxnet-cmd/checkout)
mkdir -p /mnt/checkout /mnt/rw/checkout-upper /mnt/rw/checkout-work "/mnt/root$checkout"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose checkout /mnt/checkout \
  || echo "vxnet-guest: 9p mount of the checkout failed"
mount -t overlay overlay \
  -o lowerdir=/mnt/checkout,upperdir=/mnt/rw/checkout-upper,workdir=/mnt/rw/checkout-work "/mnt/root$checkout" \
  || echo "vxnet-guest: overlay mount of the checkout failed"
# The kernel's module requests keep being noted after the switch (the initramfs is gone then).
printf '#!/bin/busybox sh\necho "$*" >>/run/vxnet-modprobe.log\nexit 1\n' >/mnt/root/run/vxnet-modprobe
chmod 755 /mnt/root/run/vxnet-modprobe
echo /run/vxnet-modprobe >/proc/sys/kernel/modprobe
[ -s /modprobe.log ] && cp /modprobe.log /mnt/root/run/vxnet-modprobe.log
echo "vxnet-guest: up $(cut -d' ' -f1 /proc/uptime) s, checkout at $checkout"
# switch_root, not chroot: the host root becomes the root of the initial mount namespace, so namespaces made
# later (unshare --mount, nsenter -m: the simulated hosts of tests/harness) see it as / too, not the initramfs.
cat >/mnt/root/run/vxnet-stage2 <<STAGE2
#!/bin/busybox sh
/usr/bin/env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  /bin/sh /run/vxnet-cmd/command.sh
rc=\$?
[ -s /run/vxnet-modprobe.log ] && echo "vxnet-guest: the kernel asked for modules:" \
  "\$(/bin/busybox sed 's/^-q -- //' /run/vxnet-modprobe.log | /bin/busybox sort -u | /bin/busybox tr '\n' ' ')"
echo "VXNET-GUEST-EXIT \$rc after \$(/bin/busybox cut -d' ' -f1 /proc/uptime) s"
/bin/busybox sync
/bin/busybox reboot -f
STAGE2
chmod 755 /mnt/root/run/vxnet-stage2
exec switch_root /mnt/root /run/vxnet-stage2
"""


class GuestUnavailable(Exception):
    """qemu, the kernel package or busybox cannot be had here: the caller skips with this reason."""


@dataclasses.dataclass
class GuestImage:
    vmlinux: str
    initramfs: str
    kernel_release: str


@dataclasses.dataclass
class GuestResult:
    exit_code: Optional[int]  # None: no exit marker (crashed, timed out)
    output: str
    seconds: float
    timed_out: bool

    @property
    def boot_seconds(self) -> Optional[float]:
        match = re.search(r"vxnet-guest: up ([0-9.]+) s", self.output)
        return float(match.group(1)) if match else None


def _run(argv: Sequence[str], cwd: Optional[str] = None, timeout: float = 300) -> str:
    proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise GuestUnavailable(f"`{' '.join(argv)}` failed: {(proc.stderr or proc.stdout).strip()[-400:]}")
    return proc.stdout


def check_host() -> None:
    """Raise GuestUnavailable with the reason if this machine cannot run the guest."""
    if os.geteuid() != 0:
        raise GuestUnavailable("the ESP guest needs root (9p export of / and namespaces inside)")
    if shutil.which(QEMU) is None:
        raise GuestUnavailable(f"{QEMU} is not installed (scripts/install-deps.sh installs qemu-system-x86)")
    if not os.path.exists(BUSYBOX) or "statically linked" not in _file_kind(BUSYBOX):
        raise GuestUnavailable(f"{BUSYBOX} is not a static busybox (apt-get install busybox-static)")
    for tool in ("apt-get", "apt-cache", "dpkg"):
        if shutil.which(tool) is None:
            raise GuestUnavailable(f"{tool} is missing: the guest kernel comes from Debian's archive")


def _file_kind(path: str) -> str:
    """'statically linked' if the ELF has no PT_INTERP segment (what `file` would say), else 'dynamic'."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return "not an ELF64 file"
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        if struct.unpack_from("<I", table, i * phentsize)[0] == 3:  # PT_INTERP
            return "dynamic"
    return "statically linked"


# -- kernel --------------------------------------------------------------------------------------------------------
def _kernel_package() -> str:
    """The versioned package linux-image-amd64 depends on, e.g. linux-image-6.1.0-56-amd64."""
    out = _run(["apt-cache", "depends", META_PACKAGE])
    match = re.search(r"Depends:\s+(linux-image-6\.1\.\S+-amd64)\b", out)
    if not match:
        raise GuestUnavailable(f"apt-cache knows no linux-image-6.1.*-amd64 behind {META_PACKAGE}: {out.strip()[:200]}")
    return match.group(1)


def _unpack_kernel(package: str) -> str:
    """build/ipsec-guest/<package>/ with the package's files (cached)."""
    root = os.path.join(BUILD, package)
    if os.path.isdir(os.path.join(root, "lib", "modules")):
        return root
    debs = os.path.join(BUILD, "debs")
    os.makedirs(debs, exist_ok=True)
    found = glob.glob(os.path.join(debs, f"{package}_*.deb"))
    if not found:
        _run(["apt-get", "download", "-q", package], cwd=debs)
        found = glob.glob(os.path.join(debs, f"{package}_*.deb"))
    if not found:
        raise GuestUnavailable(f"apt-get download {package} produced no .deb")
    partial = root + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    _run(["dpkg", "-x", found[0], partial])
    os.rename(partial, root)
    return root


def extract_vmlinux(bzimage: str, out: str) -> None:
    """The ELF vmlinux inside a bzImage: the xz stream after the setup code (Debian's kernels are xz-compressed)."""
    with open(bzimage, "rb") as f:
        data = f.read()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise GuestUnavailable(f"{bzimage}: no xz payload found (not an xz-compressed bzImage)")
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    elf = decompressor.decompress(data[start:])
    if elf[:4] != b"\x7fELF":
        raise GuestUnavailable(f"{bzimage}: the xz payload is not an ELF vmlinux")
    with open(out + ".tmp", "wb") as f:
        f.write(elf)
    os.rename(out + ".tmp", out)


# -- modules -------------------------------------------------------------------------------------------------------
def modinfo(path: str) -> Dict[str, List[str]]:
    """The .modinfo section of a kernel module: key -> values (`depends`, `softdep`, `name`, ...)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not an ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i):
        base = shoff + i * shentsize
        name, = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        if data[str_off + name:].split(b"\0", 1)[0] == b".modinfo":
            out: Dict[str, List[str]] = {}
            for item in data[offset:offset + size].split(b"\0"):
                if b"=" in item:
                    key, value = item.decode(errors="replace").split("=", 1)
                    out.setdefault(key, []).append(value)
            return out
    return {}


def _norm(name: str) -> str:
    return name.replace("-", "_")


def module_order(modules_dir: str, wanted: Sequence[str]) -> List[Tuple[str, str]]:
    """(name, path) for the wanted modules and everything they depend on, dependencies first."""
    index = {}
    for path in glob.glob(os.path.join(modules_dir, "kernel", "**", "*.ko"), recursive=True):
        index[_norm(os.path.basename(path)[:-3])] = path
    builtin = set()
    builtin_file = os.path.join(modules_dir, "modules.builtin")
    if os.path.exists(builtin_file):
        with open(builtin_file) as f:
            builtin = {_norm(os.path.basename(line.strip())[:-3]) for line in f if line.strip()}
    order: List[Tuple[str, str]] = []
    seen = set()

    def visit(name: str, chain: Tuple[str, ...]) -> None:
        name = _norm(name)
        if name in seen or name in builtin:
            return
        if name in chain:
            raise GuestUnavailable(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        path = index.get(name)
        if path is None:
            raise GuestUnavailable(f"kernel module {name} is not in {modules_dir}")
        info = modinfo(path)
        deps = [d for d in ",".join(info.get("depends", [])).split(",") if d]
        for soft in info.get("softdep", []):  # "pre: a b post: c": the pre ones load first
            match = re.search(r"pre:\s*([^:]*?)(?:\s+post:|$)", soft)
            if match:
                deps += match.group(1).split()
        for dep in deps:
            if _norm(dep) in index or _norm(dep) in builtin:
                visit(dep, chain + (name,))
        seen.add(name)
        order.append((name, path))

    for name in wanted:
        visit(name, ())
    return order


# -- initramfs -----------------------------------------------------------------------------------------------------
class _Cpio:
    """A newc cpio archive, as the kernel unpacks into its initial root."""

    def __init__(self):
        self.out = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        name_bytes = name.encode() + b"\0"
        header = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_bytes), 0))
        self.ino += 1
        self.out.write(header.encode() + name_bytes)
        self.out.write(b"\0" * ((4 - (110 + len(name_bytes)) % 4) % 4))
        self.out.write(data)
        self.out.write(b"\0" * ((4 - len(data) % 4) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.out.getvalue()


def build_initramfs(modules: List[Tuple[str, str]], out: str) -> None:
    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "mnt", "modules"):
        cpio.directory(d)
    with open(BUSYBOX, "rb") as f:
        cpio.file("bin/busybox", f.read(), 0o755)
    cpio.file("init", _INIT.encode(), 0o755)
    for name, path in modules:
        with open(path, "rb") as f:
            cpio.file(f"modules/{name}.ko", f.read())
    cpio.file("modules/order", ("\n".join(name for name, _ in modules) + "\n").encode())
    with open(out + ".tmp", "wb") as f:
        f.write(cpio.finish())
    os.rename(out + ".tmp", out)


def prepare() -> GuestImage:
    """Kernel and initramfs under build/ipsec-guest/, made once and reused while their inputs are unchanged."""
    check_host()
    try:
        package = _kernel_package()
    except GuestUnavailable:
        # No apt lists (offline, never updated): a kernel unpacked by an earlier run serves as well.
        unpacked = sorted(d for d in glob.glob(os.path.join(BUILD, "linux-image-6.1.*-amd64")) if os.path.isdir(d))
        if not unpacked:
            raise
        package = os.path.basename(unpacked[-1])
    root = _unpack_kernel(package)
    releases = os.listdir(os.path.join(root, "lib", "modules"))
    if len(releases) != 1:
        raise GuestUnavailable(f"{package}: expected one kernel release in lib/modules, found {releases}")
    release = releases[0]
    vmlinux = os.path.join(root, "vmlinux")
    if not os.path.exists(vmlinux):
        extract_vmlinux(os.path.join(root, "boot", f"vmlinuz-{release}"), vmlinux)
    with open(BUSYBOX, "rb") as f:
        busybox_digest = hashlib.sha256(f.read()).hexdigest()
    inputs = hashlib.sha256("\n".join([release, busybox_digest, _INIT, *MODULES]).encode()).hexdigest()[:16]
    initramfs = os.path.join(BUILD, f"initramfs-{inputs}.cpio")
    if not os.path.exists(initramfs):
        build_initramfs(module_order(os.path.join(root, "lib", "modules", release), MODULES), initramfs)
    return GuestImage(vmlinux=vmlinux, initramfs=initramfs, kernel_release=release)


# -- running -------------------------------------------------------------------------------------------------------


def _virtfs(path: str, tag: str) -> List[str]:
    # qemu splits option values at commas; a literal comma in a path is written twice (QemuOpts escaping).
    return ["-virtfs", f"local,path={path.replace(',', ',,')},mount_tag={tag},security_model=none,readonly=on,"
                       "multidevs=remap"]


def qemu_argv(image: GuestImage, run_dir: str, checkout: str = REPO, memory_mb: int = 1024,
              cpus: int = 2) -> List[str]:
    """run_dir holds command.sh and the file `checkout` (the checkout's path); see _INIT."""
    return [
        QEMU, "-accel", "tcg,thread=multi", "-cpu", "max", "-m", str(memory_mb), "-smp", str(cpus),
        "-machine", "pc", "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
        "-monitor", "none", "-nic", "none", "-no-reboot",
        "-kernel", image.vmlinux, "-initrd", image.initramfs,
        "-append", "console=ttyS0 panic=-1 loglevel=4 no_timer_check rdinit=/init",
        *_virtfs("/", "hostroot"), *_virtfs(run_dir, "vxnetrun"), *_virtfs(checkout, "checkout"),
    ]


def write_run_dir(run_dir: str, command: Sequence[str], cwd: str, checkout: str) -> None:
    """command.sh (cd to cwd, exec the command, every word quoted for sh) and `checkout`, the path at which the
    guest mounts the checkout share (read with $(cat), which drops the final newline; the path is expanded once,
    quoted, so spaces and shell characters in it stay as they are)."""
    if not os.path.isabs(checkout) or "\n" in checkout or "\0" in checkout:
        raise ValueError(f"checkout path {checkout!r}: must be absolute, without newline or NUL")
    with open(os.path.join(run_dir, "command.sh"), "w") as f:
        f.write(f"cd {shlex.quote(cwd)} && exec {' '.join(shlex.quote(a) for a in command)}\n")
    with open(os.path.join(run_dir, "checkout"), "w") as f:
        f.write(checkout + "\n")
    os.chmod(run_dir, 0o755)


def run(image: GuestImage, command: Sequence[str], timeout: float = 240, cwd: str = REPO,
        stream=None, memory_mb: int = 1024) -> GuestResult:
    """Boot the guest, run `command` (argv, executed in `cwd` with the host's tools), power off. The whole
    serial console is returned; `stream`, if given, receives it as it comes (a file object). The checkout is
    mounted in the guest at its host path; any other cwd must be on the host root outside /run and /tmp."""
    scratch = tempfile.mkdtemp(prefix="vxnet-guest-")
    try:
        write_run_dir(scratch, command, cwd, REPO)
        start = time.monotonic()
        proc = subprocess.Popen(qemu_argv(image, scratch, REPO, memory_mb=memory_mb), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        chunks = []
        timed_out = False
        os.set_blocking(proc.stdout.fileno(), False)
        while True:
            if time.monotonic() - start > timeout:
                timed_out = True
                proc.kill()
            data = proc.stdout.read()
            if data:
                chunks.append(data)
                if stream is not None:
                    stream.write(data.decode(errors="replace"))
                    stream.flush()
            if proc.poll() is not None:
                rest = proc.stdout.read()
                if rest:
                    chunks.append(rest)
                break
            time.sleep(0.05)
        output = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
        match = re.search(rf"{EXIT_MARKER} (\d+)", output)
        return GuestResult(exit_code=int(match.group(1)) if match else None, output=output,
                           seconds=time.monotonic() - start, timed_out=timed_out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    if args[:1] == ["--"]:
        args = args[1:]
    try:
        t0 = time.monotonic()
        image = prepare()
        print(f"guest: kernel {image.kernel_release} ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    except GuestUnavailable as exc:
        print(f"guest unavailable: {exc}", file=sys.stderr)
        return 2
    result = run(image, args or ["uname", "-a"], stream=sys.stdout)
    print(f"\nguest: exit {result.exit_code}, {result.seconds:.1f} s in qemu, booted in {result.boot_seconds} s",
          file=sys.stderr)
    return 1 if result.exit_code is None else result.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
