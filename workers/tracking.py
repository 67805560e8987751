"""MLflow tracking of HarmonicDet experiments: a parent run per experiment, a child run per training run.

Everything goes through :class:`mlflow.MlflowClient` with explicit run ids, never through the
fluent "active run" API: Tune trials can share a process, and a global active run would mix
their metrics. A child run carries a ``hdet.run_key`` tag (the trial id, or the run name of a
single run) so a retried or resumed training run finds its own run again instead of opening a
second one.

Tags written on every run (so the MLflow UI can filter on them): ``loss`` (the loss kind, e.g.
``tags.loss = 'harmonicdet'``), ``arch``, ``git_commit``, ``harmonicdet_version``,
``hdet.spec_name`` and ``hdet.role`` (``parent`` or ``child``; ``pretrain`` for a backbone
pretraining, :mod:`workers.pretrain`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from workers.spec import Spec

__all__ = [
    "TrackingContext",
    "PRETRAIN_ROLE",
    "get_or_create_experiment",
    "open_parent_run",
    "find_or_create_child_run",
    "find_child_run",
    "flatten_params",
    "run_tags",
    "log_metrics",
    "log_missing_epochs",
    "logged_steps",
    "log_dict_artifact",
    "client",
    "log_params",
    "resolve_tracking_uri",
    "RUN_KEY_TAG",
    "Tag",
    "Artifact",
    "mark_run",
    "child_runs",
    "close_running_runs",
]

PARENT_ROLE = "parent"
CHILD_ROLE = "child"
#: A backbone pretraining's own run (:mod:`workers.pretrain`).
PRETRAIN_ROLE = "pretrain"


class Tag:
    """Every MLflow tag name HarmonicDet writes or reads: the one schema of its runs.

    No other module spells a tag name; they import it from here.
    """

    # Filter tags on every run (run_tags).
    LOSS = "loss"
    ARCH = "arch"
    DATASET = "dataset"
    GIT_COMMIT = "git_commit"
    VERSION = "harmonicdet_version"
    SPEC_NAME = "hdet.spec_name"
    ROLE = "hdet.role"  # PARENT_ROLE, CHILD_ROLE or PRETRAIN_ROLE
    # Set by whoever submits the experiment (the REST service): ties the runs to its record.
    EXPERIMENT_ID = "hdet.experiment_id"
    # Parent run.
    RUN_NAME = "hdet.run_name"
    SEARCH_COMPLETE = "hdet.search_complete"
    JUDGED_ON = "hdet.judged_on"
    BEST_TRIAL_ID = "hdet.best_trial_id"
    BEST_CONFIG = "hdet.best_config"
    # Child (training) run.
    RUN_KEY = "hdet.run_key"
    TRIAL_ID = "hdet.trial_id"
    SEED = "hdet.seed"
    ARM = "hdet.arm"
    CONFIG = "hdet.config"
    TRIAL_STATUS = "hdet.trial_status"
    STARTS = "hdet.starts"
    RESUMED_FROM_EPOCH = "hdet.resumed_from_epoch"
    TRAINER = "hdet.trainer"  # how the training ran: pooled or ray_train (scaling.trainer)
    # Any run that ended FAILED says why.
    ERROR = "hdet.error"
    # Pretraining run.
    PRETRAIN_KEY = "hdet.pretrain_key"
    BODY = "body"


RUN_KEY_TAG = Tag.RUN_KEY


class Artifact:
    """Where a training run's files live among its MLflow artifacts."""

    #: The best model: a torchvision ``state_dict`` and what it is (arch, classes, image size).
    CHECKPOINT_DIR = "checkpoint"
    MODEL_FILE = "model.pt"
    MODEL_INFO_FILE = "model.json"


def mark_run(c: MlflowClient, run_id: str, status: str, error: str | None = None) -> None:
    """End (or re-open) a run with ``status``; a FAILED run gets its reason in ``hdet.error``."""
    if error:
        c.set_tag(run_id, Tag.ERROR, error[:4000])
    if status == "RUNNING":
        c.update_run(run_id, status=status)
    else:
        c.set_terminated(run_id, status=status)


@dataclass(frozen=True)
class TrackingContext:
    """Where a training run logs: picklable, so it travels to Ray workers and Tune trials.

    Attributes:
        tracking_uri: MLflow tracking URI (a sqlite URI locally, an http URI for a server).
        experiment: MLflow experiment name.
        experiment_id: its id.
        parent_run_id: the experiment's parent run; child runs hang below it.
    """

    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str


def client(tracking_uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def resolve_tracking_uri(spec_uri: str | None = None, cli_uri: str | None = None) -> str:
    """CLI flag, else the spec's ``tracking.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the local store."""
    from workers.env import default_tracking_uri

    uri = cli_uri or spec_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def flatten_params(spec_dict: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested spec dict to MLflow params: ``{"loss": {"alpha": 1.5}}`` -> ``{"loss.alpha": "1.5"}``.

    Lists and ``None`` become their JSON text, so a param shows what the spec said.
    """
    out: dict[str, str] = {}
    for key, value in spec_dict.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if value:
                out.update(flatten_params(value, prefix=name + "."))
            else:
                out[name] = "{}"
        elif isinstance(value, str):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def run_tags(spec: Spec, role: str) -> dict[str, str]:
    """Tags that make runs filterable in the MLflow UI."""
    from workers.env import git_commit, package_version

    return {
        Tag.LOSS: spec.loss.kind,
        Tag.ARCH: spec.detector.arch,
        Tag.GIT_COMMIT: git_commit(),
        Tag.VERSION: package_version(),
        Tag.SPEC_NAME: spec.name,
        Tag.ROLE: role,
        Tag.DATASET: spec.dataset.format,
    }


def get_or_create_experiment(c: MlflowClient, name: str, tracking_uri: str) -> str:
    """The id of the experiment ``name``, created (or restored) when needed."""
    return _get_or_create_experiment(c, name, tracking_uri)


def _get_or_create_experiment(c: MlflowClient, name: str, tracking_uri: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return str(exp.experiment_id)
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        # Keep artifacts next to the local database rather than in ./mlartifacts of the cwd.
        db = Path(tracking_uri[len("sqlite:///") :])
        artifact_location = (db.parent / "artifacts" / name).resolve().as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return str(c.create_experiment(name, artifact_location=artifact_location))
    except MlflowException:
        # Another process created it between our lookup and our create.
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def log_params(c: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    """Log params in batches (MLflow takes at most 100 per call); values cut to MLflow's limit."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def open_parent_run(
    spec: Spec, tracking_uri: str, resume: bool = False, extra_tags: Mapping[str, str] | None = None
) -> TrackingContext:
    """Create (or, with ``resume``, re-open the latest) parent run of ``spec``'s experiment.

    The parent run gets the flattened spec as params, the resolved spec and the environment as
    artifacts, the filter tags of :func:`run_tags` and ``extra_tags`` (set by whoever submitted
    the run, e.g. ``Tag.EXPERIMENT_ID`` by the REST service; the filter tags win a clash).
    """
    from workers.env import environment

    c = client(tracking_uri)
    exp_id = _get_or_create_experiment(c, spec.tracking.experiment, tracking_uri)
    run_id: str | None = None
    if resume:
        runs = c.search_runs(
            [exp_id],
            filter_string=f"tags.`{Tag.ROLE}` = '{PARENT_ROLE}' and tags.`{Tag.SPEC_NAME}` = '{spec.name}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if runs:
            run_id = runs[0].info.run_id
            c.update_run(run_id, status="RUNNING")
            for key, value in (extra_tags or {}).items():
                c.set_tag(run_id, key, value)
    if run_id is None:
        tags = {**(extra_tags or {}), **run_tags(spec, PARENT_ROLE)}
        run = c.create_run(exp_id, run_name=spec.name, tags=tags)
        run_id = run.info.run_id
        log_params(c, run_id, flatten_params(spec.to_dict()))
        log_dict_artifact(c, run_id, spec.to_dict(), "spec.json")
        log_dict_artifact(c, run_id, environment(), "environment.json")
    return TrackingContext(tracking_uri, spec.tracking.experiment, exp_id, run_id)


def find_or_create_child_run(
    ctx: TrackingContext, run_key: str, run_name: str, tags: Mapping[str, str] | None = None
) -> str:
    """The child run of ``ctx``'s parent tagged ``hdet.run_key = run_key``; created when missing.

    Args:
        ctx: the experiment's tracking context.
        run_key: a key unique within the parent run (a Tune trial id, or a single run's name);
            a retried or resumed run with the same key gets the same MLflow run back.
        run_name: the run's display name.
        tags: extra tags for a newly created run.

    Returns:
        The MLflow run id.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    c = client(ctx.tracking_uri)
    key = run_key.replace("'", "")
    found = find_child_run(c, ctx, key)
    if found is not None:
        run_id = found.info.run_id
        if found.info.status != "RUNNING":
            c.update_run(run_id, status="RUNNING")
        return str(run_id)
    all_tags = {
        **(tags or {}),
        MLFLOW_PARENT_RUN_ID: ctx.parent_run_id,
        RUN_KEY_TAG: key,
        Tag.ROLE: CHILD_ROLE,
    }
    run = c.create_run(ctx.experiment_id, run_name=run_name, tags=all_tags)
    return str(run.info.run_id)


def find_child_run(c: MlflowClient, ctx: TrackingContext, run_key: str) -> Any | None:
    """The child run of ``ctx``'s parent tagged ``hdet.run_key = run_key``, or None."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    key = run_key.replace("'", "")
    found = c.search_runs(
        [ctx.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{ctx.parent_run_id}' and tags.`{RUN_KEY_TAG}` = '{key}'",
        max_results=1,
    )
    return found[0] if found else None


def child_runs(c: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Any]:
    """Every child run of the parent run ``parent_run_id`` (``mlflow.parentRunId``), oldest first."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    out: list[Any] = []
    token = None
    while True:
        page = c.search_runs(
            [experiment_id],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'",
            order_by=["attributes.start_time ASC"],
            max_results=1000,
            page_token=token,
        )
        out.extend(page)
        token = page.token
        if not token:
            return out


def close_running_runs(
    c: MlflowClient, experiment_id: str, parent_run_id: str, status: str, error: str | None = None
) -> list[str]:
    """End the parent run and its child runs that are still ``RUNNING`` with ``status`` (and
    ``error``, see :func:`mark_run`); the ids of the runs it ended."""
    closed = []
    for run in [c.get_run(parent_run_id), *child_runs(c, experiment_id, parent_run_id)]:
        if run.info.status == "RUNNING":
            mark_run(c, run.info.run_id, status, error)
            closed.append(str(run.info.run_id))
    return closed


def logged_steps(c: MlflowClient, run_id: str, key: str = "epoch") -> set[int]:
    """Steps at which ``key`` was logged: the epochs a run already has in MLflow."""
    return {int(m.step) for m in c.get_metric_history(run_id, key)}


def log_missing_epochs(c: MlflowClient, run_id: str, epochs: Mapping[int, Mapping[str, Any]]) -> None:
    """Log each ``epoch -> metrics`` the run does not have yet (at ``step = epoch``).

    For epochs a worker reported but may not have logged: it died, or was aborted, in between.
    """
    have = logged_steps(c, run_id)
    for epoch in sorted(epochs):
        if epoch not in have:
            log_metrics(c, run_id, epochs[epoch], step=epoch)


def log_metrics(c: MlflowClient, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    """Log the finite numeric entries of ``metrics`` at ``step`` in one call."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = []
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if not math.isfinite(float(v)):
            continue
        items.append(Metric(_metric_key(k), float(v), now, step))
    for i in range(0, len(items), 1000):
        c.log_batch(run_id, metrics=items[i : i + 1000])


def _metric_key(key: str) -> str:
    # MLflow allows letters, digits, and _-./ and space; anything else becomes "_".
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in key)


def log_dict_artifact(c: MlflowClient, run_id: str, data: Any, artifact_file: str) -> None:
    """Write ``data`` as JSON (``.json``) or YAML (``.yaml``) to the run's artifacts."""
    path = Path(artifact_file)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / path.name
        if path.suffix in (".yaml", ".yml"):
            import yaml

            local.write_text(yaml.safe_dump(data, sort_keys=False))
        else:
            local.write_text(json.dumps(data, indent=2, default=str))
        c.log_artifact(
            run_id, str(local), artifact_path=str(path.parent) if str(path.parent) != "." else None
        )
