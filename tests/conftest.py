"""Suite-wide fixtures: folders for module- and session-scoped fixtures that do not outlive them.

A passing test's ``tmp_path`` is removed when it ends (``tmp_path_retention_policy = "failed"`` in
pyproject.toml); :func:`scratch` does the same for the folders of longer-lived fixtures, whose Ray
storage and MLflow artifacts hold gigabytes of checkpoints.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from workers.cpu_share import command_line, environment, pids

#: Files at least this big (checkpoints) go even when a test failed; logs and databases stay.
BIG_FILE_BYTES = 8 << 20


def _prune(session: pytest.Session, path: Path) -> None:
    if session.testsfailed == 0:
        shutil.rmtree(path, ignore_errors=True)
        return
    for f in path.rglob("*"):
        try:
            if f.is_file() and not f.is_symlink() and f.stat().st_size >= BIG_FILE_BYTES:
                f.unlink()
        except OSError:
            pass


class Scratch:
    """``scratch(request, name)``: a fresh folder that goes when the requesting fixture is torn
    down, whole if no test has failed so far, else all but its logs and databases (its files under
    :data:`BIG_FILE_BYTES`), so that a failing suite keeps what explains it and the disk stays free."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self._factory = factory

    def __call__(self, request: pytest.FixtureRequest, name: str) -> Path:
        path = self._factory.mktemp(name)
        session = request.session
        request.addfinalizer(lambda: _prune(session, path))
        return path


@pytest.fixture(scope="session")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Scratch:
    return Scratch(tmp_path_factory)


def _left_running(home: Path, wait_s: float = 5.0) -> list[str]:
    """Live processes (other than this one) whose environment has ``HDET_HOME=home``: what a run of
    that data directory started and left running, given ``wait_s`` to end (command and pid)."""
    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for pid in pids():
            # (None: gone, or not ours to read)
            if pid != os.getpid() and (environment(pid) or {}).get("HDET_HOME") == str(home):
                left.append(f"{command_line(pid)} (pid {pid})")
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)


@pytest.fixture(scope="session")
def left_running() -> Callable[[Path], list[str]]:
    """``left_running(home)``: the processes a run of data directory ``home`` left running."""
    return _left_running
