"""``hdet bench api``'s load: an open loop charges a request for the time it waited behind a slow one;
a closed loop does not. Checked against a small HTTP server that answers one request at a time."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from benchmarks.api import run_load

SERVICE_S = 0.02  # each answer takes this long, one at a time


class _Slow(BaseHTTPRequestHandler):
    def _answer(self, code: int, body: dict[str, str]) -> None:
        time.sleep(SERVICE_S)
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["Content-Length"]))
        self._answer(202, {"id": "e1"})

    def do_GET(self) -> None:  # noqa: N802
        self._answer(200, {})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def slow_url() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Slow)  # not threading: requests queue behind each other
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_open_loop_charges_the_wait_behind_an_overloaded_server(slow_url: str) -> None:
    # 4 clients offering 200 requests/s to a server that answers 50/s: the backlog grows all along
    load, _ = run_load(slow_url, "t" * 32, clients=4, seconds=1.5, reads=1, rate=200)
    assert load.quantile_ms("GET /v1/experiments", 0.99) > 10 * 1000 * SERVICE_S
    assert any("NOT met" in line for line in load.goals())


def test_closed_loop_latency_is_the_clients_over_the_throughput(slow_url: str) -> None:
    load, took = run_load(slow_url, "t" * 32, clients=4, seconds=1.5, reads=1, rate=0)
    # every request waits for at most the other 3 clients' requests: about 4 service times
    assert load.quantile_ms("GET /v1/experiments", 0.5) < 6 * 1000 * SERVICE_S
    assert load.goals() and "goal" not in load.report(took)


def test_open_loop_under_capacity_measures_the_service_time(slow_url: str) -> None:
    load, _ = run_load(slow_url, "t" * 32, clients=2, seconds=1.5, reads=1, rate=10)
    assert load.quantile_ms("GET /v1/experiments", 0.5) < 3 * 1000 * SERVICE_S
    assert not load.errors
