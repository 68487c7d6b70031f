#!/usr/bin/env bash
# Install what vxnet and its tests need on a Debian 12 machine, as root. Idempotent: a fast no-op when all is present.
# apt-get update runs only when a package is missing; pip runs only when a module does not import.
set -euo pipefail

# docker.io brings dockerd 20.10, containerd, runc and tini (docker-init for `docker run --init`).
# etcd-server/etcd-client: the test etcd and etcdctl. busybox-static: the test image. The rest: the data plane
# (iproute2, nftables) and what the tests use to look at it (ping, nc, tcpdump, iperf3, unshare/nsenter, pgrep).
# qemu-system-x86: tests/ipsec boots Debian's stock kernel (it has ESP, this machine's may not) under TCG; the kernel
# package itself is fetched by the test with `apt-get download` into build/ipsec-guest/.
# debootstrap: the managed plugin's base image where no registry serves one. docker-compose: the Compose tests.
# docker-registry: the distribution registry tests/e2e/test_install.py pushes the plugin to and installs it from.
APT_PACKAGES=(
  docker.io etcd-server etcd-client busybox-static iproute2 nftables iptables iperf3 tcpdump iputils-ping
  netcat-openbsd util-linux procps make debootstrap docker-compose qemu-system-x86 docker-registry
)
# PyPI name -> import name, in pairs.
PIP_PACKAGES=(
  requests requests
  pyroute2 pyroute2
  waitress waitress
  flask flask
  cryptography cryptography
  docker docker
  pytest pytest
  hypothesis hypothesis
  ruff ruff
  import-linter importlinter
  prometheus-client prometheus_client
)
PYTHON=${PYTHON:-python3}

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: must run as root" >&2
  exit 1
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: apt: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # No package may start its service (docker.io's dockerd, etcd-server's etcd): the tests start their own.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# One interpreter start for all checks: find_spec looks a module up without importing it.
pip_missing=()
mapfile -t pip_missing < <("$PYTHON" - "${PIP_PACKAGES[@]}" <<'PY'
import importlib.util, sys
pairs = sys.argv[1:]
for dist, module in zip(pairs[::2], pairs[1::2]):
    if importlib.util.find_spec(module) is None:
        print(dist)
PY
)
if [ ${#pip_missing[@]} -gt 0 ]; then
  echo "install-deps: pip: ${pip_missing[*]}"
  # Debian's own python refuses system-wide installs (PEP 668); only then pass --break-system-packages.
  if ! out=$("$PYTHON" -m pip install -q "${pip_missing[@]}" 2>&1); then
    if grep -q externally-managed-environment <<<"$out"; then
      "$PYTHON" -m pip install -q --break-system-packages "${pip_missing[@]}"
    else
      echo "$out" >&2
      exit 1
    fi
  fi
fi
