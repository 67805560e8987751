"""What the API returns: the experiment record, its list page, events, readiness, an experiment's
results from MLflow, a comparison, the spec's JSON Schema and the error document (pydantic models:
every answer of ``/openapi.json`` is typed, ``/docs`` shows them). :func:`record` turns a database
row into the public record.

The results and comparison models mirror what :mod:`service.mlflow_view` and
:mod:`workers.evidence` assemble (NaN and infinities as null). The models of what comes from
MLflow and :mod:`workers` allow keys they do not declare, so that a new statistic is never dropped.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from datetime import datetime
from typing import Any, Literal

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
    "MlflowRun",
    "TrainingRun",
    "MetricComparison",
    "SeedDifference",
    "TrialSummary",
    "EvidenceSummary",
    "ExperimentResults",
    "ComparedExperiment",
    "PairedDifferences",
    "Comparison",
    "SpecSchema",
    "ProblemDocument",
    "problem_responses",
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
    status_checked_at: datetime | None = Field(
        default=None,
        description="when the reconciler last recorded its check of this record: at once when what Ray "
        "or MLflow say of it changes, else at least every 30 s while it is active",
    )
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


# ---------------------------------------------------------------------- results

#: metric name -> value (null: NaN or infinite)
Metrics = dict[str, float | None]


class MlflowRun(BaseModel):
    """An MLflow run of an experiment: its parent run, or a training run below it."""

    model_config = ConfigDict(extra="allow")

    run_id: str
    name: str | None = Field(description="the run's name in MLflow")
    status: str = Field(description="MLflow's: RUNNING, SCHEDULED, FINISHED, FAILED or KILLED")
    role: str | None = Field(description="parent or child (the tag hdet.role)")
    seed: int | None
    trial_id: str | None = Field(description="the Tune trial, or baseline / confirmatory; null for a run")
    arm: str | None = Field(description="search, baseline, confirmatory or best_confirmed; null for a run")
    metrics: Metrics = Field(description="the last value of every metric it logged")
    error: str | None = Field(description="why it failed")
    link: str | None = Field(description="the run in the MLflow UI (null without a UI URL)")


class TrainingRun(MlflowRun):
    """One training run (one seed of one configuration)."""

    checkpoint: str | None = Field(
        description="runs:/<run_id>/checkpoint/model.pt once the run FINISHED with a checkpoint"
    )


class SeedDifference(BaseModel):
    treatment: float
    baseline: float
    diff: float = Field(description="treatment - baseline")


class MetricComparison(BaseModel):
    """One metric of two arms paired by seed (:func:`workers.evidence.compare_metrics`): the test
    and interval used, every statistic beside them, and the verdict. Values as measured (AP in
    [0, 1]); null where a statistic is NaN (too few seeds)."""

    model_config = ConfigDict(extra="allow")

    n_pairs: int = Field(description="seeds measured in both arms")
    test: str = Field(description="t, wilcoxon, t-mixture-cs (seeds in rounds) or none (one pair)")
    p_value: float | None = Field(description="the test's raw two-sided p")
    ci_low: float | None
    ci_high: float | None
    ci_method: str = Field(description="t, wilcoxon-hl, t-mixture-cs or none")
    ci_confidence: float | None = Field(description="the interval's achieved level")
    ci95_low: float | None = Field(description="ci_low, under the name older readers use")
    ci95_high: float | None
    mean_diff: float | None = Field(description="mean over seeds of treatment - baseline")
    std_diff: float | None
    hl_estimate: float | None = Field(description="Hodges-Lehmann estimate of the difference")
    t_ci95_low: float | None
    t_ci95_high: float | None
    t_p: float | None
    wilcoxon_p: float | None
    wilcoxon_min_p: float | None = Field(description="the smallest p Wilcoxon can give with these seeds")
    boot_ci_low: float | None
    boot_ci_high: float | None
    boot_method: str | None
    wins: int = Field(description="seeds where the treatment is ahead")
    confidence: float = Field(description="the nominal level of every interval")
    per_seed: dict[str, SeedDifference]
    unpaired_seeds: list[str] = Field(description="seeds measured in one arm only")
    sd_treatment: float | None
    sd_baseline: float | None
    sd_diff: float | None
    sd_unpaired: float | None = Field(description="the difference's SD had the arms been independent")
    correlation: float | None = Field(description="of the arms over seeds (null: too few, or no variation)")
    note: str = Field(description="which test and interval, and why")
    estimand: str = Field(description="mean or pseudo-median: what the interval is about")
    estimate: float | None
    higher_is_better: bool | None = None
    p_adjusted: float | None = Field(
        default=None,
        description="secondary: Holm-adjusted among the secondaries; primary: its p, times family_k in a family",
    )
    holm_k: int | None = Field(default=None, description="the size of the Holm family")
    family_k: int | None = Field(default=None, description="arms judged against the baseline (Bonferroni)")
    family_alpha: float | None = Field(default=None, description="the family's level; each arm's is alpha/k")
    family_method: str | None = Field(default=None, description="bonferroni")
    better: str | None = Field(default=None, description="treatment, baseline or unclear")
    verdict: str | None = Field(default=None, description="in plain words")
    role: str | None = Field(default=None, description="primary or secondary, when a primary was named")
    outcome: str | None = Field(
        default=None, description="the primary's: better, worse, equivalent or undecided"
    )
    alpha: float | None = None
    margin: float | None = Field(default=None, description="the primary's equivalence margin")
    mde: float | None = Field(default=None, description="smallest difference found with 80 % power")
    seeds_to_decide: int | None = None
    within_margin: bool | None = None
    rule: dict[str, Any] | None = Field(default=None, description="the evidence plan of the primary")


class RankedArm(BaseModel):
    """One arm of a multi-arm comparison ranked on the primary (:func:`workers.evidence.arms.rank_arms`);
    values as measured (AP in [0, 1]); the fields against the baseline are absent on the baseline."""

    model_config = ConfigDict(extra="allow")

    arm: str = Field(description="baseline, confirmatory or the name of an arm of search.arms")
    rank: int = Field(description="1 = the best mean of the primary")
    n: int = Field(description="seeds")
    mean: float | None = Field(description="the primary's mean over the seeds")
    sd: float | None
    estimate: float | None = Field(default=None, description="against the baseline: the difference")
    ci_low: float | None = Field(default=None, description="its interval at 1 - alpha/k (Bonferroni)")
    ci_high: float | None = None
    ci_method: str | None = None
    p_value: float | None = None
    p_adjusted: float | None = Field(default=None, description="min(1, k p): Bonferroni over the k arms")
    outcome: str | None = Field(default=None, description="better, worse, equivalent or undecided")
    in_best_set: bool = Field(
        description="no other arm is better by a paired test (Bonferroni over the pairs)"
    )
    beaten_by: list[str] = Field(description="the arms found better than this one")
    pairs: int = Field(description="pairwise tests behind the best set")


class TrialSummary(BaseModel):
    """One configuration of a search, or a fixed arm (:class:`workers.summary.TrialRecord`)."""

    model_config = ConfigDict(extra="allow")

    trial_id: str
    arm: str = Field(description="search, baseline, confirmatory, arm (of search.arms) or best_confirmed")
    params: dict[str, Any] = Field(description="the configuration: dotted spec path -> value")
    status: str = Field(description="completed, stopped, failed or incomplete")
    error: str | None
    epochs: int = Field(description="the last epoch every seed reached")
    objective: float | None = Field(description="mean over seeds of the last epoch's AP")
    objective_std: float | None
    per_seed: dict[str, Metrics] = Field(description="seed -> the last epoch's metrics")
    child_runs: dict[str, str] = Field(description="seed -> MLflow run id")
    wall_s: float | None
    cpu_s: float | None
    gpu_s: float | None
    first_step_s: float | None
    epochs_run: int


class EvidenceSummary(BaseModel):
    """A search's or comparison's outcome (:class:`workers.summary.SearchSummary`), what
    ``hdet report`` renders: every arm per seed, and the paired comparisons with their verdicts."""

    model_config = ConfigDict(extra="allow")

    experiment: str
    parent_run_id: str
    objective: str
    seeds: list[int]
    algorithm: str
    scheduler: str
    epochs: int
    trials: list[TrialSummary]
    baseline: TrialSummary | None
    confirmatory: TrialSummary | None
    best_trial_id: str | None
    best_confirmed: TrialSummary | None
    confirm_seeds: list[int]
    comparison: dict[str, MetricComparison] = Field(description="metric -> best vs baseline")
    exploratory_comparison: dict[str, MetricComparison]
    confirmatory_comparison: dict[str, MetricComparison] = Field(
        description="metric -> confirmatory vs baseline (a comparison's verdict)"
    )
    judged_on: Literal["test", "val"]
    mechanism: dict[str, dict[str, dict[str, float | None]]] = Field(
        description="arm -> training-time metric -> {epoch: mean over seeds}"
    )
    convergence: dict[str, dict[str, Any]] = Field(description="arm -> whether its AP had plateaued")
    sensitivity: dict[str, Any]
    ap_vs_iou: dict[str, dict[str, float | None]] = Field(description="arm -> {IoU threshold: AP}")
    score_thresh: float | None = Field(default=None, description="the score threshold of the tables above")
    at_score_thresholds: dict[str, dict[str, dict[str, MetricComparison]]] = Field(
        default_factory=dict,
        description="extra score threshold -> table -> the primary's comparison at it (secondary)",
    )
    arms: list[TrialSummary] = Field(default_factory=list, description="the arms of search.arms")
    arm_comparisons: dict[str, dict[str, MetricComparison]] = Field(
        default_factory=dict, description="arm -> metric -> that arm vs baseline (Bonferroni across the arms)"
    )
    family: dict[str, Any] = Field(
        default_factory=dict, description="the arms judged against the baseline: arms, k, alpha, method"
    )
    ranking: list[RankedArm] = Field(
        default_factory=list, description="with search.arms: every arm and the baseline, best first"
    )
    complete: bool
    wall_s: float | None


class ExperimentResults(BaseModel):
    """An experiment's results from MLflow (``partial`` while it runs; no parent before it starts)."""

    summary: EvidenceSummary | None = Field(
        description="a search's or comparison's evidence; null for a single run"
    )
    id: str
    status: str
    partial: bool = Field(description="the experiment has not ended: its runs may still change")
    parent: MlflowRun | None
    runs: list[TrainingRun]


# ---------------------------------------------------------------------- comparison


class ComparedExperiment(BaseModel):
    """One experiment of a comparison: its record (or MLflow parent run), and the seeds of the
    configuration compared with their metrics."""

    id: str = Field(description="this service's experiment id, or an MLflow parent run id")
    name: str | None
    kind: str = Field(description="run or search")
    loss: str | None
    arch: str | None
    status: str = Field(description="the record's status, or the MLflow parent run's")
    params: dict[str, str] = Field(description="the parent run's MLflow params")
    parent_run_id: str | None
    mlflow_experiment_id: str | None
    link: str | None = Field(description="the parent run in the MLflow UI")
    arm: str | None = Field(
        description="run, best (a search's best), confirmatory (a comparison's) or the best-ranked arm's name"
    )
    config: dict[str, Any] | None = Field(description="that configuration's params (a search's)")
    seeds: list[int]
    mean: Metrics = Field(description="metric -> mean over the seeds")
    per_seed: dict[str, Metrics]
    runs: dict[str, str] = Field(description="seed -> MLflow run id")


class PairedDifferences(BaseModel):
    """One experiment against the first, on the seeds both measured."""

    against: str
    shared_seeds: list[int]
    comparison: dict[str, MetricComparison] | None = Field(description="null with fewer than 2 shared seeds")
    note: str | None = Field(default=None, description="why there is no comparison (absent otherwise)")


class Comparison(BaseModel):
    """2-10 experiments side by side, and paired differences of each against the first."""

    judged_on: Literal["test", "val"] = Field(
        description="test when every experiment has held-out metrics, else val"
    )
    metrics: list[str] = Field(description="the metrics paired")
    experiments: list[ComparedExperiment]
    paired: dict[str, PairedDifferences] = Field(description="experiment id -> it against the first")
    mlflow_compare: str | None = Field(description="MLflow's own compare view of the runs")


# ---------------------------------------------------------------------- spec schema


class SpecSchema(BaseModel):
    """The experiment spec's JSON Schema (draft 2020-12, as pydantic writes it)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    defs: dict[str, dict[str, Any]] = Field(alias="$defs", description="the sections' schemas")
    additional_properties: bool = Field(alias="additionalProperties")
    description: str
    properties: dict[str, dict[str, Any]]
    required: list[str]
    title: str
    type: Literal["object"]


# ---------------------------------------------------------------------- errors


class ProblemField(BaseModel):
    field: str = Field(description="the full path of the invalid input (loss.gamma), or a parameter")
    message: str


class ProblemDocument(BaseModel):
    """Every error (RFC 9457 ``application/problem+json``)."""

    type: str = Field(description="https://harmonicdet.dev/problems/<kind>, or about:blank")
    title: str
    status: int
    detail: str | None = None
    instance: str | None = Field(default=None, description="the request's path")
    errors: list[ProblemField] | None = Field(default=None, description="every invalid input (a 422)")


#: what each error status of a route means
_PROBLEMS = {
    401: "no token, or a wrong one (WWW-Authenticate: Bearer)",
    404: "no such experiment",
    409: "the experiment has ended",
    422: "an invalid parameter or body: `errors` names each field",
    503: "Ray or MLflow does not answer (Retry-After)",
}


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` written in place (``#/$defs/..`` means nothing inside an
    OpenAPI document)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return dict(walk(schema))


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses=`` for its error answers: each an ``application/problem+json``
    :class:`ProblemDocument` (in place of FastAPI's own 422 schema, which the API never sends)."""
    schema = _inline(ProblemDocument.model_json_schema())
    return {
        status: {
            "description": _PROBLEMS[status],
            "content": {"application/problem+json": {"schema": schema}},
        }
        for status in statuses
    }


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
