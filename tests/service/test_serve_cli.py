"""``hdet serve`` refusing to start: a component that fails is named with its log (exit 1, what it
started is stopped); settings it cannot run with exit 2 before anything starts. Starting and
stopping the whole stack is the session fixture of conftest.py (SIGINT, inherited ignored)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from svc_helpers import Stack

from workers.cli import main as hdet_main
from workers.procfs import command_line, descendants, proc_stats


def _serve(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HDET_", "RAY_", "MLFLOW_"))}
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "serve", *args],
        env={**clean, "HDET_HOME": str(home), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_hdet_serve_routes_to_the_services_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        hdet_main(["serve", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage: hdet serve" in out and "--num-cpus" in out and "--database-url" in out


def test_a_component_that_fails_to_start_exits_1_naming_it_and_its_log(tmp_path: Path) -> None:
    # Ray refuses a resource override that is not JSON; MLflow is "given", so only Ray is started
    r = _serve(tmp_path, "--mlflow-uri", "http://127.0.0.1:9", "--port", "0", RAY_OVERRIDE_RESOURCES="{")
    assert r.returncode == 1, r.stdout + r.stderr
    log = tmp_path / "logs" / "ray-head.log"
    assert f"Ray head exited during start-up; its log: {log}" in r.stderr
    assert "Traceback" in log.read_text()  # Ray's own reason is in its log
    assert "stopping Ray head" in r.stdout


def test_a_public_bind_with_a_short_token_is_refused_before_anything_starts(tmp_path: Path) -> None:
    r = _serve(tmp_path, "--host", "0.0.0.0", HDET_API_TOKEN="short")
    assert r.returncode == 2
    assert "at least 32 characters" in r.stderr
    assert not (tmp_path / "logs").exists()


def test_a_negative_cpu_count_is_refused_before_anything_starts(tmp_path: Path) -> None:
    r = _serve(tmp_path, "--num-cpus", "-1")
    assert r.returncode == 2
    assert "argument --num-cpus: -1 is negative" in r.stderr
    assert not (tmp_path / "logs").exists()


def test_the_reconciler_and_the_submitter_run_in_a_process_of_their_own(stack: Stack) -> None:
    """Beside the API's process (uvicorn's requests), not as its threads."""
    serve = stack.pids[0]  # hdet serve: the API
    background = [
        pid
        for pid, f in proc_stats().items()
        if int(f[1]) == serve and f[0] != "Z" and "multiprocessing.spawn" in command_line(pid, limit=None)
    ]
    assert len(background) == 1, [command_line(p) for p in descendants(serve)]
    assert background[0] not in descendants(stack.pids[1])  # not one of the Ray head's
