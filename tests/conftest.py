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

from workers.procfs import command_line, environment, pids

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


# ------------------------------------------------------------------------------------------ tiers
#: Tiers (pytest markers): ``unit`` (pure code, no process beyond a short tool run: ``pytest -m unit``
#: is a developer's loop), ``integration`` (real Ray, MLflow server, PostgreSQL or service stack),
#: ``e2e`` (whole trainings, searches and jobs). ``./test.sh`` runs them all. A test may carry its
#: tier as a marker; otherwise its module's tier below decides, and a test that uses the service
#: stack is integration whatever its module.
TIERS = ("unit", "integration", "e2e")
E2E_MODULES = {
    "tests/search/test_comparison_on_ray.py",
    "tests/search/test_search_on_ray.py",
    "tests/search/test_trial_lifecycle.py",
    "tests/search/test_rounds_on_ray.py",
    "tests/workers/test_train_on_ray.py",
    "tests/workers/test_scheduling_on_cluster.py",
    "tests/workers/test_stop_signals.py",
    "tests/workers/test_pretrain.py",
    "tests/service/test_api_lifecycle.py",
    "tests/service/test_client.py",
    "tests/service/test_client_comparison.py",
    "tests/deploy/test_ray_job_submit.py",
    "tests/benchmarks/test_bench_train.py",
}
INTEGRATION_MODULES = {
    "tests/benchmarks/test_cpu_share.py",
    "tests/benchmarks/test_pace.py",
    "tests/deploy/test_compose.py",
    "tests/search/test_imports.py",
    "tests/search/test_space.py",
    "tests/service/test_api_guard.py",
    "tests/service/test_api_paths.py",
    "tests/service/test_api_submissions.py",
    "tests/service/test_serve_cli.py",
    "tests/service/test_store.py",
    "tests/test_layers.py",
    "tests/test_readme.py",
    "tests/workers/test_local_ray.py",
    "tests/workers/test_orphans.py",
    "tests/workers/test_ray_compat.py",
    "tests/workers/test_run_args.py",
}
#: Fixtures that start real parts: a test that uses one is integration at least.
REAL_FIXTURES = {"stack"}


def tier_of(item: pytest.Item) -> str:
    """The tier of one collected test (see :data:`TIERS`)."""
    given = [m.name for m in item.iter_markers() if m.name in TIERS]
    if given:
        return given[0]
    module = Path(str(item.path)).relative_to(Path(__file__).resolve().parents[1]).as_posix()
    if module in E2E_MODULES:
        return "e2e"
    if module in INTEGRATION_MODULES or REAL_FIXTURES & set(getattr(item, "fixturenames", ())):
        return "integration"
    return "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = tier_of(item)
        if not any(m.name == tier for m in item.iter_markers()):
            item.add_marker(getattr(pytest.mark, tier))
