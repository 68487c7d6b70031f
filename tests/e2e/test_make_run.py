"""`make run` and `make clean-run` (scripts/run-demo.sh, scripts/clean-run.sh), run inside a simulated host that
has no dockerd yet, as on a fresh machine: the demo starts dockerd and the plugin itself, and cleans up after."""

import json
import os

from tests.harness.plugin import REPO
from tests.harness.proc import running, wait_until


def test_make_run_shows_two_containers_talking_and_clean_run_removes_everything(hosts):
    (host,) = hosts(1, docker=False)
    env = dict(os.environ,
               VXNET_ADVERTISE_ADDR=host.ip,  # a simulated host has no default route to take it from
               VXNET_STATE_DIR=os.path.join(host.dir, "vxnet"),  # /var/lib/vxnet is not per host
               VXNET_LOG_DIR=os.path.join(host.dir, "logs"),  # nor is /var/log
               VXNET_BIN_DIR=os.path.join(host.dir, "bin"))  # nor is /usr/local/bin
    command = os.path.join(host.dir, "bin", "vxnet")

    demo = host.run(["bash", "scripts/run-demo.sh"], env=env, cwd=REPO, timeout=240, check=False)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "vxnet demo is up" in demo.stdout
    assert "make clean-run" in demo.stdout
    assert "3 packets transmitted, 3 packets received" in demo.stdout
    assert demo.stdout.count("10.213.250.") >= 2
    pid_files = {name: host.path(f"/run/vxnet/{name}.pid") for name in ("plugin", "dockerd")}
    pids = {name: int(open(path).read()) for name, path in pid_files.items()}
    assert [ns for ns in host.netns() if ns.startswith("vxnet-")]
    # The vxnet command is on the host and talks to the demo's embedded etcd (from any directory).
    gc = host.run([command, "gc", "--dry-run", "--json"], env=env, cwd="/", timeout=60, check=False)
    assert gc.returncode == 0 and json.loads(gc.stdout)["hosts"] == [], gc.stdout + gc.stderr
    broken = host.run([command, "gc", "--etcd", "http://127.0.0.1:1"], env=env, cwd="/", timeout=60, check=False)
    assert broken.returncode == 2 and "etcd" in broken.stderr, broken.stdout + broken.stderr

    clean = host.run(["bash", "scripts/clean-run.sh"], env=env, cwd=REPO, timeout=120, check=False)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "removed network vxnet-demo" in clean.stdout
    for name, pid in pids.items():
        wait_until(lambda: not running(pid), 10, f"the demo's {name} (pid {pid}) to exit")
        assert not os.path.exists(pid_files[name])
    assert not [ns for ns in host.netns() if ns.startswith("vxnet-")]
    assert "removed " + command in clean.stdout and not os.path.exists(command)
