"""One epoch of one worker: the training pass over its shard, the evaluation of its validation
share, and (rank 0) the epoch's metrics from what every rank gathered.

No Ray here: the caller gathers across ranks (``all_gather_object``) and reports.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from harmonic.eval.detections import eval_mode, image_id, to_coco_results, to_pre_nms_records
from workers.errors import NonFiniteLossError
from workers.hooks import TrainHooks
from workers.summary.records import TEST_PREFIX  # the metric names' one home (light: no torch)

if TYPE_CHECKING:
    from workers.spec import Spec
    from workers.train_state import TrainParts
    from workers.worker_loop import FaultInjector

__all__ = [
    "TEST_PREFIX",
    "ShardTrainStats",
    "ShardDetections",
    "train_epoch",
    "evaluate_shard",
    "train_metrics",
    "epoch_metrics",
]


@dataclass
class ShardTrainStats:
    """One rank's training epoch: loss sums per term, steps, images, median step time (data
    loading included) and the training diagnostics' epoch summary."""

    loss_sums: dict[str, float]
    steps: int
    images: int
    step_time_s: float
    diag: dict[str, Any]


class ShardDetections(NamedTuple):
    """One rank's evaluation share: detections as COCO results, and pre-NMS records (if asked)."""

    dets: list[dict[str, Any]]
    pre_nms: list[dict[str, Any]]


def train_epoch(
    model: Any,
    loader: Any,
    parts: TrainParts,
    device: Any,
    spec: Spec,
    *,
    epoch: int,
    rank: int,
    iters_per_epoch: int,
    use_amp: bool,
    amp_dtype: Any = None,
    pop_diagnostics: Callable[[Any], dict[str, Any]],
    faults: FaultInjector | None = None,
    hooks: TrainHooks | None = None,
) -> ShardTrainStats:
    """One pass over the shard with ``model`` (DDP-wrapped or not) and ``parts``' optimizer,
    scheduler and scaler; raises :class:`NonFiniteLossError` on a NaN or infinite loss term.
    ``amp_dtype``: the autocast dtype when ``use_amp`` (None: torch's default for the device).
    ``hooks``: the worker's :mod:`workers.hooks` (the time a step hook holds the worker is not timed)."""
    import torch

    from harmonic.analysis import TrainingDiagnostics

    optimizer, scheduler, scaler = parts.optimizer, parts.scheduler, parts.scaler
    clip_grad_norm = spec.train.clip_grad_norm
    diag = TrainingDiagnostics()
    sums: dict[str, float] = {}
    steps = images = 0
    step_times: list[float] = []
    hooks = hooks or TrainHooks()
    on_steps = hooks.on_steps
    t_step = time.perf_counter()
    for step, (imgs, targets) in enumerate(loader):
        if step == 0:
            hooks.phase("first_step")
        imgs = [im.to(device, non_blocking=True) for im in imgs]
        targets = [{k: (v.to(device) if hasattr(v, "to") else v) for k, v in tg.items()} for tg in targets]
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
            loss_dict = model(imgs, targets)
        global_step = (epoch - 1) * iters_per_epoch + step
        if faults is not None:
            loss_dict = faults.at_step(loss_dict, global_step)
        for name, value in loss_dict.items():
            if not torch.isfinite(value).all():
                raise NonFiniteLossError(global_step, epoch, name, float(value.detach().float().sum()), rank)
        loss = sum(loss_dict.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        d = pop_diagnostics(model)
        if d:
            diag.update(d)
        for name, value in loss_dict.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        steps += 1
        images += len(imgs)
        now = time.perf_counter()
        step_times.append(now - t_step)  # data loading included, as in images_per_s
        if on_steps and hooks.step_end(epoch, now - t_step, len(imgs), last=step == iters_per_epoch - 1):
            now = time.perf_counter()
        t_step = now
    median = statistics.median(step_times) if step_times else float("nan")
    return ShardTrainStats(sums, steps, images, median, diag.epoch_summary())


def evaluate_shard(
    model: Any, loader: Any, device: Any, label_to_cat_id: Any, *, with_pre_nms: bool
) -> ShardDetections:
    """This rank's evaluation share: its detections as COCO results, and (if asked) its pre-NMS
    predictions in the form of :func:`harmonic.analysis.nms_audit` (numpy, COCO category ids)."""
    import torch

    from harmonic.detectors import pre_nms_predictions

    dets: list[dict[str, Any]] = []
    pre: list[dict[str, Any]] = []
    with torch.no_grad(), eval_mode(model):
        for imgs, targets in loader:
            imgs = [im.to(device) for im in imgs]
            ids = [image_id(tg) for tg in targets]
            dets.extend(to_coco_results(model(imgs), ids, label_to_cat_id))
            if with_pre_nms:
                pre.extend(to_pre_nms_records(pre_nms_predictions(model, imgs), ids, label_to_cat_id))
    return ShardDetections(dets, pre)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _loss_key(term: str) -> str:
    return term if term.startswith("loss") else f"loss_{term}"


def train_metrics(train_all: list[ShardTrainStats], train_time: float) -> dict[str, Any]:
    """The training half of an epoch's metrics, from every rank's stats: the loss terms and their sum,
    throughput, step time and the training-time consistency of the coupled loss (``train_*``)."""
    from harmonic.analysis import TrainingDiagnostics

    m: dict[str, Any] = {}
    steps = sum(p.steps for p in train_all) or 1
    terms = sorted({k for p in train_all for k in p.loss_sums})
    total = 0.0
    for term in terms:
        v = sum(p.loss_sums.get(term, 0.0) for p in train_all) / steps
        m[_loss_key(term)] = v
        total += v
    m["loss"] = total
    images = sum(p.images for p in train_all)
    m["images_per_s"] = images / train_time if train_time > 0 else float("nan")
    # The slowest rank's median step: robust to bursts of load on a shared machine.
    m["step_time_s"] = max(p.step_time_s for p in train_all)
    diag = TrainingDiagnostics.combine(p.diag for p in train_all)
    m["train_aic"] = diag["aic"]
    m["train_one_plus_beta_r"] = diag["mean_one_plus_beta_r"]
    m["train_one_plus_beta_c"] = diag["mean_one_plus_beta_c"]
    m["train_n_pos"] = float(diag["n_pos"])
    m["train_mean_score"] = diag["mean_score"]
    m["train_pushed_down_share"] = diag["pushed_down_share"]
    m["train_pushed_down_mean_score"] = diag["pushed_down_mean_score"]
    return m


def epoch_metrics(
    train_all: list[ShardTrainStats],
    dets: list[dict[str, Any]],
    pre_nms: list[dict[str, Any]],
    val_ds: Any,
    is_voc: bool,
    nms_iou: float,
    train_time: float,
) -> dict[str, Any]:
    """Rank 0: the epoch's metrics from every rank's training stats and the gathered detections."""
    from harmonic.analysis import nms_audit
    from harmonic.analysis.suite import detection_metrics

    m = train_metrics(train_all, train_time)
    m.update(detection_metrics(val_ds, dets, is_voc))
    if pre_nms:
        audit = nms_audit(val_ds.coco, pre_nms, nms_iou=nms_iou)
        if _finite(audit.get("rate")):
            m["nms_rate"] = float(audit["rate"])
    return m
