"""The scope vxnet declares to dockerd (GetCapabilities' `Scope`), chosen once at start.

dockerd asks a plugin's capabilities once, when the plugin is enabled, and keeps the answer until the next enable.
What each answer means to the engine:
- `global` on a Swarm node: `docker network create -d vxnet:latest` makes a swarm-scoped network (the manager
  allocates it). On an engine outside a Swarm, every create is refused: "This node is not a swarm manager", and
  `--scope local` does not help ("cannot downgrade network scope").
- `local`: a network of this engine only (several engines still share an overlay through etcd and `-o overlay`).

VXNET_SCOPE=auto (the managed plugin's default) picks `global` on a Swarm node and `local` elsewhere; local or
global given explicitly always wins. The legacy socket plugin (the host process) defaults to `local`: Swarm refuses
legacy plugins whatever their scope, so `global` could only ever make it fail.

The one fact the choice rests on is in `engine_in_swarm`. The monitor below re-reads it and warns when the engine
joined or left a Swarm after the plugin started: the scope can only change with a `docker plugin disable` and
`enable` (dockerd re-reads the capabilities only then).
"""

import dataclasses
import logging
import os
import threading
from typing import Optional

log = logging.getLogger(__name__)

# Written by dockerd when this engine inits or joins a Swarm, deleted when it leaves (daemon/cluster: its
# persistent node state, the "docker-state.json" of the data root's swarm/ folder).
STATE_FILE = "docker-state.json"
FIX = "docker plugin disable vxnet:latest && docker plugin enable vxnet:latest (the plugin's name if not vxnet:latest)"
CHECK_SECONDS = 10.0  # one stat() per period; a mismatch is reported within this time


def engine_in_swarm(state_dir: str) -> Optional[bool]:
    """True if the engine is a Swarm node (manager or worker), False if not, None if `state_dir` (dockerd's
    <data-root>/swarm, mounted read-only in the managed plugin) is not there to tell.

    Why this file and not the host's /run/docker/swarm (which the /host/run mount shows too), checked with
    dockerd 20.10 in simulated hosts:
    - /run/docker/swarm exists on every engine, in a Swarm or not; only a *manager* has control.sock in it, a worker
      has nothing there at all.
    - dockerd restores and enables plugins while it builds the daemon, before it starts its Swarm node: a plugin
      enabled at dockerd's start on a manager runs before control.sock listens again (seen in dockerd's log: the
      plugin's first line, then "Loading containers", then "Listening for local connections ... control.sock"),
      so a look at /run would pick `local` on every Swarm node after a dockerd restart or a reboot.
    - <data-root>/swarm/docker-state.json is persistent: there on managers and workers from `swarm init`/`join`
      on, through dockerd restarts, until `swarm leave`, which deletes the folder's contents but keeps the folder
      itself (same inode), so a bind mount of the folder keeps seeing later joins and leaves.
    """
    if not os.path.isdir(state_dir):
        return None
    return os.path.exists(os.path.join(state_dir, STATE_FILE))


@dataclasses.dataclass(frozen=True)
class Choice:
    scope: str  # "local" or "global": what GetCapabilities answers until the plugin restarts
    setting: str  # VXNET_SCOPE as given: "auto", "local" or "global"
    in_swarm: Optional[bool]  # the engine's state at start, None when unknown
    why: str  # one line for the log


def choose(setting: str, state_dir: str) -> Choice:
    """The scope for VXNET_SCOPE=`setting` ("auto", "local", "global") on an engine whose Swarm state is in
    `state_dir`."""
    in_swarm = engine_in_swarm(state_dir)
    if setting != "auto":
        return Choice(setting, setting, in_swarm, f"VXNET_SCOPE={setting}")
    if in_swarm is None:
        return Choice("local", setting, in_swarm,
                      f"VXNET_SCOPE=auto, and dockerd's swarm state folder {state_dir} is missing: local (for "
                      "Swarm set VXNET_SCOPE=global, or the mount swarm-state.source=<dockerd's data root>/swarm)")
    if in_swarm:
        return Choice("global", setting, in_swarm, f"VXNET_SCOPE=auto: this engine is a Swarm node "
                                                   f"({os.path.join(state_dir, STATE_FILE)} exists)")
    return Choice("local", setting, in_swarm, "VXNET_SCOPE=auto: this engine is not in a Swarm")


def mismatch(choice: Choice, in_swarm: Optional[bool]) -> Optional[str]:
    """A warning when the declared scope does not suit the engine's Swarm state `in_swarm`, else None.

    With VXNET_SCOPE=auto every disagreement is one (the fix is a disable/enable). An explicit `global` outside a
    Swarm is one too (every `docker network create` is refused); an explicit `local` on a Swarm node is not: it is
    how local-only networks are had there (and the only scope the legacy host-process plugin can use)."""
    if in_swarm is None or (choice.setting == "local"):
        return None
    if in_swarm and choice.scope == "local":
        return (f"this engine joined a Swarm after vxnet started with scope local ({choice.why}): swarm-scoped "
                f"vxnet networks need the plugin restarted: {FIX}")
    if not in_swarm and choice.scope == "global":
        if choice.setting == "global":
            return ("VXNET_SCOPE=global but this engine is not in a Swarm: dockerd refuses every vxnet network "
                    "create with \"This node is not a swarm manager\"; use VXNET_SCOPE=auto or local "
                    "(docker plugin disable, docker plugin set vxnet:latest VXNET_SCOPE=auto, enable)")
        return (f"this engine left its Swarm after vxnet started with scope global: dockerd refuses new vxnet "
                f"networks (\"This node is not a swarm manager\") until the plugin restarts: {FIX}")
    return None


class ScopeMonitor:
    """Re-reads the engine's Swarm state every CHECK_SECONDS and logs `mismatch` once each time the state
    changes into one (and again at start, if the plugin starts mismatched)."""

    def __init__(self, choice: Choice, state_dir: str, period: float = CHECK_SECONDS):
        self.choice = choice
        self.state_dir = state_dir
        self.period = period
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last: Optional[bool] = None
        self._started = False

    def check(self) -> Optional[str]:
        """One look; returns (and logs) the warning if the state changed into a mismatch, else None."""
        in_swarm = engine_in_swarm(self.state_dir)
        if self._started and in_swarm == self._last:
            return None
        self._started, self._last = True, in_swarm
        warning = mismatch(self.choice, in_swarm)
        if warning:
            log.warning("scope: %s", warning)
        return warning

    def start(self) -> None:
        self.check()
        self._thread = threading.Thread(target=self._run, name="scope-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.check()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
