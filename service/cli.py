"""``hdet serve``: the local stack in one command: a Ray head and an MLflow server (unless given),
then the API under uvicorn; on SIGINT or SIGTERM the API stops first, then only what it started.

A component that fails to start: exit 1 naming it and its log. The API token is
``HDET_API_TOKEN``, else ``$HDET_HOME/api-token`` (generated, mode 0600, on first use).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from workers.env import RESERVATION_ROOM_CPUS, LocalRay, cpus_argument, local_ray_cpus, write_secret

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hdet serve", description="Run the HarmonicDet REST service locally.")
    p.add_argument("--host", help="bind address of the API (default 127.0.0.1; HDET_API_HOST)")
    p.add_argument("--port", type=int, help="port of the API (default 8000; HDET_API_PORT)")
    p.add_argument("--ray-address", help="Jobs API of a running Ray (default: start a local head)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: start an mlflow server)")
    p.add_argument("--database-url", help="records database (default: SQLite $HDET_HOME/service.db)")
    p.add_argument(
        "--num-cpus",
        type=cpus_argument,
        help="cores the trainings of the local Ray head may use (default: this machine's; the head has one "
        "logical CPU more, for the Tune trials' small reservations); the trainings beyond them wait their turn",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from pydantic import ValidationError

    from service.settings import Settings, SettingsError

    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "api_host": args.host,
            "api_port": args.port,
            "ray_address": args.ray_address,
            "mlflow_tracking_uri": args.mlflow_uri,
            "database_url": args.database_url,
        }.items()
        if v is not None
    }
    try:
        settings = Settings(**overrides)
    except (ValidationError, SettingsError) as e:
        print(f"hdet serve: {_first_error(e)}", file=sys.stderr)
        return 2
    return _Stack(settings, args.num_cpus).run()


def _first_error(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        msgs = [str(err.get("msg", "")).removeprefix("Value error, ") for err in errors()]
        return "; ".join(msgs)
    return str(e)


def tune_for_latency() -> None:
    """The API process's settings for a short tail of request latencies (``hdet bench api``)."""
    import gc

    from service.jobs import preload

    preload()
    # What start-up built lives as long as the API: frozen, a full collection no longer walks its
    # 250,000+ objects (0.07-0.12 s each time, measured, every request waiting behind it).
    gc.collect()
    gc.freeze()
    # A thread that waits for the GIL behind a busy one (the reconciler's pass) gets it within 1 ms
    # instead of Python's 5 ms; a request takes it many times.
    sys.setswitchinterval(0.001)


class _Stack:
    """What ``hdet serve`` started, and the order it stops it in."""

    def __init__(self, settings: Any, num_cpus: float | None):
        self.settings = settings
        # The rule of `hdet run`'s local Ray; any job may run a search, so the trials' room is kept.
        self.num_cpus = local_ray_cpus(num_cpus, reserved=RESERVATION_ROOM_CPUS)
        self.home: Path = settings.home_dir()
        self.started: list[Any] = []
        self.stopping = threading.Event()
        self.server: Any = None

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stopping.set()
        if self.server is not None:
            self.server.should_exit = True

    def run(self) -> int:
        from service.stack import StartError

        # Our own handlers: a script's `hdet serve &` inherits SIGINT ignored, and uvicorn hands the
        # signals it caught back to these after it stopped.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            try:
                settings = self._start_components()
            except StartError as e:
                print(f"hdet serve: {e}", file=sys.stderr)
                return 0 if self.stopping.is_set() else 1
            return self._serve(settings)
        finally:
            self._stop_components()

    def _start_components(self) -> Any:
        from service.stack import LocalMlflow, RayHead

        s = self.settings
        updates: dict[str, Any] = {"home": str(self.home)}
        token_file = self.home / "api-token"
        if not s.tokens():
            updates["api_token"] = write_secret(token_file)
        waits: list[Any] = []
        if not s.ray_address:
            ray = RayHead(
                self.home, LocalRay.create(self.num_cpus, home=self.home, dashboard=True, token=True)
            )
            ray.start()
            self.started.append(ray)
            waits.append(ray)
            updates.update(
                ray_address=ray.address,
                ray_auth_token_path=str(ray.token_path),
                entrypoint_python=s.entrypoint_python or sys.executable,
                job_env={**ray.job_env(), "HDET_HOME": str(self.home), **(s.job_env or {})},
            )
        if not s.mlflow_tracking_uri:
            store = self.home / "mlflow"  # the CLI's store (workers.env.default_tracking_uri)
            store.mkdir(parents=True, exist_ok=True)
            mlflow = LocalMlflow(self.home, f"sqlite:///{store / 'mlflow.db'}", store / "artifacts")
            mlflow.start()
            self.started.append(mlflow)
            waits.append(mlflow)
            updates["mlflow_tracking_uri"] = mlflow.address
        failed = threading.Event()  # one failed: the others stop waiting

        def wait(component: Any) -> None:
            try:
                component.wait_ready(
                    component.ready, 300.0, lambda: self.stopping.is_set() or failed.is_set()
                )
            except Exception:
                failed.set()
                raise

        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = [pool.submit(wait, p) for p in waits]
        errors = [f.exception() for f in futures if f.exception() is not None]
        first = next((e for e in errors if "interrupted" not in str(e)), errors[0] if errors else None)
        if first is not None:
            raise first
        settings = type(s)(**{**s.model_dump(), **updates})  # validated again
        print(f"HarmonicDet API   http://{settings.api_host}:{settings.api_port}  (docs: /docs)")
        for component in self.started:
            print(f"started {component.describe()}")
        print(f"Ray Jobs API      {settings.ray_address}")
        print(f"MLflow            {settings.resolved_tracking_uri()}")
        if "api_token" in updates:
            # stdout is a log under a process manager: a prefix to tell tokens apart, never the token
            print(f"API token         {settings.tokens()[0][:4]}... (mode 0600 in {token_file})")
        print(f"records           {settings.resolved_database_url()}", flush=True)
        return settings

    def _serve(self, settings: Any) -> int:
        import uvicorn

        from service.app import create_app

        if self.stopping.is_set():
            return 0
        import logging

        # The reconciler's transitions and warnings beside uvicorn's lines (never a token in them).
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     [hdet] %(message)s"))
        service_log = logging.getLogger("hdet.service")
        service_log.addHandler(handler)
        service_log.setLevel(logging.INFO)
        app = create_app(settings)
        tune_for_latency()
        config = uvicorn.Config(app, host=settings.api_host, port=settings.api_port, log_level="info")
        self.server = uvicorn.Server(config)
        self.server.run()
        return 0 if self.stopping.is_set() or self.server.started else 1

    def _stop_components(self) -> None:
        from service.stack import stop_all

        for component in self.started:
            print(f"hdet serve: stopping {component.name} (pid {component.pid})", flush=True)
        stop_all(self.started)
        self.started.clear()
