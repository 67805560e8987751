"""The ``/v1`` routes: experiments (submit, list, read, cancel, logs, events, results), comparison
and the spec's JSON Schema. Handlers stay short: the work is in :mod:`service.experiments`
(writes), :mod:`service.db` (reads) and :mod:`service.mlflow_view` (results).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from functools import lru_cache, partial
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel

from service import intake
from service.app import Service, ServiceDep
from service.db import BadCursor
from service.jobs import JobNotFound, RayUnavailable
from service.mlflow_view import COMPARE_METRICS, MlflowUnavailable, finite, has_test
from service.models import ExperimentRow, RecordFields
from service.problems import Problem
from service.schemas import (
    ComparedExperiment,
    Comparison,
    EventList,
    Experiment,
    ExperimentList,
    ExperimentResults,
    PairedDifferences,
    RecordJson,
    SpecSchema,
    event,
    problem_responses,
)
from service.states import TERMINAL, VISIBLE, Status

__all__ = ["router"]

router = APIRouter()
#: how often a followed log asks whether its record has been submitted to Ray
SUBMITTED_POLL_S = 0.25
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


def _problem(status: int, description: str) -> dict[int | str, dict[str, Any]]:
    """A problem answer of ``status`` with this route's own ``description``."""
    (shape,) = problem_responses(422).values()
    return {status: {**shape, "description": description}}


#: the error answers of a submission (401, every /v1 route's, comes with the router)
_SUBMIT_PROBLEMS = {
    **problem_responses(422),
    **_problem(413, "the body is larger than 64 KiB"),
    **_problem(415, "the body is neither JSON nor YAML (Content-Type)"),
    **_problem(503, "MLflow does not answer, or other submissions held every slot (Retry-After)"),
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


def _send(model: BaseModel, status_code: int = 200, *, exclude_unset: bool = False) -> Response:
    """JSON of ``model`` serialised by pydantic in one step (FastAPI's generic encoder is several
    times slower); ``exclude_unset`` leaves out the optional keys the model was built without."""
    return _json(model.model_dump_json(by_alias=True, exclude_unset=exclude_unset), status_code)


@router.post(
    "/v1/experiments",
    status_code=202,
    response_model=Experiment,
    openapi_extra=_SPEC_BODY,
    responses=_SUBMIT_PROBLEMS,
    tags=["experiments"],
    summary="Submit a spec: validated and recorded (SUBMITTING) at once, then sent to Ray as a job.",
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
            spec = intake.validate(
                data,
                tracking_uri=service.mlflow.tracking_uri,
                cluster=service.cluster_nodes(),  # None while Ray cannot be asked: not checked
                data_roots=service.settings.data_root_paths(),
                run_exists=service.mlflow.run_exists,
            )
        except MlflowUnavailable as e:
            raise _mlflow_down(e) from None
        down = service.mlflow_down.get()
        if down is not None:  # the job could not record anything: refused before it is stored
            raise Problem(
                503, "MLflow is unavailable", down, kind="unavailable", headers={"Retry-After": "5"}
            )
        sub = service.experiments.accept(spec, idempotency_key, service.background.waiting_for())
        headers = {"Location": f"/v1/experiments/{sub.row.id}"}
        if sub.replayed:
            headers["Idempotent-Replayed"] = "true"
        else:
            service.background.wake()
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
    responses=problem_responses(422),
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
    "/v1/experiments/{exp_id}",
    response_model=Experiment,
    tags=["experiments"],
    summary="One experiment.",
    responses=problem_responses(404),
)
def get_experiment(exp_id: str, service: ServiceDep) -> Response:
    return _send_record(service, _row(service, exp_id))


@router.post(
    "/v1/experiments/{exp_id}/cancel",
    status_code=202,
    response_model=Experiment,
    tags=["experiments"],
    summary="Cancel: CANCELLING now, CANCELLED once Ray stopped the job; a repeat is a no-op.",
    responses=problem_responses(404, 409),
)
def cancel_experiment(exp_id: str, service: ServiceDep) -> Response:
    return _send_record(service, service.experiments.cancel(exp_id), 202)


@router.get(
    "/v1/experiments/{exp_id}/logs",
    response_class=PlainTextResponse,
    tags=["experiments"],
    summary="The job's log: the last `tail` lines, or with follow=true a stream until the job ends.",
    responses={
        **problem_responses(404, 422),
        **_problem(503, "Ray does not answer and the service holds no log of the job yet (Retry-After)"),
    },
)
async def experiment_logs(
    exp_id: str,
    service: ServiceDep,
    tail: Annotated[int, Query(ge=1, le=1_000_000)] = 1000,
    follow: bool = False,
) -> Response:
    row = await run_in_threadpool(partial(_row, service, exp_id, with_log=True))
    if follow and row.status == Status.SUBMITTING:  # Ray has no log yet: follow it from its start
        return StreamingResponse(
            _follow_once_submitted(service, exp_id), media_type="text/plain; charset=utf-8"
        )
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


async def _follow_once_submitted(service: Service, exp_id: str) -> AsyncIterator[str]:
    """The log of a record being submitted: nothing until Ray has its job, then all of it; nothing
    at all if it ends first (refused or cancelled: its record says why)."""
    while True:
        row = await run_in_threadpool(service.store.get, exp_id)
        if row is None or row.status in TERMINAL:
            return
        if row.status != Status.SUBMITTING:
            break
        yield ""  # a client that went away ends the wait here
        await asyncio.sleep(SUBMITTED_POLL_S)
    async for chunk in _follow(service, exp_id, "", 0):
        yield chunk


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
    responses=problem_responses(404, 422),
)
def experiment_events(exp_id: str, service: ServiceDep, after: Annotated[int, Query(ge=0)] = 0) -> Response:
    _row(service, exp_id)
    return _send(EventList(items=[event(e) for e in service.store.events(exp_id, after)]))


@router.get(
    "/v1/experiments/{exp_id}/results",
    response_model=ExperimentResults,
    tags=["experiments"],
    summary="From MLflow, partial while running: parent and child runs, a search's or comparison's "
    "evidence (per arm, per seed, the primary's verdict); `format=markdown` renders it as the report does, "
    "`format=text` as `hdet run` prints it.",
    responses={
        200: {
            "content": {
                "text/markdown": {"schema": {"type": "string"}},
                "text/plain": {"schema": {"type": "string"}},
            }
        },
        **problem_responses(404, 422, 503),
    },
)
def experiment_results(
    exp_id: str, service: ServiceDep, format: Annotated[Literal["json", "markdown", "text"], Query()] = "json"
) -> Response:
    row = _row(service, exp_id)
    out: dict[str, Any] = {"id": row.id, "status": row.status, "partial": row.status not in TERMINAL}
    parent = _parent_run(service, row)
    try:
        if format != "json" and parent is not None and row.kind == "search":
            summary = service.mlflow.summary(parent, row.name)
            if format == "text":  # the evidence table `hdet run` prints at its end
                return PlainTextResponse(summary.format_table() + "\n")
            from workers.report.document import render_markdown

            return PlainTextResponse(render_markdown(summary), media_type="text/markdown")
        out |= service.mlflow.results(parent, row.kind, row.name) if parent else {"parent": None, "runs": []}
    except Exception as e:
        raise _mlflow_down(e) from None
    if format != "json":
        media = "text/markdown" if format == "markdown" else "text/plain"
        return PlainTextResponse(_runs_markdown(row.name, out), media_type=media)
    return _send(ExperimentResults.model_validate({"summary": None, **out}), exclude_unset=True)


def _runs_markdown(name: str, res: dict[str, Any]) -> str:
    """A single run's report: its training runs, a row per seed."""
    metrics = [m for m in COMPARE_METRICS if any(m in r["metrics"] for r in res["runs"])]
    lines = [f"# {name}", "", f"status {res['status']}" + (" (partial)" if res["partial"] else ""), ""]
    lines += ["| run | seed | status | " + " | ".join(metrics) + " |", "|---" * (3 + len(metrics)) + "|"]
    for r in res["runs"]:
        values = [f"{r['metrics'][m]:.4g}" if m in r["metrics"] else "" for m in metrics]
        lines.append(f"| {r['name']} | {r['seed']} | {r['status']} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def _parent_run(service: Service, row: ExperimentRow) -> Any:
    try:
        if row.mlflow_parent_run_id:
            return service.mlflow.client.get_run(row.mlflow_parent_run_id)
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
    response_model=Comparison,
    tags=["experiments"],
    summary="2-10 finished experiments side by side: params, every metric per seed, paired differences.",
    responses=problem_responses(422, 503),
)
def compare(
    service: ServiceDep,
    ids: Annotated[
        str,
        Query(
            description="2 to 10 ids, comma-separated: this service's experiment ids, or MLflow parent "
            "run ids of experiments run elsewhere (`hdet run`, `ray job submit`, a RayJob)"
        ),
    ],
) -> Response:
    from workers.evidence import compare_metrics
    from workers.summary import TEST_PREFIX, split_metrics

    wanted = list(dict.fromkeys(i.strip() for i in ids.split(",") if i.strip()))
    if not 2 <= len(wanted) <= 10:
        raise _bad_ids(f"2 to 10 distinct ids, got {len(wanted)}")
    found = [_compared(service, i) for i in wanted]
    missing = [i for i, f in zip(wanted, found) if f is None]
    if missing:
        raise _bad_ids(
            f"no experiment {', '.join(missing)} (neither a record of this service nor an MLflow parent run)"
        )
    arms: dict[str, dict[str, Any]] = {}
    for f in found:
        assert f is not None
        parent = f.pop("parent")
        if parent is None:  # not started yet: nothing measured
            arms[f["id"]] = {"arm": None, "config": None, "per_seed": {}, "runs": {}}
            continue
        try:
            arms[f["id"]] = service.mlflow.arm(parent, f["kind"], f["name"])
        except Exception as e:
            raise _mlflow_down(e) from None
    on_test = all(has_test(a["per_seed"]) for a in arms.values())
    split = {i: split_metrics(a["per_seed"], TEST_PREFIX if on_test else "") for i, a in arms.items()}
    experiments: list[ComparedExperiment] = []
    run_ids, mlflow_experiments = [], []
    for f in found:
        assert f is not None
        arm, seeds = arms[f["id"]], split[f["id"]]
        names = sorted({m for metrics in seeds.values() for m in metrics})
        means = {m: _mean([s[m] for s in seeds.values() if m in s]) for m in names}
        experiments.append(
            ComparedExperiment(
                **f,
                arm=arm["arm"],
                config=arm["config"],
                seeds=sorted(seeds),
                mean=means,
                per_seed={str(k): dict(v) for k, v in seeds.items()},
                runs={str(k): v for k, v in arm["runs"].items()},
            )
        )
        run_ids += list(arm["runs"].values())
        if f["mlflow_experiment_id"] is not None:  # None: cancelled before its parent run was made
            mlflow_experiments.append(f["mlflow_experiment_id"])
    first = experiments[0]
    paired: dict[str, PairedDifferences] = {}
    for other in experiments[1:]:
        shared = sorted(set(split[first.id]) & set(split[other.id]))
        if len(shared) < 2:
            note = "paired differences need at least 2 seeds measured in both"
            paired[other.id] = PairedDifferences(
                against=first.id, shared_seeds=shared, comparison=None, note=note
            )
            continue
        comparison = compare_metrics(
            {s: split[other.id][s] for s in shared},
            {s: split[first.id][s] for s in shared},
            COMPARE_METRICS,
            treatment_label=other.name or other.id,
            baseline_label=first.name or first.id,
        )
        paired[other.id] = PairedDifferences(
            against=first.id, shared_seeds=shared, comparison=finite(comparison)
        )
    body = Comparison(
        judged_on="test" if on_test else "val",
        metrics=list(COMPARE_METRICS),
        experiments=experiments,
        paired=paired,
        mlflow_compare=service.mlflow.compare_link(mlflow_experiments, run_ids),
    )
    return _send(body, exclude_unset=True)


_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def _compared(service: Service, any_id: str) -> dict[str, Any] | None:
    """One experiment to compare, by this service's id or its MLflow parent run id; None if neither."""
    from workers.tracking import PARENT_ROLE, Tag

    row = service.store.get(any_id)
    if row is not None:
        parent = _parent_run(service, row)
        params = dict(parent.data.params) if parent is not None else {}
        return {"id": row.id, "name": row.name, "kind": row.kind, "loss": row.loss, "arch": row.arch,
                "status": row.status, "params": params, "parent": parent,
                "parent_run_id": parent.info.run_id if parent is not None else None,
                "mlflow_experiment_id": parent.info.experiment_id if parent is not None else None,
                "link": service.mlflow.link(parent.info.experiment_id, parent.info.run_id) if parent else None}  # fmt: skip
    if not _RUN_ID.match(any_id):
        return None
    try:
        parent = service.mlflow.client.get_run(any_id)
    except Exception as e:
        if getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise _mlflow_down(e) from None
    tags, params = parent.data.tags, dict(parent.data.params)
    if tags.get(Tag.ROLE) != PARENT_ROLE:
        return None
    return {
        "id": any_id,
        "name": tags.get(Tag.SPEC_NAME) or parent.info.run_name,
        "kind": "search" if "search.algorithm" in params else "run",
        "loss": tags.get(Tag.LOSS),
        "arch": tags.get(Tag.ARCH),
        "status": parent.info.status,
        "params": params,
        "parent": parent,
        "parent_run_id": any_id,
        "mlflow_experiment_id": parent.info.experiment_id,
        "link": service.mlflow.link(parent.info.experiment_id, any_id),
    }


def _bad_ids(message: str) -> Problem:
    return Problem(
        422, "Invalid request", message, kind="invalid-request", errors=[{"field": "ids", "message": message}]
    )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@lru_cache(maxsize=1)
def _schema_json() -> bytes:
    """The spec's JSON Schema, serialised once: it changes only with the code."""
    from workers.spec import Spec

    return json.dumps(Spec.model_json_schema(), ensure_ascii=False, separators=(",", ":")).encode()


@router.get(
    "/v1/spec/schema",
    response_model=SpecSchema,
    tags=["spec"],
    summary="The spec's JSON Schema (as `hdet spec schema` prints).",
)
def spec_schema() -> Response:
    return _json(_schema_json())
