# Shared by run-demo.sh and clean-run.sh: where things live, and stopping a process by its pid file.
# Every path can be moved through the environment (the tests run the demo inside a simulated host).

RUN_DIR=${VXNET_RUN_DIR:-/run/vxnet}               # pid files
LOG_DIR=${VXNET_LOG_DIR:-/var/log}                 # vxnet.log, vxnet-dockerd.log
DOCKER_SOCK=${VXNET_DOCKER_SOCK:-/var/run/docker.sock}
PLUGIN_PID=$RUN_DIR/plugin.pid
DOCKERD_PID=$RUN_DIR/dockerd.pid                   # only when run-demo.sh started dockerd itself
DEMO_NET=vxnet-demo
DEMO_SUBNET=${VXNET_DEMO_SUBNET:-10.213.250.0/24}
DEMO_CONTAINERS=(vxnet-demo-1 vxnet-demo-2)
PYTHON=${PYTHON:-python3}
BIN_DIR=${VXNET_BIN_DIR:-/usr/local/bin}            # where `make run` puts the vxnet command
VXNET_CMD=$BIN_DIR/vxnet
# The first lines of the command `make run` writes: `make clean-run` removes a vxnet command only if it has them
# (never one that pip installed).
VXNET_CMD_MARK="# vxnet command written by make run (scripts/run-demo.sh); make clean-run removes it"

docker_() { docker -H "unix://$DOCKER_SOCK" "$@"; }

docker_answers() { docker_ version >/dev/null 2>&1; }

# pid_alive FILE PATTERN: the pid in FILE runs and its command line contains PATTERN (a reused pid does not count).
pid_alive() {
  local pid
  [ -f "$1" ] || return 1
  pid=$(cat "$1")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$2"
}

# stop_pidfile FILE PATTERN WHAT: SIGTERM, wait up to 20 s, then SIGKILL; remove the pid file.
stop_pidfile() {
  local file=$1 pattern=$2 what=$3 pid i
  if pid_alive "$file" "$pattern"; then
    pid=$(cat "$file")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 200; i++)); do
      pid_alive "$file" "$pattern" || break
      sleep 0.1
    done
    if pid_alive "$file" "$pattern"; then
      echo "$what (pid $pid) did not stop in 20 s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    echo "stopped $what (pid $pid)"
  fi
  rm -f "$file"
}

# wait_for SECONDS WHAT CMD...: run CMD every 0.2 s until it succeeds; fail after SECONDS.
wait_for() {
  local seconds=$1 what=$2 deadline
  shift 2
  deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "timed out after ${seconds}s waiting for $what" >&2
      return 1
    fi
    sleep 0.2
  done
}
