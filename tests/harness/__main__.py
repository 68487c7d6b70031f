"""Bring simulated Docker hosts up by hand for debugging, and down again.

    python3 -m tests.harness up [-n 3] [--plugin]   # underlay + etcd + N hosts (+ the vxnet plugin in each)
    python3 -m tests.harness status
    python3 -m tests.harness shell host1 [CMD...]   # a shell (or CMD) inside host1
    python3 -m tests.harness down

The state (PIDs with start times, folders) is kept in build/lab.json; `down` removes exactly what it lists.
"""

import argparse
import os
import sys
import time

from tests.harness.hosts import Lab, shell_command
from tests.harness.plugin import REPO, Plugin

STATE = os.path.join(REPO, "build", "lab.json")


def _describe(lab: Lab) -> str:
    lines = [f"etcd: {lab.etcd.url} (reachable from every host; from here: "
             f"nsenter -t {lab.underlay.anchor.pid} -n etcdctl --endpoints {lab.etcd.url} ...)"]
    for host in lab.hosts:
        lines += [f"{host.name}: {host.ip}",
                  f"  export DOCKER_HOST={host.docker_host}",
                  f"  shell: {shell_command(host)}",
                  f"  logs:  {os.path.join(host.dir, 'logs')}/"]
    return "\n".join(lines)


def up(args) -> int:
    if os.path.exists(args.state):
        print(f"{args.state} exists: hosts are up already (make hosts-down first)", file=sys.stderr)
        return 1
    started = time.monotonic()
    lab = Lab().start()
    try:
        lab.add_hosts(args.n)
        if args.plugin:
            for host in lab.hosts:
                Plugin(host, lab.etcd.url).start()
        lab.save(args.state)
        lab.detach()
    except BaseException:
        lab.teardown()
        raise
    print(f"{args.n} hosts up in {time.monotonic() - started:.1f}s\n{_describe(lab)}")
    print("make hosts-down removes them")
    return 0


def down(args) -> int:
    if not os.path.exists(args.state):
        print(f"no {args.state}: nothing is up")
        return 0
    started = time.monotonic()
    errors = Lab.load(args.state).teardown()
    os.remove(args.state)
    for error in errors:
        print(f"teardown: {error}", file=sys.stderr)
    print(f"down in {time.monotonic() - started:.1f}s")
    return 1 if errors else 0


def status(args) -> int:
    if not os.path.exists(args.state):
        print("nothing is up")
        return 0
    lab = Lab.load(args.state)
    print(_describe(lab))

    def state(procs) -> str:
        return ", ".join(f"{p.name} {'up' if p.alive() else 'DOWN'}" for p in procs if p)

    print(f"underlay: {state([lab.underlay.anchor, lab.etcd.proc if lab.etcd else None])}")
    for host in lab.hosts:
        print(f"{host.name}: {state([host.anchor, host.dockerd] + host.procs)}")
    return 0


def shell(args) -> int:
    lab = Lab.load(args.state)
    host = next((h for h in lab.hosts if h.name == args.host), None)
    if host is None:
        print(f"no host {args.host}; there are {', '.join(h.name for h in lab.hosts)}", file=sys.stderr)
        return 1
    argv = host.nsenter + ["--", *(args.cmd or ["bash"])]
    os.execvp(argv[0], argv)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.harness", description=__doc__.splitlines()[0])
    parser.add_argument("--state", default=STATE, help=f"state file (default {STATE})")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the underlay, etcd and N hosts")
    p_up.add_argument("-n", type=int, default=3, help="number of hosts (default 3)")
    p_up.add_argument("--plugin", action="store_true", help="also start the vxnet plugin in each host")
    sub.add_parser("down", help="tear down what `up` made")
    sub.add_parser("status", help="what is up")
    p_sh = sub.add_parser("shell", help="run a shell or a command inside a host")
    p_sh.add_argument("host")
    p_sh.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    return {"up": up, "down": down, "status": status, "shell": shell}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
