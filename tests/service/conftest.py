"""The real stack the service tests share: ``hdet serve`` itself, started once per session on free
ports (SIGINT ignored, as a script's ``hdet serve &`` inherits it) and stopped at the end with
SIGINT: it must exit 0 within 30 s and leave no process behind.
See svc_helpers.py for what the tests use it with."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from svc_helpers import Stack, wait_for

from service.stack import free_port
from workers.procfs import command_line, proc_stats


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (session id, command line) of every process but zombies."""
    return {
        pid: (int(fields[3]), command_line(pid, limit=None))  # state ppid pgrp session ...
        for pid, fields in proc_stats().items()
        if fields[0] != "Z"
    }


@pytest.fixture(scope="session")
def stack(
    request: pytest.FixtureRequest, scratch: Callable[[pytest.FixtureRequest, str], Path]
) -> Iterator[Stack]:
    home = scratch(request, "serve")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HDET_", "RAY_", "MLFLOW_"))}
    env.update(HDET_HOME=str(home), HDET_API_PORT=str(port), HDET_RECONCILE_INTERVAL_S="0.5")
    log = home / "serve.log"
    with open(log, "wb") as out:
        # As a script's `hdet serve &` starts it: with SIGINT ignored (it must stop on SIGINT anyway).
        # 3 cores for trainings: a head of 4 logical CPUs (one for the trials' reservations)
        command = f"trap '' INT; exec {sys.executable} -m workers.cli serve --num-cpus 3"
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=home,
        )
    api = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"hdet serve exited {proc.returncode}:\n{log.read_text()}")
        try:
            return httpx.get(f"{api}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 420, "hdet serve to be ready", every_s=1)
    except BaseException:
        proc.kill()
        raise
    text = log.read_text()
    found = re.search(r"temp dir (\S+)\)", text)
    stack = Stack(
        home=home,
        api_url=api,
        token=(home / "api-token").read_text().strip(),
        ray_address=re.findall(r"Ray Jobs API\s+(\S+)", text)[0],
        ray_token_path=home / "ray-auth-token",
        ray_temp_dir=found.group(1) if found else str(home / "ray"),
        mlflow_uri=re.findall(r"MLflow\s+(http\S+)", text)[0],
        pids=[proc.pid, *map(int, re.findall(r"started .*? \(pid (\d+)", text))],
    )
    yield stack

    # `hdet serve` up and down: SIGINT, exit 0 within 30 s, nothing left behind.
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = None
    took = time.monotonic() - t0
    time.sleep(1)
    left = {
        pid: cmd
        for pid, (sid, cmd) in _processes().items()
        if sid in stack.pids or any(mark in cmd for mark in (str(home), stack.ray_temp_dir, stack.mlflow_uri))
    }
    assert rc == 0, f"hdet serve exited {rc}:\n{log.read_text()[-3000:]}"
    assert took < 30, f"hdet serve took {took:.1f} s to stop"
    assert not left, f"left running after hdet serve stopped: {left}"
