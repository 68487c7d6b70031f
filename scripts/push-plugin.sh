#!/usr/bin/env bash
# `make push PLUGIN_REPO=host:port/vxnet [VERSION=x.y.z]`: push the managed plugin to a registry, as
# REPO:<version> and REPO:latest, with `docker plugin push` from the engine of DOCKER_HOST. Users then install it
# with `docker plugin install --grant-all-permissions REPO:<version> ETCD_ENDPOINTS=...` (README, Swarm).
#   1. scripts/build-plugin.sh --no-install: build/plugin-<version>/ (cached; the version from pyproject.toml or
#      VXNET_VERSION);
#   2. for each tag: docker plugin create REPO:tag build/plugin-<version>, docker plugin push, docker plugin rm:
#      the engine keeps nothing (its own installs are `docker plugin install`s from the registry like every node's).
# A REPO:tag already on this engine is not replaced (it may be an installed, enabled plugin): the script stops
# and says so. REPO is any plugin reference without a tag: host:port/vxnet for a local registry (the engine must
# trust it: dockerd --insecure-registry host:port for plain HTTP), USER/vxnet for Docker Hub (after docker login).
#
# Usage: scripts/push-plugin.sh REPO [--no-latest]
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
say() { printf 'push-plugin: %s\n' "$*"; }
die() { printf 'push-plugin: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

repo=${1:-}
latest=1
[ "${2:-}" = "--no-latest" ] && latest=0
case $repo in
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac
# A port before the path is fine (host:port/vxnet); a tag or a digest after the last slash is not.
last=${repo##*/}
if [ -z "$repo" ] || [ -z "$last" ] || [[ $repo == *@* ]] || [[ $last == *:* ]]; then
  die "PLUGIN_REPO: '$repo' must name a repository without a tag (host:port/vxnet, user/vxnet)"
fi
VERSION=$("$PYTHON" -m wire.version "${VXNET_VERSION:-}") || exit 2
export VXNET_VERSION=$VERSION

scripts/build-plugin.sh --no-install
dir=build/plugin-$VERSION
tags=("$VERSION")
[ "$latest" = 1 ] && tags+=(latest)
for tag in "${tags[@]}"; do
  ref=$repo:$tag
  docker plugin inspect "$ref" >/dev/null 2>&1 &&
    die "$ref is already on this engine: push from an engine without it, or docker plugin rm it first"
done
for tag in "${tags[@]}"; do
  ref=$repo:$tag
  t=$(now)
  docker plugin create "$ref" "$dir" >/dev/null
  if ! docker plugin push "$ref"; then
    docker plugin rm -f "$ref" >/dev/null 2>&1 || true
    die "docker plugin push $ref failed (a registry serving plain HTTP must be in dockerd's --insecure-registry)"
  fi
  docker plugin rm -f "$ref" >/dev/null
  say "pushed $ref in $(since "$t")s"
done
say "install with: docker plugin install --grant-all-permissions $repo:$VERSION ETCD_ENDPOINTS=..."
