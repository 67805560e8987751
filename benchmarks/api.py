"""``hdet bench api``: latency of the REST API under concurrent loopback clients (submit, read one
record, list), measured against a running service (``--url``) or an embedded stack it starts.

The embedded stack is ``hdet serve`` with its jobs held ``PENDING`` on an entrypoint resource no
node has (``HDET_ENTRYPOINT_RESOURCES``), cancelled at the end: it measures the API and Ray's Jobs
API, not training. Each client loops ``POST /v1/experiments``, then ``GET /v1/experiments/{id}`` and
``GET /v1/experiments`` ``--reads`` times each.

By default the clients are an open loop at ``--rate`` requests a second in all: each request has a
due time, and its latency counts from that time, so a request that waits behind a slow one is
charged for the wait (no coordinated omission). With 32 clients in a closed loop (``--rate 0``) every
client sends as soon as its last answer came, so by Little's law the mean latency is just 32 over
the throughput: that mode measures the most requests a second the service answers, not latency.
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

__all__ = ["main", "run_load", "GOALS", "RATE"]

_NEVER = {"hdet_bench_never": 1.0}
#: the default offered load: the request rate at which the service's read goals were first measured
RATE = 230.0
#: p99 goals in ms: a submission answered, a record or a page read
GOALS = {"POST": 100.0, "GET": 25.0}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hdet bench api", description="Latency of the REST API under load.")
    p.add_argument("--url", help="a running service (default: start an embedded stack)")
    p.add_argument("--token", help="its API token (default: HDET_API_TOKEN)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    p.add_argument("--seconds", type=float, default=30.0, help="how long they send (default 30)")
    p.add_argument("--reads", type=int, default=4, help="GETs of each kind per POST (default 4)")
    p.add_argument(
        "--rate",
        type=float,
        default=RATE,
        help=f"requests a second, all clients together (default {RATE:g}); 0: closed loop, as fast as answered",
    )
    p.add_argument(
        "--max-active",
        type=int,
        help="the embedded service's HDET_MAX_ACTIVE: experiments in Ray at once (default: the service's)",
    )
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

    def __init__(self, url: str, token: str, reads: int, clients: int, rate: float):
        self.url, self.reads, self.clients = url, reads, clients
        self.interval = clients / rate if rate > 0 else 0.0  # one client's time between due requests
        self.headers = {"Authorization": f"Bearer {token}"}
        self.times: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, int] = defaultdict(int)
        self.ids: list[str] = []
        self.lock = threading.Lock()

    def _due(self, due: float) -> float:
        """Wait for a request's due time (open loop) and return when its latency starts."""
        if not self.interval:
            return time.perf_counter()
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return due

    def _timed(self, client: Any, due: float, route: str, method: str, path: str, **kw: Any) -> Any:
        t0 = self._due(due)
        r = client.request(method, path, **kw)
        took = time.perf_counter() - t0
        with self.lock:
            self.times[route].append(took)
            if not 200 <= r.status_code < 300:
                self.errors[f"{route} -> {r.status_code}"] += 1
        return r

    def client(self, n: int, seconds: float, ready: threading.Barrier) -> None:
        import httpx

        body = json.dumps(_spec(n))
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=60) as c:
            c.get("/healthz")  # the client and its connection exist before the clock starts
            ready.wait()
            start = time.perf_counter()
            until = start + seconds
            # the clients' due times are spread over one interval so they do not all send at once
            due = start + self.interval * n / self.clients

            def step() -> float:
                nonlocal due
                at, due = due, due + self.interval
                return at

            while time.perf_counter() < until:
                r = self._timed(
                    c, step(), "POST /v1/experiments", "POST", "/v1/experiments",
                    content=body, headers={"Content-Type": "application/json"},
                )  # fmt: skip
                if r.status_code != 202:
                    continue
                exp_id = r.json()["id"]
                with self.lock:
                    self.ids.append(exp_id)
                for _ in range(self.reads):
                    self._timed(c, step(), "GET /v1/experiments/{id}", "GET", f"/v1/experiments/{exp_id}")
                    self._timed(
                        c, step(), "GET /v1/experiments", "GET", "/v1/experiments", params={"limit": 50}
                    )

    def quantile_ms(self, route: str, q: float) -> float:
        t = sorted(self.times[route])
        return 1000 * t[min(len(t) - 1, int(q * len(t)))]

    def goals(self) -> list[str]:
        """Each route's p99 against its method's goal (:data:`GOALS`)."""
        out = []
        for route in sorted(self.times):
            goal, p99 = GOALS[route.split()[0]], self.quantile_ms(route, 0.99)
            out.append(
                f"{route}: p99 {p99:.1f} ms, goal <= {goal:g} ms: {'met' if p99 <= goal else 'NOT met'}"
            )
        return out

    def report(self, seconds: float) -> str:
        lines = [f"{'route':<28} {'count':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"]
        for route, times in sorted(self.times.items()):
            p50, p99 = self.quantile_ms(route, 0.5), self.quantile_ms(route, 0.99)
            lines.append(f"{route:<28} {len(times):>7} {p50:>8.1f} {p99:>8.1f} {1000 * max(times):>8.1f}")
        total = sum(len(t) for t in self.times.values())
        lines.append(f"{total} requests in {seconds:.0f} s ({total / seconds:.0f}/s)")
        lines += [f"non-2xx: {k}: {v}" for k, v in sorted(self.errors.items())] or ["non-2xx: none"]
        if self.interval:  # latency goals mean something only at a stated load
            lines += self.goals()
        return "\n".join(lines)


def run_load(
    url: str, token: str, *, clients: int, seconds: float, reads: int, rate: float
) -> tuple[_Load, float]:
    """``clients`` threads sending for ``seconds``; the load and how long it took."""
    load = _Load(url, token, reads, clients, rate)
    ready = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=load.client, args=(i, seconds, ready)) for i in range(clients)]
    for t in threads:
        t.start()
    ready.wait()  # every client has connected: the time starts
    t0 = time.monotonic()
    for t in threads:
        t.join()
    return load, time.monotonic() - t0


def _embedded(max_active: int | None = None) -> tuple[subprocess.Popen[bytes], str, str, Path]:
    """``hdet serve`` on free ports in a temporary home; its jobs never get their entrypoint resource."""
    import httpx

    from service.stack import free_port

    home = Path(tempfile.mkdtemp(prefix="hdet-bench-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HDET_", "RAY_", "MLFLOW_"))}
    env.update(HDET_HOME=str(home), HDET_API_PORT=str(port), HDET_ENTRYPOINT_RESOURCES=json.dumps(_NEVER))
    if max_active is not None:
        env["HDET_MAX_ACTIVE"] = str(max_active)
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


def _count(client: Any, status: str) -> int:
    """How many records are in ``status`` (every page of the list)."""
    n, cursor = 0, None
    while True:
        params: dict[str, Any] = {"status": status, "limit": 200}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/experiments", params=params).json()
        n += len(page["items"])
        cursor = page.get("next_cursor")
        if not cursor:
            return n


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    proc = None
    if args.url and args.max_active is not None:
        print("hdet bench api: --max-active sets the embedded service's; not with --url", file=sys.stderr)
        return 2
    if args.url:
        url, token = args.url.rstrip("/"), args.token or os.environ.get("HDET_API_TOKEN", "").split(",")[0]
        if not token:
            print("hdet bench api: --token (or HDET_API_TOKEN) is needed with --url", file=sys.stderr)
            return 2
    else:
        print("hdet bench api: starting an embedded stack (hdet serve) ...", flush=True)
        proc, url, token, home = _embedded(args.max_active)
    try:
        load, took = run_load(
            url, token, clients=args.clients, seconds=args.seconds, reads=args.reads, rate=args.rate
        )
        loop = f"open loop at {args.rate:g} requests/s offered" if args.rate > 0 else "closed loop"
        print(f"{args.clients} clients, {loop}, {url}")
        print(load.report(took), flush=True)
        import httpx

        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
            queued = _count(c, "SUBMITTING")
            print(
                f"submissions in Ray at the end: {len(load.ids) - queued} of {len(load.ids)}, {queued} queued"
            )
            for exp_id in load.ids:
                c.post(f"/v1/experiments/{exp_id}/cancel")
        return 1 if load.errors else 0
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            if proc.wait(60) == 0:
                shutil.rmtree(home, ignore_errors=True)  # its logs are kept when it did not stop cleanly
