"""Submission without training: a record answered SUBMITTING before Ray has its job, then sent by
the submitter (again after a restart, later when Ray was down, never when Ray refuses it),
idempotency, the list's keyset pages and filters, cancelling a job Ray holds PENDING, Ray or MLflow
down, and what the reconciler does with records and jobs that lost each other (LOST, an MLflow
parent's outcome, orphans). Real Ray Jobs API, real MLflow server, real SQLite; the jobs ask for a
resource no node has, so none of them trains."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from svc_helpers import NEVER, Stack, TcpForward, auth, post_spec, settings_for, tiny_spec, wait_for

from service.app import Service, create_app
from service.background import InProcess
from service.db import Store, aware
from service.experiments import ACCEPTED, SERVICE_METADATA
from service.intake import body_hash, canonical_json
from service.jobs import RayJobs
from service.models import EventRow, ExperimentRow, utcnow
from service.stack import free_port
from service.states import TERMINAL, Status
from workers.spec import Spec
from workers.tracking import PARENT_ROLE, Tag


@pytest.fixture(scope="module")
def client(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    db = tmp_path_factory.mktemp("submissions") / "service.db"
    with TestClient(create_app(settings_for(stack, db, entrypoint_resources=NEVER))) as c:
        yield c
        # no job of this module stays behind on the shared cluster
        for item in c.get("/v1/experiments", params={"limit": 200}, headers=auth()).json()["items"]:
            if item["status"] in ("SUBMITTING", "PENDING", "RUNNING"):
                c.post(f"/v1/experiments/{item['id']}/cancel", headers=auth())


def _service(client: TestClient) -> Service:
    return client.app.state.service  # type: ignore[attr-defined, no-any-return]


def _status(client: TestClient, exp_id: str) -> str:
    return str(client.get(f"/v1/experiments/{exp_id}", headers=auth()).json()["status"])


def _record(client: TestClient, exp_id: str) -> dict[str, Any]:
    r = client.get(f"/v1/experiments/{exp_id}", headers=auth())
    assert r.status_code == 200, r.text
    return dict(r.json())


def _submitted(client: TestClient, *ids: str) -> None:
    """Wait until the submitter has sent each of ``ids`` to Ray."""
    for exp_id in ids:
        submitted = lambda i=exp_id: _status(client, i) != "SUBMITTING"  # noqa: E731
        wait_for(submitted, 60, f"{exp_id} to be submitted")


def _events(client: TestClient, exp_id: str) -> list[tuple[Any, ...]]:
    items = client.get(f"/v1/experiments/{exp_id}/events", headers=auth()).json()["items"]
    return [(e["seq"], e["from"], e["to"], e["reason"]) for e in items]


# ---------------------------------------------------------------------- accepted, then submitted


def test_a_submission_is_answered_submitting_and_the_submitter_sends_it_to_ray(client: TestClient) -> None:
    r = post_spec(client, tiny_spec("accepted"))
    assert r.status_code == 202, r.text
    answered = r.json()
    # the answer is the stored record, before any word from Ray
    assert answered["status"] == "SUBMITTING" and answered["waiting_for"] is None
    assert answered["ray"] == {
        "submission_id": answered["id"], "status": None, "message": None, "exit_code": None, "submit_s": None,
    }  # fmt: skip
    exp_id = answered["id"]
    _submitted(client, exp_id)
    record = _record(client, exp_id)
    assert record["status"] == "PENDING" and record["ray"]["submit_s"] > 0
    assert (
        _service(client).jobs.info(exp_id).metadata[SERVICE_METADATA]
        == _service(client).experiments.service_id
    )
    assert _events(client, exp_id) == [
        (1, None, "SUBMITTING", ACCEPTED),
        (2, "SUBMITTING", "PENDING", "submitted to Ray"),
    ]


# ---------------------------------------------------------------------- idempotency


def test_a_repeat_with_the_same_key_and_body_gets_the_same_record(client: TestClient) -> None:
    first = post_spec(client, tiny_spec("idem-a"), **{"Idempotency-Key": "key-a"})
    assert first.status_code == 202, first.text
    again = post_spec(client, tiny_spec("idem-a"), **{"Idempotency-Key": "key-a"})
    assert again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"] == f"/v1/experiments/{first.json()['id']}"
    assert (
        first.json()["status"] == "SUBMITTING" and first.json()["ray"]["submission_id"] == first.json()["id"]
    )
    assert "idempotent-replayed" not in first.headers


def test_the_same_key_with_another_body_is_422(client: TestClient) -> None:
    assert post_spec(client, tiny_spec("idem-b"), **{"Idempotency-Key": "key-b"}).status_code == 202
    r = post_spec(client, tiny_spec("idem-b", **{"loss.alpha": 1.0}), **{"Idempotency-Key": "key-b"})
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "Idempotency-Key"


def test_a_repeat_while_the_first_is_being_submitted_gets_the_same_record(client: TestClient) -> None:
    service = _service(client)
    spec_json = canonical_json(Spec.parse(tiny_spec("idem-c"), check_paths=False))
    exp_id = service.experiments.new_id("key-c")
    # accepted by another replica, not sent yet
    _store_as_left(service.store, exp_id, "idem-c", Status.SUBMITTING, spec_json, idempotency_key="key-c")
    r = post_spec(client, tiny_spec("idem-c"), **{"Idempotency-Key": "key-c"})
    assert r.status_code == 202 and r.json()["id"] == exp_id
    assert r.headers["idempotent-replayed"] == "true"
    assert r.json()["status"] in ("SUBMITTING", "PENDING")
    _submitted(client, exp_id)
    assert [j.submission_id for j in service.jobs.list()].count(exp_id) == 1


def test_concurrent_repeats_make_one_record_and_one_ray_job(client: TestClient) -> None:
    codes: list[int] = []
    ids: set[str] = set()

    def send() -> None:
        r = post_spec(client, tiny_spec("idem-d"), **{"Idempotency-Key": "key-d"})
        codes.append(r.status_code)
        if r.status_code == 202:
            ids.add(r.json()["id"])

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [202] * 6, codes
    assert len(ids) == 1
    (exp_id,) = ids
    _submitted(client, exp_id)
    jobs = [j for j in _service(client).jobs.list() if j.submission_id == exp_id]
    assert len(jobs) == 1
    listed = client.get("/v1/experiments", params={"name": "idem-d"}, headers=auth()).json()["items"]
    assert [i["id"] for i in listed] == [exp_id]


def test_a_job_ray_already_has_counts_as_submitted(client: TestClient) -> None:
    """A repeated submission whose first attempt reached Ray: no second job, the record is PENDING."""
    service = _service(client)
    exp_id = service.experiments.new_id("key-e")
    metadata = {Tag.EXPERIMENT_ID: exp_id, SERVICE_METADATA: service.experiments.service_id}
    service.jobs.submit(exp_id, "echo first", entrypoint_resources=NEVER, metadata=metadata)
    r = post_spec(client, tiny_spec("idem-e"), **{"Idempotency-Key": "key-e"})
    assert r.status_code == 202 and r.json()["id"] == exp_id
    _submitted(client, exp_id)
    assert _status(client, exp_id) == "PENDING"
    assert _events(client, exp_id)[1] == (
        2,
        "SUBMITTING",
        "PENDING",
        "submitted to Ray (it had the job already)",
    )


def test_a_submission_ray_refuses_ends_failed_with_rays_reason(client: TestClient) -> None:
    """Ray refuses the submission id: someone else's job (``ray job submit --submission-id``) has it."""
    service = _service(client)
    exp_id = service.experiments.new_id("key-taken")
    service.jobs.submit(exp_id, "sleep 300", metadata={SERVICE_METADATA: "someone-else"})
    try:
        r = post_spec(client, tiny_spec("refused"), **{"Idempotency-Key": "key-taken"})
        assert r.status_code == 202 and r.json()["id"] == exp_id
        wait_for(lambda: _status(client, exp_id) in TERMINAL, 60, "the refused record to end")
        record = _record(client, exp_id)
        assert record["status"] == "FAILED" and record["ended_at"] and record["waiting_for"] is None
        reason = record["failure"]["reason"]
        assert reason.startswith("Ray refused the submission:") and "another job" in reason, reason
        assert "someone-else" in record["failure"]["ray_message"]
        assert _events(client, exp_id)[1] == (2, "SUBMITTING", "FAILED", reason)
        assert service.jobs.info(exp_id).status in ("PENDING", "RUNNING")  # theirs: left alone
        again = post_spec(client, tiny_spec("refused"), **{"Idempotency-Key": "key-taken"})
        assert again.json()["status"] == "FAILED" and again.headers["idempotent-replayed"] == "true"
    finally:
        service.jobs.stop(exp_id)


def test_a_restarted_service_submits_what_a_crashed_one_accepted(stack: Stack, tmp_path: Path) -> None:
    """Records stored by an API that died before sending them, one of them after its job reached
    Ray: the next service on the database sends both, and Ray holds one job for each."""
    db = tmp_path / "service.db"
    store = Store(f"sqlite:///{db}")
    jobs = RayJobs(stack.ray_address, stack.ray_token_path.read_text().strip())
    spec_json = canonical_json(Spec.parse(tiny_spec("crashed"), check_paths=False))
    never_sent, reached_ray = (f"exp-{uuid.uuid4().hex[:16]}" for _ in range(2))
    for exp_id in (never_sent, reached_ray):
        _store_as_left(store, exp_id, "crashed", Status.SUBMITTING, spec_json)
    metadata = {Tag.EXPERIMENT_ID: reached_ray, SERVICE_METADATA: store.service_id()}
    jobs.submit(reached_ray, "echo first", entrypoint_resources=NEVER, metadata=metadata)
    store.close()
    assert never_sent not in {j.submission_id for j in jobs.list()}
    with TestClient(create_app(settings_for(stack, db, entrypoint_resources=NEVER))) as c:
        try:
            _submitted(c, never_sent, reached_ray)
            listed = [j.submission_id for j in jobs.list()]
            assert listed.count(never_sent) == 1 and listed.count(reached_ray) == 1
            assert _events(c, never_sent)[1][1:3] == ("SUBMITTING", "PENDING")
            assert "already" in _events(c, reached_ray)[1][3]
            assert {_status(c, never_sent), _status(c, reached_ray)} == {"PENDING"}
        finally:
            for exp_id in (never_sent, reached_ray):
                c.post(f"/v1/experiments/{exp_id}/cancel", headers=auth())


# ---------------------------------------------------------------------- listing


def test_pages_are_newest_first_without_gaps_or_repeats_and_filters_apply(client: TestClient) -> None:
    made = []
    for i in range(5):
        kind = "standard" if i % 2 else "harmonicdet"
        r = post_spec(client, tiny_spec(f"page-{i}", **{"loss.kind": kind}))
        assert r.status_code == 202, r.text
        made.append(r.json()["id"])
    _submitted(client, *made)
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/experiments", params=params, headers=auth()).json()
        assert len(page["items"]) <= 2
        seen += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen))
    assert [i for i in seen if i in made] == made[::-1]  # newest first
    standard = client.get("/v1/experiments", params={"loss": "standard", "limit": 200}, headers=auth()).json()
    assert {i["id"] for i in standard["items"]} >= {made[1], made[3]}
    assert all(i["loss"] == "standard" for i in standard["items"])
    one = client.get("/v1/experiments", params={"name": "page-2", "status": "PENDING"}, headers=auth()).json()
    assert [i["id"] for i in one["items"]] == [made[2]]
    both = client.get(
        "/v1/experiments", params={"name": "page-2", "status": "SUCCEEDED,FAILED"}, headers=auth()
    )
    assert both.json()["items"] == []
    assert client.get("/v1/experiments", params={"arch": "retinanet", "limit": 1}, headers=auth()).json()[
        "next_cursor"
    ]


def test_a_bad_cursor_or_status_is_422(client: TestClient) -> None:
    r = client.get("/v1/experiments", params={"cursor": "not-a-cursor"}, headers=auth())
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "cursor"
    r = client.get("/v1/experiments", params={"status": "PENDING,SUBMITTED"}, headers=auth())
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "status"
    assert "SUBMITTED" in r.json()["errors"][0]["message"]
    assert client.get("/v1/experiments", params={"status": "SUBMITTING"}, headers=auth()).status_code == 200


# ---------------------------------------------------------------------- cancel


def test_cancel_of_a_job_ray_holds_pending_is_cancelling_and_a_repeat_is_a_no_op(client: TestClient) -> None:
    """Ray queues the stop of a job waiting for resources behind its start (the full path to
    CANCELLED is the running job of test_api_lifecycle.py)."""
    exp_id = post_spec(client, tiny_spec("cancel-pending")).json()["id"]
    _submitted(client, exp_id)
    r = client.post(f"/v1/experiments/{exp_id}/cancel", headers=auth())
    assert r.status_code == 202 and r.json()["status"] == "CANCELLING"
    _service(client).reconciler.run_once()
    again = client.post(f"/v1/experiments/{exp_id}/cancel", headers=auth())
    assert again.status_code == 202 and again.json()["status"] == "CANCELLING"
    events = client.get(f"/v1/experiments/{exp_id}/events", headers=auth()).json()["items"]
    assert [(e["seq"], e["from"], e["to"]) for e in events] == [
        (1, None, "SUBMITTING"),
        (2, "SUBMITTING", "PENDING"),
        (3, "PENDING", "CANCELLING"),
    ]
    after = client.get(f"/v1/experiments/{exp_id}/events", params={"after": 2}, headers=auth()).json()
    assert [e["seq"] for e in after["items"]] == [3]
    assert client.post("/v1/experiments/exp-0000000000000000/cancel", headers=auth()).status_code == 404


def test_a_job_whose_training_waits_for_cpus_is_pending_saying_what_it_waits_for(client: TestClient) -> None:
    """Ray runs the job (its driver started) but its only placement group cannot be placed."""
    service = _service(client)
    exp_id = service.experiments.new_id(None)
    driver = (
        "import ray, time; ray.init(); from ray.util.placement_group import placement_group; "
        "pg = placement_group([{'CPU': 64}]); time.sleep(600)"
    )
    # the job first (no service metadata: no orphan sweep stops it before its record exists)
    service.jobs.submit(
        exp_id, shlex.join([sys.executable, "-c", driver]), metadata={Tag.EXPERIMENT_ID: exp_id}
    )
    _insert(service, "waits-for-cpus", Status.PENDING, exp_id)
    try:
        waiting = wait_for(
            lambda: (r := _record(client, exp_id))["waiting_for"] and "64 CPU" in r["waiting_for"] and r,
            180,
            "the record to say what its training waits for",
        )
        assert waiting["status"] == "PENDING" and waiting["ray"]["status"] == "RUNNING", waiting
        assert waiting["waiting_for"].startswith("64 CPU, 0 GPU for 1 training (the cluster has 4 CPU")
        service.reconciler.run_once()
        assert _status(client, exp_id) == "PENDING" and _record(client, exp_id)["started_at"] is None
    finally:
        client.post(f"/v1/experiments/{exp_id}/cancel", headers=auth())
    wait_for(lambda: _status(client, exp_id) == "CANCELLED", 120, "the waiting job to be cancelled")
    assert _record(client, exp_id)["waiting_for"] is None


def test_cancel_of_an_ended_experiment_is_409(stack: Stack, client: TestClient) -> None:
    service = _service(client)
    exp_id = service.experiments.new_id(None)
    _parent(stack, exp_id, "FINISHED")
    _insert(service, "ended", Status.RUNNING, exp_id)
    service.reconciler.run_once()
    assert _status(client, exp_id) == "SUCCEEDED"
    r = client.post(f"/v1/experiments/{exp_id}/cancel", headers=auth())
    assert r.status_code == 409 and r.headers["content-type"].startswith("application/problem+json")


# ---------------------------------------------------------------------- Ray or MLflow down


@pytest.mark.parametrize("background", ["thread", "process"])
def test_while_ray_is_down_a_post_is_accepted_and_submitted_when_ray_is_back(
    stack: Stack, client: TestClient, tmp_path: Path, background: str
) -> None:
    db = tmp_path / "service.db"
    port = free_port()
    settings = settings_for(
        stack, db, ray_address=f"http://127.0.0.1:{port}", ray_timeout_s=2, background=background
    )
    with TestClient(create_app(settings)) as down:
        service = _service(down)
        pending = _store_as_left(service.store, service.experiments.new_id(None), "before-ray-went-away")
        t0 = time.monotonic()
        r = post_spec(down, tiny_spec("while-ray-is-down"))
        took = time.monotonic() - t0
        assert r.status_code == 202 and r.json()["status"] == "SUBMITTING", r.text
        assert took < settings.ray_timeout_s  # not a Ray request's time: none was made for it
        first = r.json()["id"]
        assert first not in {j.submission_id for j in _service(client).jobs.list()}  # the real Ray
        waiting = wait_for(lambda: _record(down, first)["waiting_for"], 30, "the record to say it waits")
        assert waiting.startswith("Ray to answer:") and "unreachable" in waiting, waiting
        # once the service knows Ray is down, the answer says so at once; a cancel needs no Ray
        second = post_spec(down, tiny_spec("cancelled-while-ray-is-down")).json()
        assert second["status"] == "SUBMITTING" and second["waiting_for"] == waiting
        cancelled = down.post(f"/v1/experiments/{second['id']}/cancel", headers=auth())
        assert cancelled.status_code == 202 and cancelled.json()["status"] == "CANCELLED"
        assert _events(down, second["id"])[1] == (
            2,
            "SUBMITTING",
            "CANCELLED",
            "cancelled before it was submitted to Ray",
        )
        listed = down.get("/v1/experiments", headers=auth())
        assert listed.status_code == 200
        assert {i["id"] for i in listed.json()["items"]} == {pending, first, second["id"]}
        ready = down.get("/readyz")
        assert ready.status_code == 503
        components = ready.json()["components"]
        assert not components["ray"]["ok"] and "unreachable" in components["ray"]["detail"]
        assert components["database"]["ok"] and components["mlflow"]["ok"]
        service.reconciler.run_once()
        assert _status(down, pending) == "PENDING"  # Ray unreachable changes no status

        back = TcpForward(port, stack.ray_address.removeprefix("http://"))  # Ray answers again
        try:
            wait_for(lambda: _status(down, first) == "PENDING", 90, "the accepted record to be submitted")
            record = _record(down, first)
            assert record["waiting_for"] is None and record["ray"]["submit_s"] > 0
            listed_ids = {j.submission_id for j in _service(client).jobs.list()}
            assert first in listed_ids and second["id"] not in listed_ids
            assert _status(down, second["id"]) == "CANCELLED"
            assert down.post(f"/v1/experiments/{first}/cancel", headers=auth()).status_code == 202
        finally:
            back.close()


def test_mlflow_down_post_is_503_before_anything_is_stored(stack: Stack, tmp_path: Path) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    with TestClient(create_app(settings_for(stack, tmp_path / "db", mlflow_tracking_uri=nowhere))) as down:
        jobs_before = {j.submission_id for j in _service(down).jobs.list()}
        r = post_spec(down, tiny_spec("while-mlflow-is-down"))
        assert r.status_code == 503 and "MLflow" in r.json()["title"]
        assert down.get("/v1/experiments", headers=auth()).json()["items"] == []
        assert {j.submission_id for j in _service(down).jobs.list()} == jobs_before


def test_a_submission_that_waits_too_long_for_its_turn_is_503_and_nothing_is_stored(
    stack: Stack, tmp_path: Path
) -> None:
    settings = settings_for(
        stack, tmp_path / "db", entrypoint_resources=NEVER, submit_concurrency=1, submit_wait_s=0.5
    )
    with TestClient(create_app(settings)) as c:
        service = _service(c)
        assert c.portal is not None
        c.portal.call(service.submit_slots.acquire)  # a submission holds the only slot
        jobs_before = {j.submission_id for j in service.jobs.list()}
        r = post_spec(c, tiny_spec("while-busy"))
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["title"] == "Busy"
        assert c.get("/v1/experiments", headers=auth()).json()["items"] == []
        assert {j.submission_id for j in service.jobs.list()} == jobs_before
        c.portal.call(service.submit_slots.release)
        r = post_spec(c, tiny_spec("while-busy"))
        assert r.status_code == 202
        assert c.post(f"/v1/experiments/{r.json()['id']}/cancel", headers=auth()).status_code == 202


def test_at_most_max_active_records_are_in_ray_and_the_others_go_oldest_first(
    stack: Stack, tmp_path: Path
) -> None:
    settings = settings_for(stack, tmp_path / "db", entrypoint_resources=NEVER, max_active=2)
    with TestClient(create_app(settings)) as c:
        service = _service(c)
        ids = [post_spec(c, tiny_spec(f"queued-{i}")).json()["id"] for i in range(4)]
        _submitted(c, *ids[:2])
        service.submitter.run_once()
        assert [_status(c, i) for i in ids] == ["PENDING", "PENDING", "SUBMITTING", "SUBMITTING"]
        in_ray = {j.submission_id for j in service.jobs.list()}
        assert set(ids[:2]) <= in_ray and not set(ids[2:]) & in_ray
        queued = _record(c, ids[2])["waiting_for"]
        assert queued == _record(c, ids[3])["waiting_for"] == service.submitter.queued_text()
        assert "2 experiments are in Ray" in queued and "HDET_MAX_ACTIVE" in queued
        # a queued record is cancelled at once: it never reaches Ray, and frees no place
        assert c.post(f"/v1/experiments/{ids[3]}/cancel", headers=auth()).json()["status"] == "CANCELLED"
        # the first ends (as the reconciler records a job's end): the oldest queued one takes its place
        assert service.store.transition(ids[0], Status.PENDING, Status.FAILED, "ended in this test")
        service.submitter.run_once()
        assert [_status(c, i) for i in ids] == ["FAILED", "PENDING", "PENDING", "CANCELLED"]
        assert _record(c, ids[2])["waiting_for"] != queued
        assert ids[3] not in {j.submission_id for j in service.jobs.list()}
        for exp_id in ids[1:3]:
            c.post(f"/v1/experiments/{exp_id}/cancel", headers=auth())
        service.jobs.stop(ids[0])


# ---------------------------------------------------------------------- the background process


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_the_background_process_submits_and_reconciles_and_readyz_says_when_it_is_gone(
    stack: Stack, tmp_path: Path
) -> None:
    settings = settings_for(stack, tmp_path / "db", entrypoint_resources=NEVER, background="process")
    with TestClient(create_app(settings)) as c:
        service = _service(c)
        assert isinstance(service.background, InProcess)
        pid = service.background.pid
        assert pid is not None and pid != os.getpid() and _alive(pid)
        wait_for(lambda: c.get("/readyz").status_code == 200, 120, "the background process's first pass")
        assert c.get("/readyz").json()["components"]["reconciler"]["detail"] == "first pass done"
        exp_id = post_spec(c, tiny_spec("in-background")).json()["id"]
        _submitted(c, exp_id)
        assert _record(c, exp_id)["status"] == "PENDING" and _record(c, exp_id)["ray"]["submit_s"] > 0
        checked = wait_for(lambda: _record(c, exp_id)["ray"]["status"], 30, "a pass to record Ray's word")
        assert checked == "PENDING"
        assert service.reconciler.passes == 0  # this process's own never ran: the other one did
        assert c.post(f"/v1/experiments/{exp_id}/cancel", headers=auth()).json()["status"] == "CANCELLING"
        os.kill(pid, signal.SIGKILL)  # it died: the API says it is not ready
        wait_for(lambda: c.get("/readyz").status_code == 503, 30, "/readyz to say the reconciler is gone")
        assert "not running" in c.get("/readyz").json()["components"]["reconciler"]["detail"]
    assert not _alive(pid)


def test_the_background_process_ends_when_the_app_stops(stack: Stack, tmp_path: Path) -> None:
    settings = settings_for(stack, tmp_path / "db", background="process")
    with TestClient(create_app(settings)) as c:
        service = _service(c)
        assert isinstance(service.background, InProcess) and service.background.pid is not None
        pid = service.background.pid
        wait_for(lambda: c.get("/readyz").status_code == 200, 120, "the background process's first pass")
    assert not _alive(pid)


# ---------------------------------------------------------------------- reconciler


def _store_as_left(
    store: Store,
    exp_id: str,
    name: str,
    status: Status = Status.PENDING,
    spec_json: str | None = None,
    kind: str = "run",
    idempotency_key: str | None = None,
) -> str:
    """A record as another life of the service left it (its Ray job unknown to this Ray), stored
    in ``status`` with one event."""
    spec_json = spec_json or canonical_json(Spec.parse(tiny_spec(name), check_paths=False))
    now = utcnow()
    with store._session.begin() as s:
        s.add(
            ExperimentRow(
                id=exp_id, name=name, kind=kind, loss="harmonicdet", arch="retinanet", spec=spec_json,
                body_hash=body_hash(spec_json), idempotency_key=idempotency_key, status=status,
                created_at=now, updated_at=now, started_at=now if status == Status.RUNNING else None,
            )
        )  # fmt: skip
        s.flush()
        s.add(
            EventRow(
                experiment_id=exp_id, seq=1, at=now, from_status=None, to_status=status, reason="as left"
            )
        )
    return exp_id


def _insert(service: Service, name: str, status: Status, exp_id: str | None = None, kind: str = "run") -> str:
    return _store_as_left(service.store, exp_id or service.experiments.new_id(None), name, status, kind=kind)


def _parent(stack: Stack, exp_id: str, status: str) -> tuple[MlflowClient, str, str]:
    c = MlflowClient(tracking_uri=stack.mlflow_uri)
    exp = c.get_experiment_by_name("svc-tests")
    eid = exp.experiment_id if exp else c.create_experiment("svc-tests")
    run = c.create_run(eid, tags={Tag.EXPERIMENT_ID: exp_id, Tag.ROLE: PARENT_ROLE})
    child = c.create_run(eid, tags={"mlflow.parentRunId": run.info.run_id, Tag.ROLE: "child"})
    if status != "RUNNING":
        c.set_terminated(run.info.run_id, status=status)
        c.set_terminated(child.info.run_id, status=status)
    return c, run.info.run_id, child.info.run_id


def test_a_job_ray_no_longer_knows_becomes_lost_and_its_running_runs_are_closed(
    stack: Stack, client: TestClient
) -> None:
    service = _service(client)
    lost = service.experiments.new_id(None)
    c, parent, child = _parent(stack, lost, "RUNNING")  # first: the reconciler runs all along
    _insert(service, "forgotten", Status.RUNNING, lost)
    bare = _insert(service, "forgotten-bare", Status.PENDING)
    service.reconciler.run_once()
    for exp_id in (lost, bare):
        record = client.get(f"/v1/experiments/{exp_id}", headers=auth()).json()
        assert record["status"] == "LOST", record
        assert "no longer knows" in record["failure"]["reason"]
    for run_id in (parent, child):
        run = c.get_run(run_id)
        assert run.info.status == "FAILED"
        assert "no longer knows" in run.data.tags[Tag.ERROR]


def test_a_second_reconciler_racing_on_a_lost_job_does_not_take_the_runs_it_closed_as_the_outcome(
    stack: Stack, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two services on one database (here: this test's and the stack's `hdet serve`) follow the same
    # records. One finds the job lost and closes its MLflow runs as FAILED; a second one that read
    # the record before acts the moment those runs are closed: it must not make FAILED the outcome.
    from service.reconciler import Reconciler

    service = _service(client)
    exp_id = service.experiments.new_id(None)
    _parent(stack, exp_id, "RUNNING")
    _insert(service, "raced", Status.RUNNING, exp_id)
    stale = service.store.get(exp_id)
    assert stale is not None and stale.status == Status.RUNNING
    first = service.reconciler
    second = Reconciler(service.store, first.jobs, first.mlflow, "a-second-service")
    close = first.mlflow.close_running

    def close_then_race(*args: Any, **kwargs: Any) -> Any:
        closed = close(*args, **kwargs)
        second._reconcile(stale, None, [])  # the other service's pass, on what it read before
        return closed

    monkeypatch.setattr(first.mlflow, "close_running", close_then_race)
    first._reconcile(stale, None, [])
    record = client.get(f"/v1/experiments/{exp_id}", headers=auth()).json()
    assert record["status"] == "LOST", record


@pytest.mark.parametrize(("outcome", "expected"), [("FINISHED", "SUCCEEDED"), ("FAILED", "FAILED")])
def test_a_job_ray_no_longer_knows_takes_its_mlflow_parents_outcome(
    stack: Stack, client: TestClient, outcome: str, expected: str
) -> None:
    service = _service(client)
    exp_id = service.experiments.new_id(None)
    _, parent, _ = _parent(stack, exp_id, outcome)
    _insert(service, f"outcome-{outcome.lower()}", Status.RUNNING, exp_id)
    service.reconciler.run_once()
    record = client.get(f"/v1/experiments/{exp_id}", headers=auth()).json()
    assert record["status"] == expected
    assert record["mlflow"]["parent_run_id"] == parent
    assert record["mlflow"]["link"].endswith(f"/runs/{parent}")


def test_a_job_of_this_service_without_a_record_or_with_an_ended_one_is_stopped_and_others_are_not(
    client: TestClient,
) -> None:
    service = _service(client)
    orphan, ended, foreign = (service.experiments.new_id(None) for _ in range(3))
    _insert(service, "ended-while-submitted", Status.CANCELLED, ended)  # cancelled; its API died
    for exp_id in (orphan, ended):
        service.jobs.submit(exp_id, "sleep 300", metadata={SERVICE_METADATA: service.experiments.service_id})
    service.jobs.submit(foreign, "sleep 300", metadata={SERVICE_METADATA: "another"})
    try:
        for _ in range(5):  # the sweep runs every few passes
            service.reconciler.run_once()
        for exp_id in (orphan, ended):
            stopped = lambda i=exp_id: service.jobs.info(i).status == "STOPPED"  # noqa: E731
            wait_for(stopped, 60, f"job {exp_id} to stop")
        assert service.jobs.info(foreign).status in ("PENDING", "RUNNING")
    finally:
        service.jobs.stop(foreign)


def test_a_pass_writes_a_record_only_when_rays_word_changed_or_its_check_time_is_old(
    client: TestClient,
) -> None:
    """Every active record written every pass held SQLite's write lock against submissions."""
    from service.reconciler import CHECKED_EVERY_S

    service = _service(client)
    exp_id = post_spec(client, tiny_spec("checked")).json()["id"]
    _submitted(client, exp_id)
    service.reconciler.run_once()
    first = service.store.get(exp_id)
    assert first is not None and first.ray_status == "PENDING" and first.status_checked_at is not None
    service.reconciler.run_once()
    again = service.store.get(exp_id)
    assert again is not None and again.updated_at == first.updated_at  # Ray said the same: no write
    assert _record(client, exp_id)["status_checked_at"] is not None
    old = utcnow() - timedelta(seconds=CHECKED_EVERY_S + 1)
    assert service.store.update_fields(exp_id, Status.PENDING, status_checked_at=old)
    stale = service.store.get(exp_id)
    assert stale is not None
    service.reconciler.run_once()
    fresh = service.store.get(exp_id)
    assert fresh is not None and fresh.updated_at > stale.updated_at
    assert aware(fresh.status_checked_at) > old + timedelta(seconds=CHECKED_EVERY_S)  # type: ignore[operator]
    assert client.post(f"/v1/experiments/{exp_id}/cancel", headers=auth()).status_code == 202


def test_the_job_list_says_what_rays_client_says_of_a_job(client: TestClient) -> None:
    service = _service(client)
    exp_id = post_spec(client, tiny_spec("listed")).json()["id"]
    _submitted(client, exp_id)
    try:
        (listed,) = [j for j in service.jobs.list() if j.submission_id == exp_id]
        assert listed == service.jobs.info(exp_id)  # Ray's client's own objects, made into a JobState
        assert (
            listed.status == "PENDING" and listed.metadata[SERVICE_METADATA] == service.experiments.service_id
        )
    finally:
        client.post(f"/v1/experiments/{exp_id}/cancel", headers=auth())


def test_a_lost_records_failure_is_an_object_saying_why(client: TestClient) -> None:
    items = client.get("/v1/experiments", params={"status": "LOST"}, headers=auth()).json()["items"]
    assert items and all(isinstance(i["failure"], dict) for i in items)
    assert json.dumps(items)  # serialisable: no NaN


def _seeded(stack: Stack, client: TestClient, name: str, ap: list[float]) -> str:
    """A finished experiment whose training runs (one per seed) have final metrics in MLflow."""
    service = _service(client)
    exp_id = service.experiments.new_id(None)
    c, parent, _ = _parent(stack, exp_id, "FINISHED")
    eid = c.get_run(parent).info.experiment_id
    for seed, value in enumerate(ap):
        run = c.create_run(eid, tags={"mlflow.parentRunId": parent, Tag.ROLE: "child", Tag.SEED: str(seed)})
        for split in ("", "test_"):
            for metric, v in {"AP": value, "AP50": value + 0.2, "AP75": value / 2, "AP90": value / 4}.items():
                c.log_metric(run.info.run_id, split + metric, v, step=1)
            c.log_metric(run.info.run_id, split + "aic", 0.3 - value / 10, step=1)
            c.log_metric(run.info.run_id, split + "spearman", 0.5, step=1)
        c.set_terminated(run.info.run_id, "FINISHED")
    _insert(service, name, Status.RUNNING, exp_id)
    wait_for(lambda: _status(client, exp_id) == "SUCCEEDED", 30, f"{name} to take its parent's outcome")
    return exp_id


def test_compare_pairs_the_seeds_against_the_first_experiment(stack: Stack, client: TestClient) -> None:
    base = _seeded(stack, client, "cmp-base", [0.30, 0.32, 0.31])
    better = _seeded(stack, client, "cmp-better", [0.40, 0.43, 0.41])
    r = client.get("/v1/compare", params={"ids": f"{base},{better}"}, headers=auth())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["judged_on"] == "test"
    assert [e["id"] for e in body["experiments"]] == [base, better]
    assert body["experiments"][0]["mean"]["AP"] == pytest.approx(0.31)
    paired = body["paired"][better]
    assert paired["against"] == base and paired["shared_seeds"] == [0, 1, 2]
    ap = paired["comparison"]["AP"]
    assert ap["mean_diff"] == pytest.approx((0.10 + 0.11 + 0.10) / 3)
    assert {"AP", "AP50", "AP75", "AP90", "aic"} <= set(paired["comparison"])
    per_seed = paired["comparison"]["AP"]["per_seed"]
    assert sorted(per_seed) == ["0", "1", "2"]
    assert per_seed["1"]["treatment"] == pytest.approx(0.43) and per_seed["1"]["baseline"] == pytest.approx(
        0.32
    )
    for bad in (base, f"{base},exp-0000000000000000", ",".join([base] * 11)):
        r = client.get("/v1/compare", params={"ids": bad}, headers=auth())
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "ids"


def _comparison_run_elsewhere(stack: Stack, ap: dict[str, list[float]], **tags: str) -> tuple[str, list[str]]:
    """An MLflow parent run of a comparison (empty search space: baseline and confirmatory arms)
    that no service submitted, as `hdet run` or `ray job submit` leaves it; its child run ids."""
    c = MlflowClient(tracking_uri=stack.mlflow_uri)
    exp = c.get_experiment_by_name("svc-tests")
    eid = exp.experiment_id if exp else c.create_experiment("svc-tests")
    parent = c.create_run(
        eid, tags={Tag.ROLE: PARENT_ROLE, Tag.SPEC_NAME: "cmp-elsewhere", Tag.LOSS: "harmonicdet", **tags}
    )
    pid = parent.info.run_id
    for key, value in {
        "search.algorithm": "random",
        "search.seeds": "[0, 1, 2]",
        "train.epochs": "1",
    }.items():
        c.log_param(pid, key, value)
    children = []
    for arm, values in ap.items():
        for seed, value in enumerate(values):
            tags = {"mlflow.parentRunId": pid, Tag.ROLE: "child", Tag.SEED: str(seed), Tag.TRIAL_ID: arm,
                    Tag.ARM: arm, Tag.CONFIG: json.dumps({"loss.kind": arm})}  # fmt: skip
            run = c.create_run(eid, tags=tags)
            for metric, v in {
                "epoch": 1,
                "AP": value,
                "test_AP": value,
                "test_AP50": value + 0.2,
                "test_APs": value / 3,
            }.items():
                c.log_metric(run.info.run_id, metric, v, step=1)
            c.set_terminated(run.info.run_id, "FINISHED")
            children.append(run.info.run_id)
    c.set_terminated(pid, "FINISHED")
    return pid, children


def test_compare_takes_a_comparisons_confirmatory_arm_and_experiments_run_elsewhere(
    stack: Stack, client: TestClient
) -> None:
    base = _seeded(stack, client, "cmp-single", [0.30, 0.32, 0.31])
    pid, children = _comparison_run_elsewhere(
        stack, {"baseline": [0.3, 0.3, 0.3], "confirmatory": [0.35, 0.36, 0.34]}
    )
    r = client.get("/v1/compare", params={"ids": f"{base},{pid}"}, headers=auth())
    assert r.status_code == 200, r.text
    body = r.json()
    single, comparison = body["experiments"]
    assert (
        comparison["id"] == pid and comparison["name"] == "cmp-elsewhere" and comparison["kind"] == "search"
    )
    assert comparison["arm"] == "confirmatory" and comparison["config"] == {"loss.kind": "confirmatory"}
    assert comparison["seeds"] == [0, 1, 2] and comparison["params"]["search.algorithm"] == "random"
    assert comparison["mean"]["AP"] == pytest.approx(0.35)
    assert "APs" in comparison["mean"]  # every metric the runs logged, not a fixed list
    assert single["params"] == {} and "AP90" in single["mean"]
    paired = body["paired"][pid]["comparison"]["AP"]
    assert paired["mean_diff"] == pytest.approx(0.35 - 0.31)
    link = body["mlflow_compare"]
    assert link.startswith(stack.mlflow_uri) and "compare-runs" in link
    assert all(run_id in link for run_id in children[3:])  # the confirmatory seeds' runs
    r = client.get(f"/v1/experiments/{base}/results", params={"format": "markdown"}, headers=auth())
    assert r.status_code == 200 and "| run | seed | status | AP |" in r.text, r.text
    r = client.get("/v1/compare", params={"ids": f"{base},{'0' * 32}"}, headers=auth())
    assert r.status_code == 422 and "neither a record" in r.json()["detail"]


def test_results_of_a_comparison_carry_its_evidence_as_json_and_markdown(
    stack: Stack, client: TestClient
) -> None:
    service = _service(client)
    exp_id = service.experiments.new_id(None)
    arms = {"baseline": [0.30, 0.31, 0.29], "confirmatory": [0.36, 0.35, 0.37]}
    _comparison_run_elsewhere(stack, arms, **{Tag.EXPERIMENT_ID: exp_id})
    _insert(service, "cmp-results", Status.RUNNING, exp_id, kind="search")
    wait_for(
        lambda: _status(client, exp_id) == "SUCCEEDED", 30, "the comparison to take its parent's outcome"
    )
    body = client.get(f"/v1/experiments/{exp_id}/results", headers=auth()).json()
    summary = body["summary"]
    assert summary["confirmatory"]["arm"] == "confirmatory" and summary["baseline"]["arm"] == "baseline"
    ap = summary["confirmatory_comparison"]["AP"]
    assert ap["mean_diff"] == pytest.approx(0.06) and ap["n_pairs"] == 3 and ap["role"] == "primary"
    r = client.get(f"/v1/experiments/{exp_id}/results", params={"format": "markdown"}, headers=auth())
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/markdown")
    assert "confirmatory" in r.text and "| AP" in r.text
    r = client.get(f"/v1/experiments/{exp_id}/results", params={"format": "pdf"}, headers=auth())
    assert r.status_code == 422


def test_a_recent_mlflow_answer_serves_submissions_and_a_failure_clears_it(stack: Stack) -> None:
    from service.mlflow_view import MlflowUnavailable, MlflowView

    view = MlflowView(stack.mlflow_uri)
    view.ping()
    view.tracking_uri = f"http://127.0.0.1:{free_port()}"  # the server goes away
    view.ping(max_age_s=60)  # a submission trusts the answer of a moment ago
    with pytest.raises(MlflowUnavailable):
        view.ping()  # readyz asks afresh
    with pytest.raises(MlflowUnavailable):
        view.ping(max_age_s=60)  # and a failed answer is not trusted
