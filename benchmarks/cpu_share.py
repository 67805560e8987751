"""Who used the CPUs while a Ray Train worker trained (``hdet bench train``: worker, the rest),
from the ``/proc`` readers of :mod:`workers.procfs`.

:class:`CpuSampler` reads ``/proc/<pid>/stat`` of every process every ``interval`` seconds in a
thread; :meth:`CpuSampler.cores_used` gives, for a time window, how many cores each group used on
average (CPU seconds / wall seconds). A process is in the ``worker`` group when its command line
(which Ray sets to the actor's name) holds ``RayTrainWorker`` and it descends from the sampling
process (a local Ray's processes do); a process given a group by pid (the plain loop's, the bare
actor's) is in that group; every other process is ``other``.
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_left
from pathlib import Path

from workers.procfs import command_line, cpu_seconds, proc_stats

__all__ = ["CpuSampler", "WORKER", "OTHER"]

WORKER = "worker"
OTHER = "other"


def _read_processes(root: int, names: dict[int, str] | None = None) -> dict[int, tuple[str, float]]:
    """pid -> (group, CPU seconds so far) of every process this user can read. A pid in ``names`` is
    in the group it names; else the worker is a process that descends from ``root`` (a local Ray's
    processes do; another Ray on the machine is "other") and whose command line names a Ray Train
    worker: only the descendants' command lines are read, to keep each sample cheap."""
    seen: dict[int, tuple[int, float]] = {}  # pid -> (parent, seconds)
    for pid, fields in proc_stats().items():
        seen[pid] = (int(fields[1]), cpu_seconds(fields))  # ppid

    def descends(pid: int) -> bool:
        for _ in range(64):
            if pid == root:
                return True
            if pid not in seen or pid <= 1:
                return False
            pid = seen[pid][0]
        return False

    def is_worker(pid: int) -> bool:
        return pid != root and descends(pid) and "RayTrainWorker" in command_line(pid, limit=None)

    named = names or {}
    return {
        pid: (named.get(pid) or (WORKER if is_worker(pid) else OTHER), seconds)
        for pid, (_, seconds) in seen.items()
    }


class CpuSampler:
    """Cumulative CPU seconds per group, sampled in a thread (see the module docstring).
    ``names``: more groups, pid -> group name (read at every sample: pids may be added meanwhile)."""

    def __init__(self, interval: float = 1.0, names: dict[int, str] | None = None):
        self.interval = interval
        self._root = os.getpid()
        self._names = names
        self.times: list[float] = []
        self.totals: list[dict[str, float]] = []
        # pid -> (group, CPU seconds at its first sample, at its latest): a process that exits
        # keeps what it used until its last sample.
        self._seen: dict[int, tuple[str, float, float]] = {}
        self._retired: dict[str, float] = {WORKER: 0.0, OTHER: 0.0}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hdet-cpu-sampler", daemon=True)

    @staticmethod
    def available() -> bool:
        return Path("/proc/self/stat").exists()

    def __enter__(self) -> CpuSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        """Take a sample now (besides the thread's every ``interval``): at the edges of a window,
        so that its totals are not interpolated from what happened outside it."""
        with self._lock:
            self._sample()

    def _sample(self) -> None:
        now = time.time()
        for pid, (group, seconds) in _read_processes(self._root, self._names).items():
            # A process counts from its first sample on (what it used before is not in any window).
            known = self._seen.get(pid)
            if known is None or seconds < known[2]:  # new, or its pid was reused
                if known is not None:
                    self._retired[known[0]] = self._retired.get(known[0], 0.0) + known[2] - known[1]
                self._seen[pid] = (group, seconds, seconds)
            elif group != known[0]:
                # Ray starts idle workers ahead of need; one becomes the Train worker later (its
                # name changes): what it used so far stays with its old group, the rest is new.
                self._retired[known[0]] = self._retired.get(known[0], 0.0) + known[2] - known[1]
                self._seen[pid] = (group, known[2], seconds)
            else:
                self._seen[pid] = (known[0], known[1], seconds)
        totals = dict(self._retired)
        for group, first, last in self._seen.values():
            totals[group] = totals.get(group, 0.0) + last - first
        self.times.append(now)
        self.totals.append(totals)

    def _at(self, t: float) -> dict[str, float]:
        """Cumulative totals at ``t``, interpolated between the samples around it."""
        i = bisect_left(self.times, t)
        if i <= 0:
            return dict(self.totals[0])
        if i >= len(self.times):
            return dict(self.totals[-1])
        t0, t1 = self.times[i - 1], self.times[i]
        w = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
        a, b = self.totals[i - 1], self.totals[i]
        return {k: a.get(k, 0.0) + w * (b[k] - a.get(k, 0.0)) for k in b}

    def cores_used(self, start: float, end: float) -> dict[str, float]:
        """Average cores each group used between ``start`` and ``end`` (time.time() values)."""
        if end <= start or not self.times:
            return {WORKER: float("nan"), OTHER: float("nan")}
        a, b = self._at(start), self._at(end)
        return {k: (b[k] - a.get(k, 0.0)) / (end - start) for k in b}
