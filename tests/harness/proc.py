"""Processes we start: polling with a deadline, stopping by PID, and finding what runs inside a namespace."""

import os
import signal
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence, TypeVar, Union

T = TypeVar("T")
Command = Union[str, Sequence[str]]


class HarnessError(RuntimeError):
    """Something the harness itself could not set up or tear down."""


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Call predicate until it returns a true value, at most `timeout` seconds; return that value.

    The time-out error names `what` and, when the predicate raised on its last call, that exception.
    """
    deadline = time.monotonic() + timeout
    last_error: Optional[BaseException] = None
    while True:
        try:
            value = predicate()
            last_error = None
        except Exception as exc:  # the predicate may fail while the thing it polls is still coming up
            value, last_error = None, exc
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(interval)


def run(argv: Sequence[str], timeout: float = 60, check: bool = True, input: Optional[str] = None,
        env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run a command to completion, capturing text output; with check, a failure raises with its stderr."""
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        output = proc.stderr.strip() or proc.stdout.strip()
        raise HarnessError(f"{' '.join(argv)} exited {proc.returncode}: {output}")
    return proc


def _stat_fields(pid: int) -> Optional[List[str]]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Field 2 (comm) is in parentheses and may hold spaces: split after its closing parenthesis.
    return raw[raw.rindex(")") + 2:].split()


def running(pid: int) -> bool:
    """The PID names a live process (not a zombie waiting for its parent)."""
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] != "Z"


def start_time(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (stat field 22), or None if it is gone."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


class Proc:
    """A process we started, known by PID and start time so that a reused PID is never signalled.

    `popen` is kept when this process started it (so the exit status is reaped); a Proc rebuilt from a state file
    has none.
    """

    def __init__(self, pid: int, started: Optional[int] = None, popen: Optional[subprocess.Popen] = None,
                 name: str = ""):
        self.pid = pid
        self.started = started if started is not None else start_time(pid)
        self.popen = popen
        self.name = name or str(pid)

    @classmethod
    def spawn(cls, argv: Sequence[str], name: str, log_path: Optional[str] = None,
              env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None) -> "Proc":
        """Start argv in a new session (a Ctrl-C in the terminal reaches us, not it), output appended to log_path."""
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     env=env, cwd=cwd, start_new_session=True)
        finally:
            if log_path:
                out.close()
        return cls(popen.pid, popen=popen, name=name)

    def to_state(self) -> dict:
        return {"pid": self.pid, "started": self.started, "name": self.name}

    @classmethod
    def from_state(cls, state: dict) -> "Proc":
        return cls(state["pid"], state["started"], name=state.get("name", ""))

    @property
    def returncode(self) -> Optional[int]:
        return self.popen.poll() if self.popen else None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return running(self.pid) and start_time(self.pid) == self.started

    def send(self, sig: int) -> bool:
        """Send sig if this very process still runs; False if it was gone."""
        if not self.alive():
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def wait(self, timeout: float) -> bool:
        """Wait for exit; True if it exited within timeout."""
        if self.popen is not None:
            try:
                self.popen.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        try:
            wait_until(lambda: not self.alive(), timeout, f"{self.name} to exit")
            return True
        except TimeoutError:
            return False

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> Optional[int]:
        """Signal (SIGTERM by default), wait up to timeout, then SIGKILL. Returns the exit code when known."""
        if self.send(sig) and not self.wait(timeout):
            self.kill()
        return self.returncode

    def kill(self) -> None:
        self.send(signal.SIGKILL)
        self.wait(10.0)


def namespace_id(pid: Union[int, str], kind: str) -> Optional[str]:
    """The identity ('net:[4026532...]') of a process's namespace of this kind, or None if it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def pids_in_namespace(kind: str, ns_id: str) -> List[int]:
    """Every PID whose namespace of this kind is ns_id."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and namespace_id(entry, kind) == ns_id:
            out.append(int(entry))
    return out


def _children() -> Dict[int, List[int]]:
    """Parent PID -> child PIDs, for every live process."""
    tree: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields and fields[0] != "Z":
                tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def kill_namespace(kind: str, ns_id: str, spare: Sequence[int] = ()) -> List[int]:
    """SIGKILL every process in a namespace we made, and their descendants (containers under a shim live in
    namespaces of their own), except `spare`, until none is left; return what was killed."""
    if ns_id == namespace_id("self", kind):
        raise HarnessError(f"refusing to kill every process in our own {kind} namespace")
    killed: List[int] = []

    def sweep() -> bool:
        tree = _children()
        todo = [pid for pid in pids_in_namespace(kind, ns_id) if pid not in spare]
        doomed = set()
        while todo:
            pid = todo.pop()
            if pid not in doomed:
                doomed.add(pid)
                todo.extend(tree.get(pid, ()))
        doomed -= set(spare)
        doomed = {pid for pid in doomed if running(pid)}
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        return not doomed

    wait_until(sweep, 10.0, f"processes in {ns_id} to die", interval=0.1)
    return killed
