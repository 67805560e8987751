"""The settings of a local Ray (``workers.env.LOCAL_RAY_ENV``, and with its dashboard off the node
agent's reporting interval) reach the processes that read them: Ray's log monitor, its node agent,
and a Ray actor (as a Train run's controller and workers are). A real local Ray, in a process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Starts a local Ray as `hdet run` does, starts an actor, and prints the environment of
# each of the Ray processes named below, as it started.
SCRIPT = r"""
import json, os, ray
from workers.cpu_share import command_line, environment
from workers.pace import descendants
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


def test_every_process_of_a_local_ray_has_its_settings() -> None:
    from workers.env import LOCAL_RAY_ENV, REPORTER_INTERVAL_ENV

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
