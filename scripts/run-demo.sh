#!/usr/bin/env bash
# `make run`: on this machine (as root), start dockerd if none answers, the vxnet plugin with its embedded etcd,
# a vxnet network and two containers that ping each other; print what was made. `make clean-run` removes it.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

mkdir -p "$RUN_DIR" "$LOG_DIR"

# 1. dockerd: use the one that answers, else start one (in the background, with a pid file).
if ! docker_answers; then
  echo "starting dockerd (log: $LOG_DIR/vxnet-dockerd.log)"
  setsid dockerd --host "unix://$DOCKER_SOCK" </dev/null >>"$LOG_DIR/vxnet-dockerd.log" 2>&1 &
  echo $! >"$DOCKERD_PID"
  if ! wait_for 60 "dockerd on $DOCKER_SOCK" docker_answers; then
    tail -n 20 "$LOG_DIR/vxnet-dockerd.log" >&2
    exit 1
  fi
fi

# 2. An image: busybox:latest if the daemon has it, else one built from Debian's busybox-static.
image=busybox:latest
if ! docker_ image inspect "$image" >/dev/null 2>&1; then
  image=vxnet-test/busybox:latest
  "$PYTHON" -m tests.harness.images --host "unix://$DOCKER_SOCK"
fi

# 3. The plugin, with its embedded etcd (ETCD_ENDPOINTS empty), unless ours already runs.
socket=${VXNET_SOCKET:-/run/docker/plugins/vxnet.sock}
plugin_answers() {
  "$PYTHON" -c 'import json, sys; from tests.harness.unixhttp import request
status, body = request(sys.argv[1], "POST", "/Plugin.Activate", timeout=2)
sys.exit(0 if status == 200 and "NetworkDriver" in json.loads(body)["Implements"] else 1)' "$socket"
}
if ! pid_alive "$PLUGIN_PID" "-m plugin"; then
  echo "starting the vxnet plugin (log: $LOG_DIR/vxnet.log)"
  ETCD_ENDPOINTS="" PYTHONPATH="$PWD" setsid "$PYTHON" -m plugin </dev/null >>"$LOG_DIR/vxnet.log" 2>&1 &
  echo $! >"$PLUGIN_PID"
fi
if ! wait_for 60 "the plugin on $socket" plugin_answers; then
  tail -n 30 "$LOG_DIR/vxnet.log" >&2
  exit 1
fi

# The operator's command (cli/): a wrapper that runs it from this checkout, with the Python that runs the plugin.
if [ ! -e "$VXNET_CMD" ] || grep -qxF "$VXNET_CMD_MARK" "$VXNET_CMD"; then
  mkdir -p "$BIN_DIR"
  cat >"$VXNET_CMD.tmp" <<WRAPPER
#!/bin/sh
$VXNET_CMD_MARK
PYTHONPATH="$PWD\${PYTHONPATH:+:\$PYTHONPATH}" exec $(command -v "$PYTHON") -m cli "\$@"
WRAPPER
  chmod 755 "$VXNET_CMD.tmp"
  mv "$VXNET_CMD.tmp" "$VXNET_CMD"
else
  echo "keeping $VXNET_CMD (not written by make run)"
fi

# 4. The network and two containers (made again if an earlier run left them).
if ! docker_ network inspect "$DEMO_NET" >/dev/null 2>&1; then
  docker_ network create -d vxnet --ipam-driver vxnet --subnet "$DEMO_SUBNET" "$DEMO_NET" >/dev/null
fi
for c in "${DEMO_CONTAINERS[@]}"; do
  docker_ rm -f "$c" >/dev/null 2>&1 || true
  docker_ run -d --init --name "$c" --network "$DEMO_NET" "$image" sleep 86400 >/dev/null
done
ip_of() { docker_ inspect -f "{{(index .NetworkSettings.Networks \"$DEMO_NET\").IPAddress}}" "$1"; }
ip1=$(ip_of "${DEMO_CONTAINERS[0]}")
ip2=$(ip_of "${DEMO_CONTAINERS[1]}")

# 5. They talk: by address, then by name.
wait_for 20 "${DEMO_CONTAINERS[0]} to reach $ip2" docker_ exec "${DEMO_CONTAINERS[0]}" ping -c 1 -W 1 "$ip2"
echo
docker_ exec "${DEMO_CONTAINERS[0]}" ping -c 3 "$ip2"
docker_ exec "${DEMO_CONTAINERS[1]}" ping -c 1 "${DEMO_CONTAINERS[0]}" | tail -n 1

cat <<SUMMARY

vxnet demo is up:
  network    $DEMO_NET ($(docker_ network inspect -f '{{.Id}}' "$DEMO_NET" | cut -c1-12), driver vxnet, ipam vxnet, subnet $DEMO_SUBNET)
  container  ${DEMO_CONTAINERS[0]}  $ip1
  container  ${DEMO_CONTAINERS[1]}  $ip2
  plugin     pid $(cat "$PLUGIN_PID"), socket $socket, log $LOG_DIR/vxnet.log
  command    $VXNET_CMD (vxnet gc --dry-run, vxnet keys status, ...)
Try: docker exec -it ${DEMO_CONTAINERS[0]} sh
'make clean-run' removes it all.
SUMMARY
