"""The submitter: a thread of the API process that sends accepted (``SUBMITTING``) records to Ray,
oldest first, so that a ``POST`` answers as soon as its record is stored.

It works from the database, not from a queue in memory: a record accepted by an API that crashed
before submitting it, or by a replica that is gone, is submitted by the next pass of any service on
the database (Ray's ``submission_id`` makes a repeat harmless). A request wakes it; without one it
looks every ``idle_s``. While Ray cannot be asked, the records say so (``waiting_for``) and the
thread tries again after 1, 2, 4 ... up to ``max_backoff_s`` seconds.
"""

from __future__ import annotations

import logging
import threading

from service.db import Store
from service.experiments import Experiments
from service.jobs import RayUnavailable
from service.states import Status

__all__ = ["Submitter"]

log = logging.getLogger("hdet.service")


class Submitter:
    """Sends ``SUBMITTING`` records to Ray; :attr:`ray_error` is why the last pass could not."""

    def __init__(
        self, store: Store, experiments: Experiments, *, idle_s: float = 2.0, max_backoff_s: float = 30.0
    ):
        self.store = store
        self.experiments = experiments
        self.idle_s = idle_s
        self.max_backoff_s = max_backoff_s
        self.ray_error: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="hdet-submitter", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def wake(self) -> None:
        """A record was accepted: submit it now rather than at the next look."""
        self._wake.set()

    def waiting_for(self) -> str | None:
        """What a record accepted now waits for, when that is known already (Ray unreachable)."""
        error = self.ray_error
        return f"Ray to answer: {error}" if error else None

    def _loop(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            self._wake.clear()  # a request during the pass wakes the next one
            try:
                done = self.run_once()
            except Exception:  # e.g. the database: the next pass tries again
                log.exception("submitter pass failed")
                done = False
            if done:
                backoff = 0.0
                self._wake.wait(self.idle_s)
            else:
                # Ray down: wait out the backoff, whatever requests arrive meanwhile.
                backoff = min(self.max_backoff_s, max(1.0, 2 * backoff))
                self._stop.wait(backoff)

    def run_once(self) -> bool:
        """Submit every ``SUBMITTING`` record, oldest first (callable directly, e.g. by tests);
        False when Ray could not be asked (the records not sent say so)."""
        with self._lock:
            while not self._stop.is_set():
                rows = self.store.submitting(limit=100)
                for i, row in enumerate(rows):
                    if self._stop.is_set():
                        return True
                    try:
                        to = self.experiments.send(row)
                    except RayUnavailable as e:
                        self.ray_error = str(e)
                        waiting = self.waiting_for()
                        for left in rows[i:]:
                            if left.waiting_for != waiting:
                                self.store.update_fields(left.id, Status.SUBMITTING, waiting_for=waiting)
                        log.warning("submitter: %s; %d record(s) wait for Ray", e, len(rows) - i)
                        return False
                    log.info("%s: SUBMITTING -> %s", row.id, to)
                self.ray_error = None
                if len(rows) < 100:
                    return True
            return True
