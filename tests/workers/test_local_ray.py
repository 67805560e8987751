"""What a local Ray is (``workers.env.LocalRay``) reaches the processes that read it, whichever
command starts it: its settings (``LOCAL_RAY_ENV``, and with its dashboard off the node agent's
reporting interval) reach Ray's log monitor, its node agent and a Ray actor (as a Train run's
controller and workers are); ``hdet run``'s local Ray and ``hdet serve``'s head have the same
settings and the same CPUs. Real local Rays, in processes of their own."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from workers.env import GIT_COMMIT_ENV, LOCAL_RAY_ENV, REPORTER_INTERVAL_ENV, local_ray_cpus

ROOT = Path(__file__).resolve().parents[2]

# Starts a local Ray as `hdet run` does, starts an actor, and prints the environment of
# each of the Ray processes named below, as it started.
SCRIPT = r"""
import json, os, ray
from workers.procfs import command_line, descendants, environment
from workers.env import init_local_ray, shutdown_local_ray
init_local_ray(num_cpus=1)

@ray.remote(num_cpus=0)
class TrainController:
    def pid(self):
        return os.getpid()

pids = {"controller": ray.get(TrainController.remote().pid.remote())}
for pid in sorted(descendants(os.getpid())):  # this Ray's (another may run on the machine)
    line = command_line(pid, limit=None)
    for name, marks in (("log monitor", ("log_monitor.py",)), ("agent", ("dashboard/agent.py", "DashboardAgent"))):
        if any(mark in line for mark in marks):
            pids.setdefault(name, pid)
envs = {name: environment(pid) for name, pid in pids.items()}
shutdown_local_ray("test")
print(json.dumps(envs))
"""

#: The settings compared between the two launchers.
SETTINGS = [*LOCAL_RAY_ENV, GIT_COMMIT_ENV]

# Run in a Ray (joined if this process has none): its logical CPUs and what a Ray worker has of SETTINGS.
PROBE = f"""
import json, os, ray
if not ray.is_initialized():
    ray.init()
@ray.remote(num_cpus=0)
def environ():
    return dict(os.environ)
env = ray.get(environ.remote())
print("PROBE " + json.dumps({{"cpus": ray.cluster_resources().get("CPU"), "env": {{k: env.get(k) for k in {SETTINGS!r}}}}}))
"""

# `hdet run configs/demo.yaml`'s start of Ray, then the probe.
RUN_SIDE = f"""
from workers.env import shutdown_local_ray
from workers.run import _parser, _start_ray
from workers.spec import Spec
assert _start_ray(Spec.suite_from_file("configs/demo.yaml")[0], _parser().parse_args(["configs/demo.yaml"]))
{PROBE}
shutdown_local_ray("test")
"""


def _clean_env(home: Path) -> dict[str, str]:
    """This environment without Ray's, HarmonicDet's and MLflow's variables, nor the local Ray's settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HDET_", "RAY_", "MLFLOW_"))
        and k not in LOCAL_RAY_ENV
        and k != REPORTER_INTERVAL_ENV
    }
    return {**env, "HDET_HOME": str(home), GIT_COMMIT_ENV: "probe-commit"}


def _probed(text: str) -> dict[str, Any]:
    lines = [line for line in text.splitlines() if line.startswith("PROBE ")]
    assert lines, text[-3000:]
    found: dict[str, Any] = json.loads(lines[-1].removeprefix("PROBE "))
    return found


def test_every_process_of_a_local_ray_has_its_settings() -> None:
    env = {k: v for k, v in os.environ.items() if k not in LOCAL_RAY_ENV and k != REPORTER_INTERVAL_ENV}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    envs = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(envs) == {"controller", "log monitor", "agent"}, envs.keys()
    for name, got in envs.items():
        assert got is not None, name
        missing = {k: v for k, v in LOCAL_RAY_ENV.items() if got.get(k) != v}
        assert not missing, f"{name} lacks {missing}"
    assert envs["agent"].get(REPORTER_INTERVAL_ENV) == "60000"


def _serve_side(home: Path) -> dict[str, Any]:
    """``hdet serve``'s Ray head (MLflow given, so only Ray starts), probed by a job on its Jobs API."""
    log = home / "serve.log"
    home.mkdir(parents=True)
    argv = [sys.executable, "-m", "workers.cli", "serve", "--mlflow-uri", "http://127.0.0.1:9", "--port", "0"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=_clean_env(home), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 300
        while "Ray Jobs API" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        address = log.read_text().split("Ray Jobs API")[1].split()[0]
        auth = {"Authorization": f"Bearer {(home / 'ray-auth-token').read_text().strip()}"}
        entrypoint = f"{shlex.quote(sys.executable)} -c {shlex.quote(PROBE)}"
        r = httpx.post(f"{address}/api/jobs/", json={"entrypoint": entrypoint}, headers=auth, timeout=30)
        assert r.status_code == 200, r.text
        job = f"{address}/api/jobs/{r.json()['submission_id']}"
        while (status := httpx.get(job, headers=auth, timeout=30).json()["status"]) not in (
            "SUCCEEDED",
            "FAILED",
            "STOPPED",
        ):
            assert time.monotonic() < deadline + 180, status
            time.sleep(1)
        logs = httpx.get(f"{job}/logs", headers=auth, timeout=30).json()["logs"]
        assert status == "SUCCEEDED", logs[-3000:]
        return _probed(logs)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_hdet_run_and_hdet_serve_start_the_same_local_ray(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", RUN_SIDE],
        cwd=ROOT,
        env=_clean_env(tmp_path / "run"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    by_run = _probed(run.stdout)
    by_serve = _serve_side(tmp_path / "serve")
    # The cores for the trainings, one more for the demo's Tune trials (0.01 CPU each).
    assert by_run["cpus"] == by_serve["cpus"] == (os.cpu_count() or 1) + 1
    assert by_run["env"] == by_serve["env"] == {**LOCAL_RAY_ENV, GIT_COMMIT_ENV: "probe-commit"}


@pytest.mark.unit
@pytest.mark.parametrize(
    ("cores", "reserved", "least", "cpus"),
    [
        (2, 0.0, 0.0, 2),  # one training, or a comparison without trials: the cores
        (2, 0.01, 1.01, 3),  # a search: room for its trials' reservations
        (2, 0.01, 4.01, 5),  # a training larger than the machine runs oversubscribed, not never
        (0.5, 0.0, 0.0, 1),
    ],
)
def test_a_local_ray_has_the_cores_and_room_for_reservations(
    cores: float, reserved: float, least: float, cpus: int
) -> None:
    assert local_ray_cpus(cores, reserved=reserved, least=least) == cpus


@pytest.mark.unit
def test_a_negative_cpu_count_is_refused() -> None:
    with pytest.raises(ValueError, match="num_cpus: -1 is negative"):
        local_ray_cpus(-1, reserved=0.0)
