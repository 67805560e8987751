"""The local stack ``hdet serve`` starts (and the service tests start the same way): a Ray head with
its Jobs API and token auth, and an ``mlflow server`` on the CLI's sqlite store, both on 127.0.0.1.
What the head is (CPUs, temp dir, token, settings) is ``workers.env.LocalRay``'s, as for ``hdet run``.

Each runs in a session of its own and is stopped by its own process id (SIGTERM, then SIGKILL to
its process group), never with ``ray stop``, which would stop every Ray on the machine. Every port
is picked free (the per-node Jobs port 52365 too), so it runs beside another Ray.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from workers.env import LocalRay

__all__ = ["free_port", "stop_all", "ManagedProcess", "RayHead", "LocalMlflow", "StartError"]


class StartError(RuntimeError):
    """A component did not start; the message names it and its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ManagedProcess:
    """A child process in its own session, its output in ``log_path``."""

    name = "process"
    #: SIGTERM the whole group (a server that does not pass it on to its workers), or only the
    #: process (one that tears its children down itself, and faster when they are left alone).
    term_group = True

    def describe(self) -> str:
        return f"{self.name} (pid {self.pid}, log {self.log_path})"

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path):
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # its own session: a Ctrl-C at the terminal reaches `hdet serve`, which stops it in order
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, check: Callable[[], bool], timeout_s: float, stopping: Callable[[], bool]) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if stopping():
                raise StartError(f"{self.name}: start interrupted")
            if not self.alive():
                raise StartError(f"{self.name} exited during start-up; its log: {self.log_path}")
            try:
                if check():
                    return
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.5)
        raise StartError(f"{self.name} did not answer within {timeout_s:.0f} s; its log: {self.log_path}")

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (see :attr:`term_group`), then SIGKILL to its process group (its own id) and to
        what lingers in its session."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the process leads its own group
        if self.proc.poll() is None:
            if self.term_group:
                _signal_group(pgid, signal.SIGTERM)
            else:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(pgid, signal.SIGKILL)  # what it left behind in its group
        # Ray's workers get process groups of their own but stay in the session we started
        # (whose id is the process's): they end with the raylet, a moment later; wait for that.
        deadline = time.monotonic() + 10
        while (left := session_members(pgid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


def session_members(sid: int) -> list[int]:
    """Live processes of the session ``sid`` (Linux ``/proc``; none elsewhere)."""
    from workers.procfs import proc_stats

    if not os.path.isdir("/proc"):
        return []
    # state ppid pgrp session ...; not a zombie
    return [pid for pid, fields in proc_stats().items() if int(fields[3]) == sid and fields[0] != "Z"]


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all(processes: list[ManagedProcess]) -> None:
    """Stop ``processes`` at the same time (each takes seconds to wind down)."""
    threads = [threading.Thread(target=p.stop) for p in processes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(name, None)
    return env


class RayHead(ManagedProcess):
    """``ray start --head --block`` of a :class:`workers.env.LocalRay` (its CPUs, temp dir, token
    and settings), with the dashboard (Jobs API) and token auth, every port picked free."""

    name = "Ray head"
    term_group = False  # `ray start --block` stops its processes in 3 s; signalled all at once, 15+

    def __init__(self, home: Path, ray: LocalRay):
        if not ray.dashboard or ray.token_path is None:
            raise ValueError("a Ray head serves the Jobs API: create its LocalRay with dashboard and token")
        self.ray = ray
        self.token_path: Path = ray.token_path
        self.temp_dir = ray.temp_dir
        self.dashboard_port = free_port()
        self.gcs_port = free_port()
        ports = {
            "--port": self.gcs_port,
            "--dashboard-port": self.dashboard_port,
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
            "--ray-client-server-port": free_port(),
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
        }
        argv = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", *ray.start_args()]
        for flag, port in ports.items():
            argv += [flag, str(port)]
        env = dict(os.environ)
        ray.apply(env)
        super().__init__(argv, env, home / "logs" / "ray-head.log")

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def stop(self, timeout_s: float = 15.0) -> None:
        super().stop(timeout_s)
        self.ray.cleanup()

    def describe(self) -> str:
        return f"{super().describe()[:-1]}, {self.ray.num_cpus} CPUs, temp dir {self.temp_dir})"

    def job_env(self) -> dict[str, str]:
        """Environment of the jobs on this head: Ray's state API (Ray Train's placement-group
        cleaner asks it) is found by address, not by guessing among the Rays of this machine."""
        return {"RAY_API_SERVER_ADDRESS": self.address}

    def token(self) -> str:
        return self.token_path.read_text().strip()

    def ready(self) -> bool:
        """The Jobs API answers and ``ray start`` says the node runs (its job agent too)."""
        r = httpx.get(
            f"{self.address}/api/version", headers={"Authorization": f"Bearer {self.token()}"}, timeout=5
        )
        if r.status_code != 200:
            return False
        return "Ray runtime started" in self.log_path.read_text(errors="replace")


class LocalMlflow(ManagedProcess):
    """``mlflow server --workers 1`` on 127.0.0.1 over ``backend_uri`` (the CLI's sqlite store)."""

    name = "MLflow server"

    def __init__(self, home: Path, backend_uri: str, artifacts: Path):
        self.port = free_port()
        mlflow = str(Path(sys.executable).parent / "mlflow")
        argv = [
            mlflow,
            "server",
            "--backend-store-uri",
            backend_uri,
            "--artifacts-destination",
            str(artifacts),
        ]
        argv += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = _clean_env()
        # its job runner (huey consumers) would outlive a SIGTERM'd server; nothing here uses it
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        env.pop("MLFLOW_TRACKING_URI", None)
        super().__init__(argv, env, home / "logs" / "mlflow-server.log")

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        return httpx.get(f"{self.address}/health", timeout=5).status_code == 200
