"""One epoch of one worker: the training pass over its shard, the evaluation of its validation
share, and (rank 0) the epoch's metrics from what every rank gathered.

No Ray here: the caller gathers across ranks (``all_gather_object``) and reports.

A training step makes the host wait for the device only where torchvision's losses and torch's
gradient scaler do: each step's loss terms and diagnostics stay on the device, and are read every
:data:`READ_EVERY` steps and at the end of the epoch (:class:`PendingSteps`), when the finite-loss
check, the loss sums and the diagnostics' arithmetic happen, step by step, as if done at each step.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from harmonic.eval.detections import eval_mode, image_id, to_coco_results, to_pre_nms_records
from workers.summary.records import TEST_PREFIX, at_score_thresh  # the metric names' one home (no torch)
from workers.training.errors import NonFiniteLossError
from workers.training.hooks import TrainHooks

if TYPE_CHECKING:
    from workers.spec import Spec
    from workers.training.train_state import TrainParts

__all__ = [
    "TEST_PREFIX",
    "READ_EVERY",
    "FP16_SKIP_LIMIT",
    "PendingSteps",
    "ShardTrainStats",
    "ShardDetections",
    "train_epoch",
    "evaluate_shard",
    "train_metrics",
    "epoch_metrics",
    "held_out_metrics",
]


#: Training steps between two reads of the loss terms and diagnostics kept on the device: a read
#: is one wait for the device; a non-finite loss under float32 or bf16 is raised at the read after it.
READ_EVERY = 50
#: Under fp16, a step whose loss is non-finite is skipped (no optimizer step; the gradient scaler
#: halves its scale) and the training goes on; this many such steps in a row end it. Lowering the
#: scale cannot undo an overflow in the forward pass, but the next batch may not overflow; 16
#: consecutive batches that all overflow (by then the scale has been divided by 2^16, GradScaler's
#: initial scale) say that the weights, not a batch, exceed fp16's range.
FP16_SKIP_LIMIT = 16


@dataclass
class ShardTrainStats:
    """One rank's training epoch: loss sums per term over the steps that counted, those steps,
    images, median step time (data loading included), the training diagnostics' epoch summary, and
    the steps skipped for a non-finite loss under fp16 (their losses and diagnostics not counted)."""

    loss_sums: dict[str, float]
    steps: int
    images: int
    step_time_s: float
    diag: dict[str, Any]
    skipped_steps: int = 0


class PendingSteps:
    """The training steps not read yet: their loss terms and diagnostics, still on the device.

    :meth:`add` queues a step without waiting for the device; :meth:`read` copies every queued step
    to the host at once and folds them in step order: the loss sums are those of adding each step's
    ``float(term)``, the diagnostics those of :meth:`TrainingDiagnostics.update` per step.

    A non-finite loss term raises :class:`NonFiniteLossError` naming its step (the first such step
    read); under fp16 (``fp16_skips``) such a step was skipped instead, its losses and diagnostics
    are left out, and only :data:`FP16_SKIP_LIMIT` of them in a row raise.
    """

    def __init__(self, *, epoch: int, rank: int, fp16_skips: bool) -> None:
        from harmonic.analysis import TrainingDiagnostics

        self.epoch, self.rank, self.fp16_skips = epoch, rank, fp16_skips
        self.diag = TrainingDiagnostics()
        self.loss_sums: dict[str, float] = {}
        self.counted = self.skipped = self.in_a_row = 0
        self._queue: list[tuple[int, tuple[str, ...], Any, dict[str, Any]]] = []

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, global_step: int, losses: Any, loss_dict: dict[str, Any], diag: dict[str, Any]) -> None:
        """Queue a step: ``losses`` is the 1-D stack of ``loss_dict``'s terms (detached, float32 or
        wider), ``diag`` its diagnostics (``{}``: none)."""
        self._queue.append((global_step, tuple(loss_dict), losses, diag))

    def read(self) -> None:
        """Fold every queued step, in order (one wait for the device)."""
        import torch

        if not self._queue:
            return
        queue, self._queue = self._queue, []
        values: list[float] = torch.cat([q[2] for q in queue]).tolist()
        counted_diags: list[dict[str, Any]] = []
        at = 0
        for global_step, names, _, diag in queue:
            terms = list(zip(names, values[at : at + len(names)], strict=True))
            at += len(names)
            bad = next(((n, v) for n, v in terms if not math.isfinite(v)), None)
            if bad is None:
                self.in_a_row = 0
                self.counted += 1
                for name, v in terms:
                    self.loss_sums[name] = self.loss_sums.get(name, 0.0) + v
                if diag:
                    counted_diags.append(diag)
                continue
            if not self.fp16_skips:
                raise NonFiniteLossError(global_step, self.epoch, bad[0], bad[1], self.rank)
            self.skipped += 1
            self.in_a_row += 1
            if self.in_a_row >= FP16_SKIP_LIMIT:
                raise NonFiniteLossError(global_step, self.epoch, bad[0], bad[1], self.rank, self.in_a_row)
        self.diag.update_steps(counted_diags)


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
    pop_diagnostics: Callable[..., dict[str, Any]],
    hooks: TrainHooks | None = None,
    read_every: int = READ_EVERY,
) -> ShardTrainStats:
    """One pass over the shard with ``model`` (DDP-wrapped or not) and ``parts``' optimizer,
    scheduler and scaler; raises :class:`NonFiniteLossError` on a NaN or infinite loss term, at the
    next read of the steps (every ``read_every`` steps, see :class:`PendingSteps`); under fp16 (an
    enabled gradient scaler) the step is skipped instead, up to :data:`FP16_SKIP_LIMIT` in a row.
    ``amp_dtype``: the autocast dtype when ``use_amp`` (None: torch's default for the device).
    ``pop_diagnostics``: :func:`harmonic.detectors.pop_diagnostics` (called with ``to_cpu=False``).
    ``hooks``: the worker's :mod:`workers.training.hooks` (the time a step hook holds the worker is not timed)."""
    import torch

    from harmonic.step import optimizer_step, total_loss

    optimizer, scheduler, scaler = parts.optimizer, parts.scheduler, parts.scaler
    clip_grad_norm = spec.train.clip_grad_norm
    fp16 = scaler.is_enabled()
    pending = PendingSteps(epoch=epoch, rank=rank, fp16_skips=fp16)
    images = 0
    step_times: list[float] = []
    hooks = hooks or TrainHooks()
    on_steps, on_losses = hooks.on_steps, hooks.on_losses
    t_step = time.perf_counter()
    try:
        for step, (imgs, targets) in enumerate(loader):
            if step == 0:
                hooks.phase("first_step")
            # Copies from pinned memory (recipe.Loading on a GPU) overlap; from pageable memory they wait.
            imgs = [im.to(device, non_blocking=True) for im in imgs]
            targets = [
                {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in tg.items()}
                for tg in targets
            ]
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                loss_dict = model(imgs, targets)
            global_step = (epoch - 1) * iters_per_epoch + step
            if on_losses:
                loss_dict = hooks.step_losses(global_step, loss_dict)
            losses = torch.stack([v.detach().float().reshape(()) for v in loss_dict.values()])
            optimizer_step(
                total_loss(loss_dict), optimizer, scheduler=scheduler, scaler=scaler,
                clip_grad_norm=clip_grad_norm, params=model.parameters(), finite=losses,
            )  # fmt: skip
            pending.add(global_step, losses, loss_dict, pop_diagnostics(model, to_cpu=False))
            if len(pending) >= read_every:
                pending.read()
            images += len(imgs)
            now = time.perf_counter()
            step_times.append(now - t_step)  # data loading included, as in images_per_s
            if on_steps and hooks.step_end(epoch, now - t_step, len(imgs), last=step == iters_per_epoch - 1):
                now = time.perf_counter()
            t_step = now
        pending.read()
    except Exception as e:
        # Steps after a non-finite loss train on NaN weights and may fail otherwise: report the cause.
        if not isinstance(e, NonFiniteLossError):
            try:
                pending.read()
            except NonFiniteLossError as cause:
                raise cause from e
        raise
    median = statistics.median(step_times) if step_times else float("nan")
    return ShardTrainStats(
        pending.loss_sums, pending.counted, images, median, pending.diag.epoch_summary(), pending.skipped
    )


def evaluate_shard(
    model: Any,
    loader: Any,
    device: Any,
    label_to_cat_id: Any,
    *,
    with_pre_nms: bool,
    score_thresh: float | None = None,
) -> ShardDetections:
    """This rank's evaluation share: its detections as COCO results, and (if asked) its pre-NMS
    predictions in the form of :func:`harmonic.analysis.nms_audit` (numpy, COCO category ids).
    ``score_thresh``: the detector's score threshold for this pass (None: its own; restored after)."""
    import torch

    from harmonic.detectors import pre_nms_predictions

    dets: list[dict[str, Any]] = []
    pre: list[dict[str, Any]] = []
    with torch.no_grad(), eval_mode(model), _score_thresh(model, score_thresh):
        for imgs, targets in loader:
            imgs = [im.to(device, non_blocking=True) for im in imgs]
            ids = [image_id(tg) for tg in targets]
            dets.extend(to_coco_results(model(imgs), ids, label_to_cat_id))
            if with_pre_nms:
                pre.extend(to_pre_nms_records(pre_nms_predictions(model, imgs), ids, label_to_cat_id))
    return ShardDetections(dets, pre)


@contextmanager
def _score_thresh(model: Any, score_thresh: float | None) -> Iterator[None]:
    """The detector (not DDP-wrapped) at ``score_thresh`` for the block; None: left as it is."""
    if score_thresh is None:
        yield
        return
    # R-CNNs keep their inference settings in the RoI heads, the one-stage detectors in the model
    roi_heads = getattr(model, "roi_heads", None)
    holder = roi_heads if roi_heads is not None else model
    saved = holder.score_thresh
    holder.score_thresh = float(score_thresh)
    try:
        yield
    finally:
        holder.score_thresh = saved


def held_out_metrics(
    test_ds: Any,
    dets: list[dict[str, Any]],
    is_voc: bool,
    score_thresh: float,
    extra_score_thresholds: Sequence[float] = (),
) -> dict[str, Any]:
    """The test split's metrics (``test_AP``, ...) at ``score_thresh``, and at each extra threshold
    ``t`` the same suite named by :func:`workers.summary.records.at_score_thresh` (``test_AP_thr0.001``).

    ``dets``: the test inference run once at the lowest of all the thresholds (the detector's own
    when none is lower); each threshold's metrics come from its :func:`harmonic.analysis.suite.score_cut`.
    """
    from harmonic.analysis.suite import detection_metrics, score_cut

    inferred_at = min((score_thresh, *extra_score_thresholds))
    m: dict[str, Any] = {}
    for t in (score_thresh, *extra_score_thresholds):
        at_t = dets if t == inferred_at else score_cut(dets, t)
        suite = detection_metrics(test_ds, at_t, is_voc, prefix=TEST_PREFIX)
        m.update(suite if t == score_thresh else {at_score_thresh(k, t): v for k, v in suite.items()})
    return m


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _loss_key(term: str) -> str:
    return term if term.startswith("loss") else f"loss_{term}"


def train_metrics(train_all: list[ShardTrainStats], train_time: float) -> dict[str, Any]:
    """The training half of an epoch's metrics, from every rank's stats: the loss terms and their sum,
    throughput, step time, the training-time consistency of the coupled loss (``train_*``) and the
    steps skipped for a non-finite loss under fp16 (``train_skipped_steps``, every rank's)."""
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
    m["train_skipped_steps"] = float(sum(p.skipped_steps for p in train_all))
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
