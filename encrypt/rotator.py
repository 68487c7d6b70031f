"""Scheduled key rotation: a thread on every host; one rotation per interval in the cluster, whichever host is
first (encrypt/keystore.py KeyStore.rotate)."""

import logging
import threading
from typing import Optional

from encrypt.keystore import MIN_ROTATION_GAP, KeyStore
from wire.errors import ConfigError, VxnetError

log = logging.getLogger(__name__)


class KeyRotator:
    """A thread that rotates the ring every `interval` seconds. Every host runs one; the compare-and-swap in
    KeyStore.rotate and its age check make one rotation per interval, whichever host gets there first."""

    def __init__(self, store: KeyStore, interval: float, check_every: float = 60.0):
        if interval < MIN_ROTATION_GAP:
            raise ConfigError(f"key rotation interval {interval:g} s is below the minimum {MIN_ROTATION_GAP:g} s")
        self.store = store
        self.interval = interval
        self.check_every = min(check_every, interval / 2)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="key-rotator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def tick(self, now: Optional[float] = None) -> bool:
        """One check; True if this call rotated the ring."""
        ring, rotated = self.store.rotate(now, min_age=self.interval)
        if rotated:
            log.info("key ring rotated: %s", ring)
        return rotated

    def _run(self) -> None:
        while not self._stop.wait(self.check_every):
            try:
                self.tick()
            except VxnetError as exc:
                log.error("scheduled key rotation failed, next try in %.0f s: %s", self.check_every, exc)
