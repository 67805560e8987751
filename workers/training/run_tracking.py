"""The MLflow side of one training run: its child run, the start record rank 0 writes, the best
model and the final plots. No Ray here: the trainer (driver) and the rank-0 worker both use it.

A run's start record is the ``hdet.starts`` count, ``hdet.resumed_from_epoch`` after a restart,
the environment of each start (``environment/start_<n>.json``) and the epochs its checkpoint holds
that MLflow lacks (a worker that died between its report and its logging).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from harmonic.eval.detections import AP_IOU_KEYS
from workers.tracking import (
    CHILD_ROLE,
    Artifact,
    Tag,
    TrackingContext,
    client,
    find_or_create_child_run,
    flatten_params,
    log_dict_artifact,
    log_missing_epochs,
    log_params,
    run_tags,
)

if TYPE_CHECKING:
    from workers.spec import Spec

__all__ = [
    "ChildRun",
    "ChildRunOwner",
    "TrackedRun",
    "prepare_child_run",
    "start_tracking",
    "log_best_model",
    "log_final_artifacts",
]


class ChildRun(NamedTuple):
    """What identifies a training run's MLflow child run: found again by ``key`` after a retry."""

    spec: Spec
    key: str
    name: str
    tags: dict[str, str]


class ChildRunOwner:
    """The driver's side of a training's MLflow child run (both trainers have one): found by its
    key when the rank-0 worker created it, and closed with the training's outcome."""

    tracking: TrackingContext | None
    child_run: ChildRun | None
    mlflow_run_id: str

    def child_run_id(self) -> str:
        """The MLflow child run; found (or, if its worker never got to it, created) by its key
        when the trainer left it to the worker. Finding it changes nothing on it."""
        if not self.mlflow_run_id and self.tracking is not None and self.child_run is not None:
            from workers.tracking import find_child_run

            spec, key, name, tags = self.child_run
            found = find_child_run(client(self.tracking.tracking_uri), self.tracking, key)
            if found is not None:
                self.mlflow_run_id = str(found.info.run_id)
            else:
                self.mlflow_run_id = prepare_child_run(
                    self.tracking, spec, run_key=key, run_name=name, tags=tags
                )
        return self.mlflow_run_id

    def close_mlflow_run(self, status: str, error: str | None = None) -> None:
        """End the child run with ``status`` (FINISHED, FAILED, KILLED), recording ``error`` as a tag."""
        from workers.tracking import mark_run

        if self.tracking is None or not self.child_run_id():
            return
        mark_run(client(self.tracking.tracking_uri), self.mlflow_run_id, status, error)


class TrackedRun(NamedTuple):
    """An open MLflow client and the child run it logs to."""

    client: Any
    run_id: str


def prepare_child_run(
    tracking: TrackingContext,
    spec: Spec,
    *,
    run_key: str,
    run_name: str,
    tags: dict[str, str] | None = None,
) -> str:
    """Find or create the MLflow child run of one training run; record its spec there once.

    The run gets the spec's tags and ``tags``, its flattened spec as params (those it lacks) and
    ``spec.json``. Found again by ``run_key`` after a retry or a resume, when ``tags`` are set again.

    Returns:
        The run id.
    """
    from mlflow.entities import RunTag

    all_tags = {**run_tags(spec, CHILD_ROLE), Tag.RUN_NAME: run_name, **(tags or {})}
    run_id = find_or_create_child_run(tracking, run_key, run_name, all_tags)
    c = client(tracking.tracking_uri)
    if tags:
        c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    existing = c.get_run(run_id).data.params
    params = {k: v for k, v in flatten_params(spec.to_dict()).items() if k not in existing}
    if params:
        log_params(c, run_id, params)
    if "spec.json" not in {a.path for a in c.list_artifacts(run_id)}:
        log_dict_artifact(c, run_id, spec.to_dict(), "spec.json")
    return run_id


# --------------------------------------------------------------------------- rank 0's start


def start_tracking(
    tracking: TrackingContext,
    child: ChildRun,
    run_id: str,
    *,
    device: str,
    start_epoch: int,
    history: list[dict[str, Any]],
    background: bool,
    say: Callable[[str], None],
) -> Future[TrackedRun]:
    """Open the MLflow client, find or create the child run when the trainer left it to the worker
    (``run_id`` empty: :func:`prepare_child_run`), and write the run's start record; in a thread if
    ``background``, else before returning.

    Returns:
        A future of the :class:`TrackedRun`.
    """
    from concurrent.futures import ThreadPoolExecutor

    def start() -> TrackedRun:
        mlf = client(tracking.tracking_uri)
        rid = run_id or prepare_child_run(
            tracking, child.spec, run_key=child.key, run_name=child.name, tags=child.tags
        )
        _record_start(mlf, rid, device, start_epoch, history, say)
        return TrackedRun(mlf, rid)

    if not background:
        done: Future[TrackedRun] = Future()
        done.set_result(start())
        return done
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hdet-mlflow-start")
    future = pool.submit(start)
    pool.shutdown(wait=False)
    return future


def _record_start(
    mlf: Any,
    run_id: str,
    device: str,
    start_epoch: int,
    history: list[dict[str, Any]],
    say: Callable[[str], None],
) -> None:
    from workers.env import environment

    run = mlf.get_run(run_id)
    starts = int(run.data.tags.get(Tag.STARTS, "0")) + 1
    mlf.set_tag(run_id, Tag.STARTS, str(starts))
    if start_epoch:
        mlf.set_tag(run_id, Tag.RESUMED_FROM_EPOCH, str(start_epoch))
        say(f"resuming {run.info.run_name} from its epoch {start_epoch} checkpoint (start #{starts})")
    log_dict_artifact(mlf, run_id, environment(device), f"environment/start_{starts}.json")
    # Epochs the checkpoint has but MLflow lacks (the worker died between report and logging).
    log_missing_epochs(mlf, run_id, {int(h["epoch"]): h for h in history})


# --------------------------------------------------------------------------- artifacts


def _model_info(spec: Spec, train_ds: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "arch": spec.detector.arch,
        "num_classes": int(train_ds.num_classes) + 1,
        "backbone": spec.detector.backbone,
        "image_size": spec.detector.image_size,
        "anchor_scale": spec.detector.anchor_scale,
        "categories": list(train_ds.categories),
        "label_to_cat_id": {str(k): int(v) for k, v in dict(train_ds.label_to_cat_id).items()},
        "loss": spec.loss.kind,
        "epoch": int(metrics["epoch"]),
        "AP": float(metrics.get("AP", float("nan"))),
    }


def log_best_model(run: TrackedRun, model: Any, spec: Spec, train_ds: Any, metrics: dict[str, Any]) -> None:
    """The best epoch's weights as a plain torchvision ``state_dict`` plus a JSON describing the model."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model.state_dict(), Path(tmp) / Artifact.MODEL_FILE)
        (Path(tmp) / Artifact.MODEL_INFO_FILE).write_text(
            json.dumps(_model_info(spec, train_ds, metrics), indent=2)
        )
        run.client.log_artifacts(run.run_id, tmp, artifact_path=Artifact.CHECKPOINT_DIR)


def log_final_artifacts(
    run: TrackedRun,
    run_name: str,
    history: list[dict[str, Any]],
    dets: list[dict[str, Any]],
    val_ds: Any,
    diagnostics: list[dict[str, Any]],
) -> None:
    """The final epoch's plots (AP vs IoU, score-IoU density, training consistency, IoU histogram)
    and ``history.json`` under ``plots/``; ``diagnostics`` are every rank's training diagnostics."""
    from harmonic import plots
    from harmonic.analysis import TrainingDiagnostics, match_detections

    last = history[-1]
    curve = {t / 100: last[f"ap_iou_{t}"] for t in AP_IOU_KEYS if f"ap_iou_{t}" in last}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        plots.plot_ap_vs_iou({run_name: curve}, out / "ap_vs_iou.png")
        md = match_detections(val_ds.coco, dets)
        # The detections that overlap their object at all, as consistency_report considers them.
        sel = md.iou >= 0.1
        plots.plot_score_iou_density(
            md.score[sel], md.iou[sel], out / "score_iou_density.png", title=f"{run_name}: score vs IoU"
        )
        epochs = [int(h["epoch"]) for h in history]
        plots.plot_training_consistency(
            epochs,
            [h.get("train_one_plus_beta_r", float("nan")) for h in history],
            [h.get("train_one_plus_beta_c", float("nan")) for h in history],
            [h.get("train_aic", float("nan")) for h in history],
            out / "training_consistency.png",
        )
        diag = TrainingDiagnostics.combine(diagnostics)
        plots.plot_iou_histogram(diag["iou_hist"], out / "iou_histogram.png", counts=True)
        (out / "ap_vs_iou.json").write_text(json.dumps(curve, indent=2))
        (out / "history.json").write_text(json.dumps(history, indent=2))
        run.client.log_artifacts(run.run_id, tmp, artifact_path="plots")
