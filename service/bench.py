"""``hdet bench api``: latency of the REST API under concurrent loopback clients (submit, read one
record, list), measured against a running service (``--url``) or an embedded stack it starts.

The embedded stack is ``hdet serve`` with its jobs held ``PENDING`` on an entrypoint resource no
node has (``HDET_ENTRYPOINT_RESOURCES``), cancelled at the end: it measures the API and Ray's Jobs
API, not training. Each client loops ``POST /v1/experiments``, then ``GET /v1/experiments/{id}`` and
``GET /v1/experiments`` ``--reads`` times each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["main"]

_NEVER = {"hdet_bench_never": 1.0}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hdet bench api", description="Latency of the REST API under load.")
    p.add_argument("--url", help="a running service (default: start an embedded stack)")
    p.add_argument("--token", help="its API token (default: HDET_API_TOKEN)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    p.add_argument("--seconds", type=float, default=30.0, help="how long they send (default 30)")
    p.add_argument("--reads", type=int, default=4, help="GETs of each kind per POST (default 4)")
    return p


def _spec(i: int) -> dict[str, Any]:
    import yaml

    path = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    data = yaml.safe_load(path.read_text())
    data["name"] = f"bench-{i}"
    data["tracking"]["experiment"] = "bench-api"
    return dict(data)


class _Load:
    """The clients, their latencies per route and the non-2xx answers."""

    def __init__(self, url: str, token: str, reads: int):
        self.url, self.reads = url, reads
        self.headers = {"Authorization": f"Bearer {token}"}
        self.times: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, int] = defaultdict(int)
        self.ids: list[str] = []
        self.lock = threading.Lock()

    def _timed(self, client: Any, route: str, method: str, path: str, **kw: Any) -> Any:
        t0 = time.perf_counter()
        r = client.request(method, path, **kw)
        took = time.perf_counter() - t0
        with self.lock:
            self.times[route].append(took)
            if not 200 <= r.status_code < 300:
                self.errors[f"{route} -> {r.status_code}"] += 1
        return r

    def client(self, n: int, until: float) -> None:
        import httpx

        body = json.dumps(_spec(n))
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=60) as c:
            while time.monotonic() < until:
                r = self._timed(
                    c, "POST /v1/experiments", "POST", "/v1/experiments",
                    content=body, headers={"Content-Type": "application/json"},
                )  # fmt: skip
                if r.status_code != 202:
                    continue
                exp_id = r.json()["id"]
                with self.lock:
                    self.ids.append(exp_id)
                for _ in range(self.reads):
                    self._timed(c, "GET /v1/experiments/{id}", "GET", f"/v1/experiments/{exp_id}")
                    self._timed(c, "GET /v1/experiments", "GET", "/v1/experiments", params={"limit": 50})

    def report(self, seconds: float) -> str:
        lines = [f"{'route':<28} {'count':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"]
        for route, times in sorted(self.times.items()):
            t = sorted(times)
            p50, p99 = (1000 * t[min(len(t) - 1, int(q * len(t)))] for q in (0.5, 0.99))
            lines.append(f"{route:<28} {len(t):>7} {p50:>8.1f} {p99:>8.1f} {1000 * t[-1]:>8.1f}")
        total = sum(len(t) for t in self.times.values())
        lines.append(f"{total} requests in {seconds:.0f} s ({total / seconds:.0f}/s)")
        lines += [f"non-2xx: {k}: {v}" for k, v in sorted(self.errors.items())] or ["non-2xx: none"]
        return "\n".join(lines)


def _embedded() -> tuple[subprocess.Popen[bytes], str, str, Path]:
    """``hdet serve`` on free ports in a temporary home; its jobs never get their entrypoint resource."""
    import httpx

    from service.stack import free_port

    home = Path(tempfile.mkdtemp(prefix="hdet-bench-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HDET_", "RAY_", "MLFLOW_"))}
    env.update(HDET_HOME=str(home), HDET_API_PORT=str(port), HDET_ENTRYPOINT_RESOURCES=json.dumps(_NEVER))
    log = open(home / "serve.log", "wb")  # noqa: SIM115 - the server writes to it until it stops
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"hdet bench api: hdet serve exited; its log: {home / 'serve.log'}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return proc, url, (home / "api-token").read_text().strip(), home
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.send_signal(signal.SIGINT)
    raise SystemExit(f"hdet bench api: the embedded stack was not ready in 300 s; see {home / 'serve.log'}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    proc = None
    if args.url:
        url, token = args.url.rstrip("/"), args.token or os.environ.get("HDET_API_TOKEN", "").split(",")[0]
        if not token:
            print("hdet bench api: --token (or HDET_API_TOKEN) is needed with --url", file=sys.stderr)
            return 2
    else:
        print("hdet bench api: starting an embedded stack (hdet serve) ...", flush=True)
        proc, url, token, home = _embedded()
    try:
        load = _Load(url, token, args.reads)
        until = time.monotonic() + args.seconds
        threads = [threading.Thread(target=load.client, args=(i, until)) for i in range(args.clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(f"{args.clients} clients, {url}")
        print(load.report(time.monotonic() - t0), flush=True)
        import httpx

        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
            for exp_id in load.ids:
                c.post(f"/v1/experiments/{exp_id}/cancel")
        return 1 if load.errors else 0
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            if proc.wait(60) == 0:
                shutil.rmtree(home, ignore_errors=True)  # its logs are kept when it did not stop cleanly
