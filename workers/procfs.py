"""The package's readers of ``/proc/<pid>``: stat fields, CPU seconds, command line, environment,
every pid and a process's descendants. Linux only; a process that is gone or not ours to read gives
None or ``?``, never an error. The local Ray's orphan check (:mod:`workers.env`) and the service
stack's session members use them; so do the benchmarks' CPU accounting and the tests.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["pids", "stat_fields", "proc_stats", "cpu_seconds", "command_line", "environment", "descendants"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def stat_fields(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, ... as ``proc(5)``
    numbers them from 3), or None if the process is gone or not readable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    return stat[stat.rfind(")") + 2 :].split()


def cpu_seconds(fields: list[str]) -> float:
    """The CPU seconds (user + system) a process has used, from its :func:`stat_fields`."""
    return (int(fields[11]) + int(fields[12])) / _TICKS


def command_line(pid: int | str, limit: int | None = 80) -> str:
    """The first ``limit`` characters (None: all) of a process's command line (its arguments joined
    by spaces), or ``?`` if the process is gone or not readable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:limit]


def environment(pid: int | str) -> dict[str, str] | None:
    """A process's environment (as it started), or None if it is gone or not ours to read."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    pairs = (entry.decode(errors="replace").partition("=") for entry in raw.split(b"\0") if entry)
    return {key: value for key, _, value in pairs}


def pids() -> list[int]:
    """Every process's pid (the numbered entries of ``/proc``)."""
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def proc_stats() -> dict[int, list[str]]:
    """:func:`stat_fields` of every process this user can read."""
    out: dict[int, list[str]] = {}
    for pid in pids():
        if (fields := stat_fields(pid)) is not None:
            out[pid] = fields
    return out


def descendants(root: int) -> set[int]:
    """Every process that descends from ``root``."""
    parents = {pid: int(fields[1]) for pid, fields in proc_stats().items()}
    out: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - out
        out |= frontier
    return out
