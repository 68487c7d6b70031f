"""Endpoints made by calling the plugin's HTTP API over its unix socket, as dockerd would, without containers.

CreateEndpoint + Join make the veth pair (its container end stays in the host's namespace: no container takes
it), the anti-spoofing rules and the peer record; Leave + DeleteEndpoint undo all of it.
"""

import json
import os
import time
from typing import Dict, List

from bench.common import BenchError
from bench.lab import log
from tests.harness.unixhttp import request


def call(socket: str, method: str, body: dict) -> dict:
    status, raw = request(socket, "POST", f"/NetworkDriver.{method}", body, timeout=30)
    reply = json.loads(raw or b"{}")
    if status != 200 or reply.get("Err"):
        raise BenchError(f"{method}: HTTP {status}: {reply.get('Err') or raw[:200]!r}")
    return reply


def join(socket: str, network_id: str, address: str, endpoint: Dict[str, object]) -> None:
    """CreateEndpoint then Join for `address` (a.b.c.d/len); fills endpoint["id"] first (so a failure half-way
    is still cleaned up), then "joined" (wall clock when Join returned) and "call_s"."""
    endpoint["id"] = os.urandom(32).hex()
    endpoint["network_id"] = network_id
    started = time.monotonic()
    call(socket, "CreateEndpoint", {"NetworkID": network_id, "EndpointID": endpoint["id"], "Options": {},
                                    "Interface": {"Address": address}})
    # A sandbox path no container has: the container end stays in the host (the wire refuses an empty one).
    call(socket, "Join", {"NetworkID": network_id, "EndpointID": endpoint["id"],
                          "SandboxKey": "/var/run/docker/netns/vxbench", "Options": {}})
    endpoint["joined"] = time.time()
    endpoint["call_s"] = time.monotonic() - started


def withdraw(socket: str, endpoints: List[Dict[str, object]]) -> float:
    """Leave then DeleteEndpoint for every endpoint (errors do not stop the others; Leave's return time goes in
    endpoint["left"]); returns the seconds taken."""
    started = time.monotonic()
    errors = []
    for ep in endpoints:
        if "id" not in ep:
            continue
        for method in ("Leave", "DeleteEndpoint"):
            try:
                call(socket, method, {"NetworkID": ep["network_id"], "EndpointID": ep["id"]})
                if method == "Leave":
                    ep["left"] = time.time()
            except Exception as exc:
                errors.append(f"{method} {ep.get('ip', ep['id'][:12])}: {exc}")
    if errors:
        log(f"withdrawing endpoints: {len(errors)} errors, first: {errors[0]}")
    return time.monotonic() - started
