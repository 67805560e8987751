"""Helpers of the service tests (their fixtures are in conftest.py): specs, settings, waiting.

Further APIs (a ``TestClient`` or a uvicorn process per test module) use the session's Ray and
MLflow (``hdet serve``'s) with databases of their own; jobs meant to stay ``PENDING`` ask for an
entrypoint resource no node has (:data:`NEVER`), so they cost the Jobs API, not training.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
#: an entrypoint resource no node has: such a job waits PENDING until it is cancelled.
NEVER = {"hdet_test_never": 1.0}
TOKENS = ("token-one-0123456789abcdef0123456789", "token-two-0123456789abcdef0123456789")


@dataclass
class Stack:
    home: Path
    api_url: str
    token: str
    ray_address: str
    ray_token_path: Path
    ray_temp_dir: str
    mlflow_uri: str
    pids: list[int]


def tiny_spec(name: str = "tiny-svc", **overrides: Any) -> dict[str, Any]:
    """``configs/tiny.yaml`` made smaller still (1 epoch, 4+2 images, one worker), with overrides."""
    data = yaml.safe_load(TINY.read_text())
    data["name"] = name
    data["train"]["epochs"] = 1
    data["dataset"].update(train=4, val=2)
    data["scaling"]["num_workers"] = 1
    data["tracking"]["experiment"] = "svc-tests"
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return data


def wait_for(check: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.5) -> Any:
    """``check()``'s first truthy value, polled; fails naming ``what``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


def settings_for(stack: Stack, db: Path, **overrides: Any) -> Settings:
    """Settings of a further API over ``stack``'s Ray and MLflow, with its own database ``db``."""
    values: dict[str, Any] = {
        "api_token": ",".join(TOKENS),
        "database_url": f"sqlite:///{db}",
        "ray_address": stack.ray_address,
        "ray_auth_token_path": str(stack.ray_token_path),
        "mlflow_tracking_uri": stack.mlflow_uri,
        "entrypoint_python": sys.executable,
        "job_env": {"HDET_HOME": str(stack.home), "RAY_API_SERVER_ADDRESS": stack.ray_address},
        "reconcile_interval_s": 0.5,
        "home": str(stack.home),
        # the reconciler and submitter as threads: a test's TestClient is ready at once (a process of
        # their own, the default, is what `hdet serve` and ApiProcess run)
        "background": "thread",
        # the module-wide services keep many jobs PENDING (or CANCELLING) for good: no queue for them
        "max_active": 10_000,
    }
    values.update(overrides)
    return Settings(**values)


def auth(token: str = TOKENS[0]) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def post_spec(client: Any, spec: dict[str, Any], **headers: str) -> Any:
    return client.post(
        "/v1/experiments",
        content=json.dumps(spec),
        headers={"Content-Type": "application/json", **auth(), **headers},
    )


class ApiProcess:
    """The API under a real uvicorn in its own process (as deployed), over ``stack``'s Ray and
    MLflow and the database ``db``; ``kill()`` is a crash, ``stop()`` a SIGTERM."""

    def __init__(self, stack: Stack, db: Path, log: Path):
        import os

        from service.stack import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings = settings_for(stack, db)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HDET_", "RAY_", "MLFLOW_"))}
        env.update(
            HDET_API_TOKEN=",".join(TOKENS),
            HDET_DATABASE_URL=settings.resolved_database_url(),
            HDET_RAY_ADDRESS=stack.ray_address,
            RAY_AUTH_TOKEN_PATH=str(stack.ray_token_path),
            MLFLOW_TRACKING_URI=stack.mlflow_uri,
            HDET_ENTRYPOINT_PYTHON=sys.executable,
            HDET_JOB_ENV=json.dumps(settings.job_env),
            HDET_RECONCILE_INTERVAL_S="0.5",
            HDET_HOME=str(stack.home),
        )
        self.env = env
        self.log = log
        self.proc: Any = None

    def start(self) -> None:
        import subprocess

        argv = [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory"]
        argv += ["--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 180) -> None:
        import httpx

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the API exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                return httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout_s, "the API to be ready", every_s=0.5)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


class TcpForward:
    """Forwards connections to ``port`` on 127.0.0.1 to ``target`` (``host:port``): a service
    that comes back at an address where nothing answered before."""

    def __init__(self, port: int, target: str):
        import socket
        import threading

        host, _, target_port = target.rpartition(":")
        self.target = (host, int(target_port))
        self.server = socket.create_server(("127.0.0.1", port))
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        import socket
        import threading

        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((conn, upstream), (upstream, conn)):
                t = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                t.start()
                self._threads.append(t)

    @staticmethod
    def _pump(src: Any, dst: Any) -> None:
        import socket

        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()
