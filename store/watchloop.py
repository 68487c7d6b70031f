"""Keeping something equal to etcd: a full read, then a watch from the revision after it; after a compaction, a
broken stream, an etcd outage or an error applying an event, a fresh full read (after a back-off, except for a
compaction, which only means the watch started too far back). Nothing is skipped: the full read repairs whatever
a lost or failed event left.

    class PeerWatcher(WatchLoop):
        what = "peer watch"
        def load(self):                 # read and apply everything; -> (key or prefix to watch, revision read at)
        def apply(self, event) -> bool: # one event; False: start over with a full read
"""

import logging
import threading
from typing import Optional, Tuple

from store.kv import WatchableKV, WatchStream
from store.kvstore import Compacted, WatchEvent
from telemetry.metrics import WATCH_RESYNCS
from wire.errors import VxnetError

log = logging.getLogger(__name__)

FIRST_BACKOFF = 0.1


class WatchLoop:
    what = "watch"
    failure_level = logging.WARNING

    def __init__(self, kv: WatchableKV, max_backoff: float = 2.0):
        self.kv = kv
        self.max_backoff = max_backoff  # bounds how long after etcd returns its changes are applied
        self._stop = threading.Event()
        self._stream: Optional[WatchStream] = None
        self._thread: Optional[threading.Thread] = None
        self.synced = threading.Event()  # set after each successful full read and apply

    def load(self) -> Tuple[str, int]:
        raise NotImplementedError

    def apply(self, event: WatchEvent) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.what.replace(" ", "-"), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.kick()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def kick(self) -> None:
        """Break the current watch: a fresh full read follows."""
        stream = self._stream
        if stream is not None:
            stream.close()

    def _run(self) -> None:
        backoff = FIRST_BACKOFF
        while not self._stop.is_set():
            try:
                WATCH_RESYNCS.labels(watch=self.what).inc()  # the first full read counts too: a start is a resync
                key, revision = self.load()
                self.synced.set()
                backoff = FIRST_BACKOFF
                self._stream = self.kv.watch(key, revision + 1)
                if self._stop.is_set():
                    return
                for event in self._stream:
                    if not self.apply(event):
                        break
            except Compacted as exc:
                log.info("%s resyncs: %s", self.what, exc)
                continue
            except VxnetError as exc:
                if self._stop.is_set():
                    return
                log.log(self.failure_level, "%s interrupted, full read again in %.1f s: %s", self.what, backoff, exc)
            except Exception:  # a bug: log it and start over rather than leave the state unmanaged
                log.exception("%s crashed; full read again", self.what)
            finally:
                self._stream = None
            self.synced.clear()
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, self.max_backoff)
