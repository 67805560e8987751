"""What the API returns: the experiment record, its list page, events, readiness (pydantic models,
the OpenAPI schema at ``/docs``). :func:`record` turns a database row into the public record.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.db import aware
from service.models import EventRow, RecordFields

__all__ = [
    "Experiment",
    "ExperimentList",
    "Event",
    "EventList",
    "Readiness",
    "Component",
    "record",
    "RecordJson",
    "event",
]


class RayInfo(BaseModel):
    """Ray's last word on the job (the record's ``id`` is its ``submission_id``)."""

    submission_id: str
    status: str | None = Field(description="PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED")
    message: str | None = None
    exit_code: int | None = Field(default=None, description="the entrypoint's exit code once it ended")
    submit_s: float | None = Field(default=None, description="seconds Ray took to accept the job")


class MlflowInfo(BaseModel):
    experiment: str = Field(description="MLflow experiment name (the spec's tracking.experiment)")
    experiment_id: str | None = None
    parent_run_id: str | None = None
    link: str | None = Field(default=None, description="the parent run in the MLflow UI")


class Failure(BaseModel):
    reason: str
    exit_code: int | None = None
    ray_message: str | None = None
    log_tail: str | None = Field(default=None, description="the job's last lines (spec or dataset refused)")


class Links(BaseModel):
    self: str
    events: str
    logs: str
    results: str
    cancel: str
    mlflow: str | None = None


class Experiment(BaseModel):
    """One experiment: what was asked, where it runs, what became of it."""

    id: str = Field(description="exp- + 16 hex; also the Ray job's submission_id")
    name: str
    kind: str = Field(description="run (one training run) or search (a Tune search)")
    loss: str
    arch: str
    status: str = Field(
        description="SUBMITTING, PENDING, RUNNING, CANCELLING, SUCCEEDED, FAILED, CANCELLED or LOST"
    )
    waiting_for: str | None = Field(
        default=None,
        description="what a SUBMITTING or PENDING record waits for (Ray to answer, resources to train)",
    )
    spec: dict[str, Any] = Field(description="the resolved spec (every default filled in)")
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    ended_at: datetime | None = None
    status_checked_at: datetime | None = Field(default=None, description="when Ray was last asked")
    ray: RayInfo
    mlflow: MlflowInfo
    progress: dict[str, Any] | None = Field(default=None, description="runs by status, epoch, best AP so far")
    failure: Failure | None = None
    links: Links


class ExperimentList(BaseModel):
    items: list[Experiment]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next (older) page; null at the end")


class Event(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    seq: int
    time: datetime
    from_: str | None = Field(alias="from", serialization_alias="from")
    to: str
    reason: str


class EventList(BaseModel):
    items: list[Event]


class Component(BaseModel):
    ok: bool
    detail: str


class Readiness(BaseModel):
    ready: bool
    components: dict[str, Component]


def record(row: RecordFields, mlflow_link: str | None) -> Experiment:
    """The public record of a row (never a token)."""
    base = f"/v1/experiments/{row.id}"
    spec = json.loads(row.spec)
    created, updated = aware(row.created_at), aware(row.updated_at)
    assert created is not None and updated is not None
    return Experiment(
        id=row.id,
        name=row.name,
        kind=row.kind,
        loss=row.loss,
        arch=row.arch,
        status=row.status,
        waiting_for=row.waiting_for,
        spec=spec,
        created_at=created,
        updated_at=updated,
        started_at=aware(row.started_at),
        ended_at=aware(row.ended_at),
        status_checked_at=aware(row.status_checked_at),
        ray=RayInfo(
            submission_id=row.id,
            status=row.ray_status,
            message=row.ray_message,
            exit_code=row.ray_exit_code,
            submit_s=row.submit_s,
        ),
        mlflow=MlflowInfo(
            experiment=spec.get("tracking", {}).get("experiment", ""),
            experiment_id=row.mlflow_experiment_id,
            parent_run_id=row.mlflow_parent_run_id,
            link=mlflow_link,
        ),
        progress=json.loads(row.progress) if row.progress else None,
        failure=Failure(**json.loads(row.failure)) if row.failure else None,
        links=Links(
            self=base,
            events=f"{base}/events",
            logs=f"{base}/logs",
            results=f"{base}/results",
            cancel=f"{base}/cancel",
            mlflow=mlflow_link,
        ),
    )


class RecordJson:
    """The JSON of :func:`record`, kept for the last ``size`` row versions: a list page is mostly
    records that have not changed since the previous request, and parsing the stored spec and
    serialising it again made a page of 50 about three quarters of a list request's time.

    A row's version is its ``updated_at``: every write of :class:`service.db.Store` sets it, so a
    transition or a reconciler's check makes a new entry. Thread-safe."""

    def __init__(self, size: int = 2048):
        self.size = size
        self._cache: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, row: RecordFields, mlflow_link: str | None) -> bytes:
        key = (row.id, row.updated_at, row.status, mlflow_link)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        made = record(row, mlflow_link).model_dump_json().encode()
        with self._lock:
            self._cache[key] = made
            if len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return made

    def page(self, rows: list[tuple[RecordFields, str | None]], next_cursor: str | None) -> bytes:
        """An :class:`ExperimentList` as JSON, from the records' cached JSON."""
        items = b",".join(self(row, link) for row, link in rows)
        return b'{"items":[' + items + b'],"next_cursor":' + json.dumps(next_cursor).encode() + b"}"


def event(row: EventRow) -> Event:
    at = aware(row.at)
    assert at is not None
    return Event.model_validate(
        {"seq": row.seq, "time": at, "from": row.from_status, "to": row.to_status, "reason": row.reason}
    )
