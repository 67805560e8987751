"""The submitter: a thread of the service's background process (:mod:`service.background`) that
sends accepted (``SUBMITTING``) records to Ray, oldest first, so that a ``POST`` answers as soon as
its record is stored.

It works from the database, not from a queue in memory: a record accepted by an API that crashed
before submitting it, or by a replica that is gone, is submitted by the next pass of any service on
the database (Ray's ``submission_id`` makes a repeat harmless). A request wakes it; without one it
looks every ``idle_s``. While Ray cannot be asked, the records say so (``waiting_for``) and the
thread tries again after 1, 2, 4 ... up to ``max_backoff_s`` seconds.

At most ``max_active`` records (``HDET_MAX_ACTIVE``, 16) are in Ray at once (``PENDING``, ``RUNNING``
or ``CANCELLING``); the others wait ``SUBMITTING``, saying so, and go oldest first as those end. A
burst of submissions is then a queue in the database, not a burst of Ray jobs: Ray's job head,
GCS and dashboard took about 0.7 of this machine's 2 cores at 25 submissions a second, measured.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from service.db import Store
from service.experiments import Experiments
from service.jobs import RayUnavailable
from service.states import Status

__all__ = ["Submitter", "waiting_for"]

log = logging.getLogger("hdet.service")

#: records a pass reads and sends at a time
BATCH = 100


def waiting_for(ray_error: str | None) -> str | None:
    """What a record the submitter could not send waits for, given why Ray could not be asked."""
    return f"Ray to answer: {ray_error}" if ray_error else None


class Submitter:
    """Sends ``SUBMITTING`` records to Ray; :attr:`ray_error` is why the last pass could not."""

    def __init__(
        self,
        store: Store,
        experiments: Experiments,
        *,
        idle_s: float = 2.0,
        max_backoff_s: float = 30.0,
        max_active: int | None = None,
    ):
        self.store = store
        self.experiments = experiments
        self.idle_s = idle_s
        #: records in Ray at once at most (None: no limit); the others wait their turn
        self.max_active = max_active
        self.max_backoff_s = max_backoff_s
        self.ray_error: str | None = None
        #: told every new :attr:`ray_error` before the records say it (a process of its own reports it)
        self.on_ray_error: Callable[[str | None], None] | None = None
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
        return waiting_for(self.ray_error)

    def _set_ray_error(self, error: str | None) -> None:
        if error != self.ray_error and self.on_ray_error is not None:
            self.on_ray_error(error)
        self.ray_error = error

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

    def queued_text(self) -> str:
        """What a record waits for while :attr:`max_active` records are in Ray."""
        return f"its turn: {self.max_active} experiments are in Ray already (HDET_MAX_ACTIVE)"

    def _room(self) -> int:
        """How many records may be sent now (at most a batch of 100)."""
        if self.max_active is None:
            return BATCH
        return min(BATCH, self.max_active - self.store.count_active())

    def run_once(self) -> bool:
        """Submit the ``SUBMITTING`` records, oldest first, while fewer than :attr:`max_active` are
        in Ray (the others say they wait their turn); callable directly, e.g. by tests. False when
        Ray could not be asked (the records not sent say so)."""
        with self._lock:
            while not self._stop.is_set():
                room = self._room()
                if room <= 0:
                    self.store.set_queued(self.queued_text())
                    return True
                rows = self.store.submitting(limit=room)
                for i, row in enumerate(rows):
                    if self._stop.is_set():
                        return True
                    try:
                        to = self.experiments.send(row)
                    except RayUnavailable as e:
                        self._set_ray_error(str(e))
                        waiting = self.waiting_for()
                        for left in rows[i:]:
                            if left.waiting_for != waiting:
                                self.store.update_fields(left.id, Status.SUBMITTING, waiting_for=waiting)
                        log.warning("submitter: %s; %d record(s) wait for Ray", e, len(rows) - i)
                        return False
                    log.info("%s: SUBMITTING -> %s", row.id, to)
                self._set_ray_error(None)
                if len(rows) < room:
                    return True
            return True
