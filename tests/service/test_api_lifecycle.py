"""Real training through REST: the tiny spec (1 epoch) from POST to SUCCEEDED with results from
MLflow, across an API killed mid-run and restarted on the same database; a second, longer job
cancelled while it trains (its log followed until the job ends). The API runs under uvicorn in a
process of its own over the session's Ray head and MLflow server.

One module fixture does the slow part once (two jobs side by side, about a minute of training on
a small machine); the tests below assert on what it saw.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow import MlflowClient
from svc_helpers import ApiProcess, Stack, auth, tiny_spec, wait_for

from workers.procfs import descendants, proc_stats
from workers.tracking import Tag

LONG_EPOCHS = 40


def _get(c: httpx.Client, exp_id: str) -> dict[str, Any]:
    r = c.get(f"/v1/experiments/{exp_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


def _post(c: httpx.Client, spec: dict[str, Any]) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    r = c.post("/v1/experiments", content=json.dumps(spec), headers={"Content-Type": "application/json"})
    took = time.perf_counter() - t0
    assert r.status_code == 202, r.text
    return dict(r.json()), took


@pytest.fixture(scope="module")
def lifecycle(
    stack: Stack, request: pytest.FixtureRequest, scratch: Callable[[pytest.FixtureRequest, str], Path]
) -> Iterator[dict[str, Any]]:
    tmp = scratch(request, "lifecycle")
    db = tmp / "service.db"
    seen: dict[str, Any] = {"followed": []}
    first = ApiProcess(stack, db, tmp / "api-1.log")
    first.start()
    first.wait_ready()
    c1 = httpx.Client(base_url=first.url, headers=auth(), timeout=30)
    a, seen["submit_s_a"] = _post(c1, tiny_spec("life-a"))
    b, seen["submit_s_b"] = _post(c1, tiny_spec("life-b", **{"train.epochs": LONG_EPOCHS, "dataset.seed": 1}))
    seen["a"], seen["b"] = a["id"], b["id"]
    seen["statuses_a"] = [a["status"]]
    wait_for(lambda: _get(c1, a["id"])["status"] == "RUNNING", 300, "job A to run")
    seen["before_kill"] = _get(c1, a["id"])
    background = descendants(first.proc.pid)  # its reconciler's and submitter's process
    seen["background"] = background
    first.kill()  # a crash, mid-run: no shutdown of anything
    seen["background_left"] = wait_for(
        lambda: "none" if not {p for p, f in proc_stats().items() if f[0] != "Z"} & background else None,
        60,
        "the crashed API's background process to end",
    )

    second = ApiProcess(stack, db, tmp / "api-2.log")
    second.start()
    try:
        second.wait_ready()
        c2 = httpx.Client(base_url=second.url, headers=auth(), timeout=30)
        seen["after_restart"] = _get(c2, a["id"])
        seen["final_a"] = wait_for(
            lambda: (r := _get(c2, a["id"]))["status"] in ("SUCCEEDED", "FAILED", "LOST") and r,
            900,
            "job A to end",
        )

        # B trains: its child run is RUNNING in MLflow (the reconciler's progress says so)
        wait_for(
            lambda: ((_get(c2, b["id"])["progress"] or {}).get("runs") or {}).get("RUNNING"),
            600,
            "B's training run",
        )

        def follow() -> None:
            with httpx.stream(
                "GET", f"{second.url}/v1/experiments/{b['id']}/logs", params={"follow": "true", "tail": 5},
                headers=auth(), timeout=httpx.Timeout(10, read=300),
            ) as r:  # fmt: skip
                seen["follow_status"] = r.status_code
                for chunk in r.iter_text():
                    seen["followed"].append(chunk)
            seen["follow_ended_at"] = time.monotonic()

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        time.sleep(3)
        cancel = c2.post(f"/v1/experiments/{b['id']}/cancel")
        seen["cancel"] = (cancel.status_code, cancel.json()["status"])
        seen["cancel_again"] = c2.post(f"/v1/experiments/{b['id']}/cancel").status_code
        seen["final_b"] = wait_for(
            lambda: (r := _get(c2, b["id"]))["status"] in ("CANCELLED", "SUCCEEDED", "FAILED", "LOST") and r,
            180,
            "job B to be cancelled",
        )
        seen["cancelled_at"] = time.monotonic()
        follower.join(120)
        seen["cancel_ended"] = c2.post(f"/v1/experiments/{b['id']}/cancel").status_code
        seen["events_a"] = c2.get(f"/v1/experiments/{a['id']}/events").json()["items"]
        seen["events_b"] = c2.get(f"/v1/experiments/{b['id']}/events").json()["items"]
        seen["results_a"] = c2.get(f"/v1/experiments/{a['id']}/results").json()
        seen["logs_a"] = c2.get(f"/v1/experiments/{a['id']}/logs").text
        seen["logs_a_tail"] = c2.get(f"/v1/experiments/{a['id']}/logs", params={"tail": 3}).text
        seen["compare"] = c2.get("/v1/compare", params={"ids": f"{a['id']},{b['id']}"}).json()
        seen["get_ms"] = _time_gets(c2, a["id"])
        yield seen
    finally:
        second.stop()


def _time_gets(c: httpx.Client, exp_id: str, n: int = 50) -> dict[str, float]:
    """Latency of the database-only GETs, milliseconds: median and max of ``n``."""
    out = {}
    for path in (f"/v1/experiments/{exp_id}", "/v1/experiments"):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            assert c.get(path).status_code == 200
            times.append(1000 * (time.perf_counter() - t0))
        times.sort()
        out[path] = (times[n // 2], times[-1])
    print(f"\nGET latency (ms, median/max of {n}): {out}")
    return out  # type: ignore[return-value]


def test_the_tiny_spec_runs_to_succeeded_through_rest(lifecycle: dict[str, Any]) -> None:
    final = lifecycle["final_a"]
    assert lifecycle["statuses_a"] == ["SUBMITTING"]  # answered before Ray had the job
    assert final["status"] == "SUCCEEDED", final
    assert final["ray"]["status"] == "SUCCEEDED" and final["ray"]["exit_code"] == 0
    assert final["started_at"] and final["ended_at"] and final["status_checked_at"]
    assert final["progress"]["epoch"] == 1 and final["progress"]["runs"] == {"FINISHED": 1}
    print(f"\nsubmit latency: A {lifecycle['submit_s_a']:.3f} s, B {lifecycle['submit_s_b']:.3f} s")


def test_a_killed_api_restarted_on_the_same_database_loses_nothing(lifecycle: dict[str, Any]) -> None:
    before, after = lifecycle["before_kill"], lifecycle["after_restart"]
    for key in ("id", "name", "spec", "created_at", "started_at"):
        assert after[key] == before[key], key
    transitions = [(e["from"], e["to"]) for e in lifecycle["events_a"]]
    assert transitions == [
        (None, "SUBMITTING"),
        ("SUBMITTING", "PENDING"),
        ("PENDING", "RUNNING"),
        ("RUNNING", "SUCCEEDED"),
    ]
    assert [e["seq"] for e in lifecycle["events_a"]] == [1, 2, 3, 4]


def test_a_crashed_apis_background_process_ends_with_it(lifecycle: dict[str, Any]) -> None:
    assert lifecycle["background"]  # the reconciler and the submitter ran in a process of their own
    assert lifecycle["background_left"] == "none"


def test_results_come_from_mlflow_with_ap_a_checkpoint_and_a_ui_link_that_answers(
    lifecycle: dict[str, Any],
) -> None:
    results = lifecycle["results_a"]
    assert results["partial"] is False
    assert results["parent"]["status"] == "FINISHED"
    (run,) = results["runs"]
    assert run["status"] == "FINISHED" and run["seed"] == 0
    assert 0.0 <= run["metrics"]["AP"] <= 1.0
    assert run["checkpoint"] == f"runs:/{run['run_id']}/checkpoint/model.pt"
    link = lifecycle["final_a"]["mlflow"]["link"]
    assert link.endswith(f"/runs/{results['parent']['run_id']}")
    assert httpx.get(link, timeout=10).status_code == 200


def test_logs_keep_the_epoch_line_and_tail_limits_them(lifecycle: dict[str, Any]) -> None:
    assert "epoch 1/1" in lifecycle["logs_a"]
    assert 0 < len(lifecycle["logs_a_tail"].splitlines()) <= 3


def test_cancel_of_a_training_job_ends_cancelled_with_no_mlflow_run_left_running(
    stack: Stack, lifecycle: dict[str, Any]
) -> None:
    assert lifecycle["cancel"] == (202, "CANCELLING")
    assert lifecycle["cancel_again"] == 202
    final = lifecycle["final_b"]
    assert final["status"] == "CANCELLED", final
    assert final["ray"]["status"] == "STOPPED"
    assert lifecycle["cancel_ended"] == 409
    transitions = [(e["from"], e["to"]) for e in lifecycle["events_b"]]
    assert transitions[-2:] == [("RUNNING", "CANCELLING"), ("CANCELLING", "CANCELLED")]
    c = MlflowClient(tracking_uri=stack.mlflow_uri)
    parent = c.get_run(final["mlflow"]["parent_run_id"])
    assert parent.data.tags[Tag.EXPERIMENT_ID] == final["id"]
    children = c.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert children
    assert {r.info.status for r in [parent, *children]} <= {"KILLED", "FAILED", "FINISHED"}


def test_a_followed_log_streams_until_the_job_ends(lifecycle: dict[str, Any]) -> None:
    assert lifecycle["follow_status"] == 200
    assert "".join(lifecycle["followed"]).strip()
    # the stream ended by itself once Ray stopped the job
    assert lifecycle.get("follow_ended_at") is not None


def test_compare_puts_the_experiments_side_by_side(lifecycle: dict[str, Any]) -> None:
    body = lifecycle["compare"]
    a, b = body["experiments"]
    assert a["id"] == lifecycle["a"] and a["seeds"] == [0]
    assert 0.0 <= a["mean"]["AP"] <= 1.0
    assert b["seeds"] == []  # cancelled before a training run finished
    assert body["paired"][lifecycle["b"]]["comparison"] is None
