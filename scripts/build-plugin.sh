#!/usr/bin/env bash
# `make plugin`: build the vxnet managed plugin and install it on a Docker engine (the docker CLI's, so
# DOCKER_HOST is honoured):
#   1. the rootfs image from ./Dockerfile: on debian:bookworm-slim when the engine has it, else on a base made
#      here with debootstrap (cached in build/plugin-base/); Python dependencies from wheels downloaded here
#      (build/plugin-wheels/), so nothing inside the build needs Docker Hub, Debian's mirror or PyPI;
#   2. build/plugin/ = config.json + rootfs/ (docker export of the image), the same for every version;
#   3. build/plugin-<version>/ = config.json + the same rootfs as hard links, with its own /opt/vxnet/VERSION (the
#      only file two versions of one tree differ in; wire/version.py reads it): `docker plugin create NAME
#      build/plugin-<version>` installs it on any other engine, scripts/push-plugin.sh pushes it;
#   4. docker plugin rm -f NAME (if present), create, set KEY=VALUE..., enable.
# A re-run whose inputs (code, Dockerfile, requirements, base) did not change skips 1-2 and only re-installs.
# The version: pyproject.toml's [project] version, or VXNET_VERSION (`make plugin VERSION=0.2.0`); pyproject.toml
# itself is never changed.
#
# Usage: scripts/build-plugin.sh [--rebuild] [--no-install] [--no-enable] [KEY=VALUE ...]
#   KEY=VALUE    plugin settings (config.json env) applied before enabling, e.g. VXNET_SCOPE=local
#   --rebuild    build and export even if build/plugin/ is up to date
#   --no-install only build build/plugin/ and build/plugin-<version>/
#   --no-enable  create (and set) the plugin, leave it disabled
# Environment: DOCKER_HOST; VXNET_VERSION (default: pyproject's); VXNET_PLUGIN_NAME (default vxnet:latest);
# VXNET_PLUGIN_BASE (base image; default debian:bookworm-slim if the engine has it, else the local debootstrap
# one); VXNET_DEBIAN_MIRROR (for debootstrap; default http://deb.debian.org/debian).
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=${VXNET_PLUGIN_NAME:-vxnet:latest}
IMAGE=vxnet-plugin-rootfs:latest
OUT=build/plugin
PYTHON=${PYTHON:-python3}
# wire/version.py checks it (MAJOR.MINOR.PATCH[-PRERELEASE]: it becomes a Docker tag) and says why not.
VERSION=$("$PYTHON" -m wire.version "${VXNET_VERSION:-}") || exit 2
VOUT=build/plugin-$VERSION
STAMP=build/plugin.inputs # digest of what build/plugin/rootfs was built from
WHEELS=build/plugin-wheels
BASE_DIR=build/plugin-base
MIRROR=${VXNET_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
PYVER=3.11 # bookworm's python3: the wheels must match it
# The Dockerfile's APT_PACKAGES, put into the local base so that its apt step has nothing to fetch.
BASE_PACKAGES=$(sed -n 's/^ARG APT_PACKAGES="\(.*\)"$/\1/p' Dockerfile)
BASE_RECIPE=1 # bump when the base's recipe below changes
export DOCKER_BUILDKIT=0 # docker.io 20.10 has no buildx; the Dockerfile needs nothing newer

rebuild=0 install=1 enable=1
settings=()
for arg in "$@"; do
  case $arg in
    --rebuild) rebuild=1 ;;
    --no-install) install=0 ;;
    --no-enable) enable=0 ;;
    *=*) settings+=("$arg") ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-plugin: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

say() { printf 'build-plugin: %s\n' "$*"; }
die() { printf 'build-plugin: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
sha() { sha256sum | cut -c1-16; }

started=$(now)
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 ||
  die "no Docker engine answers at ${DOCKER_HOST:-the default socket}: start dockerd or set DOCKER_HOST"

mkdir -p build
# One build at a time per checkout (tests may install on several engines at once).
exec 9>build/.plugin-build.lock
flock 9

# --- the base image ----------------------------------------------------------------------------------------------
# debootstrap in two stages: the first downloads and unpacks (network), the second configures the packages
# offline inside fresh namespaces, behind a policy-rc.d, so no maintainer script can start a daemon on this
# machine (etcd-server's would) and every mount it makes dies with it.
make_base_tar() {
  local tar=$1 root=$BASE_DIR/rootfs
  command -v debootstrap >/dev/null || {
    [ "$(id -u)" -eq 0 ] || die "debootstrap is missing (apt-get install debootstrap, as root)"
    say "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null ||
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null; }
  }
  [ "$(id -u)" -eq 0 ] || die "making the base image with debootstrap needs root"
  rm -rf "$root"
  mkdir -p "$root/usr/sbin"
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod 755 "$root/usr/sbin/policy-rc.d"
  say "debootstrap $SUITE (minbase + ${BASE_PACKAGES// /,}) from $MIRROR: about a minute, once"
  local log=$BASE_DIR/debootstrap.log
  if ! unshare --mount --propagation private -- debootstrap --foreign --variant=minbase \
    --include="${BASE_PACKAGES// /,}" "$SUITE" "$root" "$MIRROR" >"$log" 2>&1 ||
    ! unshare --net --mount --pid --fork --propagation private -- \
      chroot "$root" /debootstrap/debootstrap --second-stage >>"$log" 2>&1; then
    tail -n 30 "$log" >&2
    die "debootstrap failed (log: $log)"
  fi
  # What a container image needs no copy of: caches, docs (copyright kept), manuals, locales, logs, devices.
  rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/log/* "$root"/usr/share/man/* \
    "$root"/usr/share/info/* "$root"/usr/share/locale/* "$root"/usr/share/lintian "$root"/usr/share/bug \
    "$root"/dev/* "$root"/run/* "$root"/tmp/* "$root"/etc/resolv.conf "$root"/etc/hostname
  find "$root/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
  printf 'deb %s %s main\ndeb %s %s-updates main\n' "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" >"$root/etc/apt/sources.list"
  tar -C "$root" --numeric-owner -cf "$tar.tmp" .
  mv "$tar.tmp" "$tar"
  rm -rf "$root"
}

# Sets BASE (the image the Dockerfile builds on) and BASE_ID (what identifies its content, the same on every
# engine, so a fresh engine does not force a rebuild); the local base is imported by ensure_base, only when
# something is built.
choose_base() {
  if [ -n "${VXNET_PLUGIN_BASE:-}" ] || docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
    BASE=${VXNET_PLUGIN_BASE:-debian:bookworm-slim}
    BASE_ID=$(docker image inspect --format '{{.Id}}' "$BASE" 2>/dev/null) ||
      die "the engine has no image $BASE (VXNET_PLUGIN_BASE)"
    BASE_TAR=
    return
  fi
  local key
  key=$(printf '%s %s %s %s' "$BASE_RECIPE" "$SUITE" "$BASE_PACKAGES" "$MIRROR" | sha)
  BASE=vxnet-build/$SUITE-base:$key
  BASE_ID=local-$key
  BASE_TAR=$BASE_DIR/$SUITE-base-$key.tar
}

ensure_base() {
  [ -n "$BASE_TAR" ] || return 0
  docker image inspect "$BASE" >/dev/null 2>&1 && return
  mkdir -p "$BASE_DIR"
  if [ ! -f "$BASE_TAR" ]; then
    local t
    t=$(now)
    make_base_tar "$BASE_TAR"
    say "base rootfs made in $(since "$t")s ($(du -sh "$BASE_TAR" | cut -f1))"
  fi
  say "docker import $BASE_TAR as $BASE"
  docker import -c 'CMD ["/bin/bash"]' "$BASE_TAR" "$BASE" >/dev/null
}

# --- wheels ------------------------------------------------------------------------------------------------------
fetch_wheels() {
  local want have
  want=$(cat scripts/plugin-requirements.txt | sha)
  have=$(cat "$WHEELS/.requirements" 2>/dev/null || true)
  [ "$want" = "$have" ] && return
  say "downloading wheels for python $PYVER into $WHEELS/"
  rm -rf "$WHEELS"
  mkdir -p "$WHEELS"
  local log=build/plugin-wheels.log
  # pip itself comes along, so the build can install without Debian's python3-pip.
  if ! "$PYTHON" -m pip download -q -d "$WHEELS" --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --abi "cp${PYVER/./}" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any \
    -r scripts/plugin-requirements.txt pip >"$log" 2>&1; then
    grep -v '^WARNING: Location' "$log" | tail -n 20 >&2
    die "pip download failed (log: $log)"
  fi
  echo "$want" >"$WHEELS/.requirements"
}

# --- inputs of the rootfs: when none changed, build/plugin/rootfs is current ----------------------------------
inputs_digest() {
  {
    echo "base $BASE $BASE_ID"
    sha256sum Dockerfile .dockerignore scripts/plugin-requirements.txt
    find plugin netdriver ipam_driver encrypt kernel store telemetry cli wire -name '*.py' -type f -print0 | sort -z | xargs -0 sha256sum
  } | sha
}

build_rootfs() {
  local t log cid
  t=$(now)
  log=build/plugin-build.log
  say "docker build $IMAGE (BASE=$BASE; log: $log)"
  if ! docker build --build-arg "BASE=$BASE" -t "$IMAGE" . >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    die "docker build failed (log: $log)"
  fi
  say "built in $(since "$t")s"
  t=$(now)
  rm -rf "$OUT.new"
  mkdir -p "$OUT.new/rootfs"
  cid=$(docker create "$IMAGE")
  if ! docker export "$cid" | tar -x -C "$OUT.new/rootfs"; then
    docker rm -f "$cid" >/dev/null 2>&1 || true
    die "docker export failed"
  fi
  docker rm -f "$cid" >/dev/null
  rm -rf "$OUT" "$STAMP"
  mv "$OUT.new" "$OUT"
  say "rootfs exported to $OUT/rootfs in $(since "$t")s ($(du -sh "$OUT/rootfs" | cut -f1))"
}

choose_base
digest=$(inputs_digest)
if [ "$rebuild" = 1 ] || [ ! -d "$OUT/rootfs" ] || [ "$(cat "$STAMP" 2>/dev/null || true)" != "$digest" ]; then
  ensure_base
  fetch_wheels
  build_rootfs
  echo "$digest" >"$STAMP"
else
  say "$OUT/rootfs is up to date ($(du -sh "$OUT/rootfs" | cut -f1))"
fi
cp config.json "$OUT/config.json"
# The tree's own version in build/plugin/ (rm first: build/plugin-<version>/ may hold a hard link to the old one).
rm -f "$OUT/rootfs/opt/vxnet/VERSION"
"$PYTHON" -m wire.version >"$OUT/rootfs/opt/vxnet/VERSION"

# build/plugin-<version>/: hard links (no second copy of the rootfs), its own VERSION file and config.json.
want="$digest $VERSION $(sha256sum config.json | cut -c1-16)"
if [ ! -d "$VOUT/rootfs" ] || [ "$(cat "$VOUT.inputs" 2>/dev/null || true)" != "$want" ]; then
  rm -rf "$VOUT.new"
  mkdir -p "$VOUT.new"
  cp -al "$OUT/rootfs" "$VOUT.new/rootfs"
  rm -f "$VOUT.new/rootfs/opt/vxnet/VERSION"
  printf '%s\n' "$VERSION" >"$VOUT.new/rootfs/opt/vxnet/VERSION"
  cp config.json "$VOUT.new/config.json"
  rm -rf "$VOUT" "$VOUT.inputs"
  mv "$VOUT.new" "$VOUT"
  echo "$want" >"$VOUT.inputs"
  say "$VOUT: vxnet $VERSION"
fi
flock -u 9

[ "$install" = 1 ] || { say "done in $(since "$started")s: $VOUT"; exit 0; }

# --- install on the engine ------------------------------------------------------------------------------------
if docker plugin inspect "$NAME" >/dev/null 2>&1; then
  # Its propagated mount (the embedded etcd's data) goes with it: networks that use it outlive it in dockerd
  # only, and the new plugin knows nothing of them unless ETCD_ENDPOINTS names a shared etcd.
  nets=$(docker network ls --filter "driver=$NAME" --format '{{.Name}}' | tr '\n' ' ')
  [ -z "$nets" ] || say "warning: replacing $NAME while networks use it: $nets"
  docker plugin rm -f "$NAME" >/dev/null
fi
t=$(now)
docker plugin create "$NAME" "$VOUT" >/dev/null
say "docker plugin create $NAME in $(since "$t")s"
if [ ${#settings[@]} -gt 0 ]; then
  docker plugin set "$NAME" "${settings[@]}"
fi
if [ "$enable" = 1 ] && ! docker plugin enable "$NAME" >/dev/null; then
  die "$NAME did not start: its output is in dockerd's log, on lines with plugin=$(docker plugin inspect --format '{{.Id}}' "$NAME")"
fi
say "done in $(since "$started")s: $NAME $(docker plugin inspect --format '{{if .Enabled}}enabled{{else}}disabled{{end}} (id {{printf "%.12s" .Id}}' "$NAME"), vxnet $VERSION)"
