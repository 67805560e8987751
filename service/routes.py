"""The ``/v1`` routes: experiments (submit, list, read, cancel, logs, events, results), comparison
and the spec's JSON Schema. Handlers stay short: the work is in :mod:`service.experiments`
(writes), :mod:`service.db` (reads) and :mod:`service.mlflow_view` (results).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import lru_cache, partial
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel

from service import intake
from service.app import Service, ServiceDep
from service.db import BadCursor
from service.jobs import JobNotFound, RayUnavailable
from service.mlflow_view import COMPARE_METRICS, MlflowUnavailable, finite, has_test, split_metrics
from service.models import ExperimentRow, RecordFields
from service.problems import Problem
from service.schemas import EventList, Experiment, ExperimentList, RecordJson, event
from service.states import TERMINAL, VISIBLE

__all__ = ["router"]

router = APIRouter()
_SPEC_BODY = {
    "requestBody": {
        "required": True,
        "description": "an experiment spec (JSON or YAML, at most 64 KiB); its schema: GET /v1/spec/schema",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/yaml": {"schema": {"type": "object"}},
        },
    }
}


def _row(service: Service, exp_id: str, *, with_log: bool = False) -> ExperimentRow:
    row = service.store.get(exp_id, with_log=with_log)
    if row is None:
        raise Problem(404, "Not Found", f"no experiment {exp_id}", kind="not-found")
    return row


_RECORDS = RecordJson()


def _link(service: Service, row: RecordFields) -> str | None:
    return service.mlflow.link(row.mlflow_experiment_id, row.mlflow_parent_run_id)


def _send_record(
    service: Service, row: RecordFields, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """The public record of ``row`` (:class:`Experiment`, the ``response_model`` documents it) as JSON."""
    return _json(_RECORDS(row, _link(service, row)), status_code, headers)


def _json(body: bytes | str, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code, headers, media_type="application/json")


def _send(model: BaseModel, status_code: int = 200) -> Response:
    """JSON of ``model`` serialised by pydantic in one step (FastAPI's generic encoder is several
    times slower)."""
    return _json(model.model_dump_json(by_alias=True), status_code)


@router.post(
    "/v1/experiments",
    status_code=202,
    response_model=Experiment,
    openapi_extra=_SPEC_BODY,
    tags=["experiments"],
    summary="Submit a spec: validated, recorded and sent to Ray as a job.",
)
async def submit_experiment(
    request: Request,
    service: ServiceDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Response:
    raw, kind = await intake.read_body(request)

    def work() -> Response:
        data = intake.parse_body(raw, kind)
        try:
            cluster = service.cluster_nodes()
        except RayUnavailable:
            cluster = None  # the submission itself answers 503 with the reason
        try:
            spec = intake.validate(
                data,
                tracking_uri=service.mlflow.tracking_uri,
                cluster=cluster,
                data_roots=service.settings.data_root_paths(),
                run_exists=service.mlflow.run_exists,
            )
        except MlflowUnavailable as e:
            raise _mlflow_down(e) from None
        sub = service.experiments.submit(spec, idempotency_key)
        headers = {"Location": f"/v1/experiments/{sub.row.id}"}
        if sub.replayed:
            headers["Idempotent-Replayed"] = "true"
        return _send_record(service, sub.row, 202, headers)

    try:
        await asyncio.wait_for(service.submit_slots.acquire(), service.settings.submit_wait_s)
    except TimeoutError:
        raise Problem(
            503,
            "Busy",
            f"other submissions held every slot for {service.settings.submit_wait_s:g} s; nothing was stored",
            kind="unavailable",
            headers={"Retry-After": "5"},
        ) from None
    try:
        return await run_in_threadpool(work)
    finally:
        service.submit_slots.release()


@router.get(
    "/v1/experiments",
    response_model=ExperimentList,
    tags=["experiments"],
    summary="Experiments, newest first, a page at a time (keyset cursor).",
)
def list_experiments(
    service: ServiceDep,
    status: Annotated[str | None, Query(description="one status, or several comma-separated")] = None,
    name: str | None = None,
    loss: str | None = None,
    arch: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> Response:
    statuses = [s.strip().upper() for s in status.split(",") if s.strip()] if status else []
    bad = [s for s in statuses if s not in VISIBLE]
    if bad:
        raise Problem(
            422,
            "Invalid request",
            "unknown status",
            kind="invalid-request",
            errors=[
                {"field": "status", "message": f"{', '.join(bad)}: not one of {', '.join(sorted(VISIBLE))}"}
            ],
        )
    try:
        rows, next_cursor = service.store.page(
            limit=limit, cursor=cursor, status=statuses, name=name, loss=loss, arch=arch
        )
    except BadCursor as e:
        raise Problem(
            422,
            "Invalid request",
            str(e),
            kind="invalid-request",
            errors=[{"field": "cursor", "message": str(e)}],
        ) from None
    return _json(_RECORDS.page([(r, _link(service, r)) for r in rows], next_cursor))


@router.get(
    "/v1/experiments/{exp_id}", response_model=Experiment, tags=["experiments"], summary="One experiment."
)
def get_experiment(exp_id: str, service: ServiceDep) -> Response:
    return _send_record(service, _row(service, exp_id))


@router.post(
    "/v1/experiments/{exp_id}/cancel",
    status_code=202,
    response_model=Experiment,
    tags=["experiments"],
    summary="Cancel: CANCELLING now, CANCELLED once Ray stopped the job; a repeat is a no-op.",
    responses={409: {"description": "the experiment has ended"}},
)
def cancel_experiment(exp_id: str, service: ServiceDep) -> Response:
    return _send_record(service, service.experiments.cancel(exp_id), 202)


@router.get(
    "/v1/experiments/{exp_id}/logs",
    response_class=PlainTextResponse,
    tags=["experiments"],
    summary="The job's log: the last `tail` lines, or with follow=true a stream until the job ends.",
)
async def experiment_logs(
    exp_id: str,
    service: ServiceDep,
    tail: Annotated[int, Query(ge=1, le=1_000_000)] = 1000,
    follow: bool = False,
) -> Response:
    row = await run_in_threadpool(partial(_row, service, exp_id, with_log=True))
    text = row.log_tail if row.status in TERMINAL and row.log_tail is not None else None
    if text is None:
        try:
            text = await run_in_threadpool(service.jobs.logs, exp_id)
        except JobNotFound:
            text = row.log_tail or ""
        except RayUnavailable as e:
            if row.log_tail is None:
                raise Problem(
                    503, "Ray is unavailable", str(e), kind="unavailable", headers={"Retry-After": "5"}
                ) from None
            text = row.log_tail
    lines = text.splitlines(keepends=True)
    head = "".join(lines[-tail:])
    if not follow or row.status in TERMINAL:
        return PlainTextResponse(head)
    return StreamingResponse(
        _follow(service, exp_id, head, len(text)), media_type="text/plain; charset=utf-8"
    )


async def _follow(service: Service, exp_id: str, head: str, seen: int) -> AsyncIterator[str]:
    """``head``, then what the job writes after the first ``seen`` characters, until it ends
    (Ray's stream starts at the beginning of the log)."""
    yield head
    skipped = 0
    try:
        async for chunk in service.jobs.follow(exp_id):
            if skipped < seen:
                take = min(seen - skipped, len(chunk))
                skipped += take
                chunk = chunk[take:]
            if chunk:
                yield chunk
    except Exception as e:  # the stream ends; the client sees why on its last line
        yield f"\n[hdet: log stream ended: {type(e).__name__}]\n"


@router.get(
    "/v1/experiments/{exp_id}/events",
    response_model=EventList,
    tags=["experiments"],
    summary="State transitions (seq, time, from, to, reason) after `after`.",
)
def experiment_events(exp_id: str, service: ServiceDep, after: Annotated[int, Query(ge=0)] = 0) -> Response:
    _row(service, exp_id)
    return _send(EventList(items=[event(e) for e in service.store.events(exp_id, after)]))


@router.get(
    "/v1/experiments/{exp_id}/results",
    tags=["experiments"],
    summary="From MLflow, partial while running: parent and child runs, a search's summary.",
)
def experiment_results(exp_id: str, service: ServiceDep) -> dict[str, Any]:
    row = _row(service, exp_id)
    out: dict[str, Any] = {"id": row.id, "status": row.status, "partial": row.status not in TERMINAL}
    parent = _parent_run(service, row)
    if parent is None:
        return {**out, "parent": None, "runs": [], "summary": None}
    try:
        return {**out, **service.mlflow.results(parent, row.kind, row.name)}
    except Exception as e:
        raise _mlflow_down(e) from None


def _parent_run(service: Service, row: ExperimentRow) -> Any:
    try:
        if row.mlflow_parent_run_id:
            return service.mlflow.client.get_run(row.mlflow_parent_run_id)
        import json

        experiment = json.loads(row.spec)["tracking"]["experiment"]
        return service.mlflow.find_parent(row.id, experiment)
    except Exception as e:
        raise _mlflow_down(e) from None


def _mlflow_down(e: Exception) -> Problem:
    return Problem(
        503,
        "MLflow is unavailable",
        f"{type(e).__name__}: {str(e)[:300]}",
        kind="unavailable",
        headers={"Retry-After": "5"},
    )


@router.get(
    "/v1/compare",
    tags=["experiments"],
    summary="AP, AP50, AP75, AP90, aic, spearman side by side; paired differences against the first.",
)
def compare(
    service: ServiceDep, ids: Annotated[str, Query(description="2 to 10 experiment ids, comma-separated")]
) -> dict[str, Any]:
    from workers.evidence import compare_metrics

    wanted = list(dict.fromkeys(i.strip() for i in ids.split(",") if i.strip()))
    if not 2 <= len(wanted) <= 10:
        raise _bad_ids(f"2 to 10 distinct ids, got {len(wanted)}")
    rows = [service.store.get(i) for i in wanted]
    missing = [i for i, r in zip(wanted, rows) if r is None]
    if missing:
        raise _bad_ids(f"no experiment {', '.join(missing)}")
    per_seed: dict[str, dict[int, dict[str, float]]] = {}
    for row in rows:
        assert row is not None
        parent = _parent_run(service, row)
        try:
            per_seed[row.id] = service.mlflow.seed_metrics(parent, row.kind, row.name) if parent else {}
        except Exception as e:
            raise _mlflow_down(e) from None
    on_test = all(has_test(p) for p in per_seed.values())
    split = {i: split_metrics(p, on_test) for i, p in per_seed.items()}
    experiments = []
    for row in rows:
        assert row is not None
        seeds = split[row.id]
        means = {m: _mean([s[m] for s in seeds.values() if m in s]) for m in COMPARE_METRICS}
        experiments.append(
            {"id": row.id, "name": row.name, "loss": row.loss, "arch": row.arch, "status": row.status,
             "seeds": sorted(seeds), "mean": means, "per_seed": {str(k): v for k, v in seeds.items()}}
        )  # fmt: skip
    first = wanted[0]
    paired: dict[str, Any] = {}
    for row in rows[1:]:
        assert row is not None
        shared = sorted(set(split[first]) & set(split[row.id]))
        entry: dict[str, Any] = {"against": first, "shared_seeds": shared}
        if len(shared) >= 2:
            entry["comparison"] = compare_metrics(
                {s: split[row.id][s] for s in shared},
                {s: split[first][s] for s in shared},
                COMPARE_METRICS,
                treatment_label=row.name,
                baseline_label=rows[0].name if rows[0] else first,
            )
        else:
            entry["comparison"] = None
            entry["note"] = "paired differences need at least 2 seeds measured in both"
        paired[row.id] = entry
    return finite(
        {"judged_on": "test" if on_test else "val", "metrics": list(COMPARE_METRICS),
         "experiments": experiments, "paired": paired}
    )  # fmt: skip


def _bad_ids(message: str) -> Problem:
    return Problem(
        422, "Invalid request", message, kind="invalid-request", errors=[{"field": "ids", "message": message}]
    )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    from workers.spec import Spec

    return Spec.model_json_schema()


@router.get(
    "/v1/spec/schema", tags=["spec"], summary="The spec's JSON Schema (as `hdet spec schema` prints)."
)
def spec_schema() -> dict[str, Any]:
    return _schema()
