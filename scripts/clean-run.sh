#!/usr/bin/env bash
# `make clean-run`: remove what `make run` made: its containers and network, the plugin it started, the vxnet command it
# wrote, and the dockerd it started (only if it started one). The plugin's data (VXNET_STATE_DIR) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

if docker_answers; then
  for c in "${DEMO_CONTAINERS[@]}"; do
    docker_ rm -f "$c" >/dev/null 2>&1 && echo "removed container $c" || true
  done
  # The plugin must still run here: dockerd asks it to delete the network.
  if docker_ network inspect "$DEMO_NET" >/dev/null 2>&1; then
    docker_ network rm "$DEMO_NET" >/dev/null && echo "removed network $DEMO_NET"
  fi
fi
stop_pidfile "$PLUGIN_PID" "-m plugin" "the vxnet plugin"
if [ -f "$VXNET_CMD" ] && grep -qxF "$VXNET_CMD_MARK" "$VXNET_CMD"; then
  rm -f "$VXNET_CMD" && echo "removed $VXNET_CMD"
fi
stop_pidfile "$DOCKERD_PID" dockerd "dockerd"
