"""One training run on Ray Train (Train V2): the per-worker loop and the ``TorchTrainer`` around it.

:func:`make_trainer` builds a :class:`HarmonicTrainer` (a ``TorchTrainer``) for a spec; its
``fit()`` trains ``scaling.num_workers`` DDP workers (gloo on CPU, NCCL on GPU), evaluates every
epoch, reports ``ray.train.report(metrics, checkpoint)`` once per epoch and logs to one MLflow
child run. The same trainer is what a Tune trial fits (pass Tune's ``TuneReportCallback`` in
``callbacks``).

Per epoch, the metrics reported (and logged to MLflow at ``step = epoch``) are: ``epoch``,
``loss`` and ``loss_<term>`` for each loss term, ``lr``, the COCO suite (``AP``, ``AP50``,
``AP75``, ``APs``, ``APm``, ``APl``, ``AR100``), ``AP90`` and ``ap_iou_50`` ... ``ap_iou_95``
(the AP-vs-IoU curve), ``voc_AP``... for a VOC dataset, the test-time consistency (``aic``,
``spearman``, ``inconsistent_share``), the training-time consistency (``train_aic``,
``train_one_plus_beta_r``, ``train_one_plus_beta_c``, ``train_n_pos``, and what explains a
Harmonic-loss result: ``train_mean_score`` (mean p of the positives), ``train_pushed_down_share``
(share of positives whose score the loss pushes down, dL/dp > 0, Eq. 7) and
``train_pushed_down_mean_score`` (their mean p)), ``images_per_s``, ``step_time_s`` (median
training step of the slowest rank), ``epoch_time_s``, ``nms_rate`` (final epoch) and ``done``.
Evaluation follows the spec's ``eval`` protocol (score threshold, detections per image, NMS IoU),
the same for every arch. When the dataset has a held-out ``test`` split, the final epoch's model
is also evaluated on it: ``test_AP``, ``test_AP50``, ... ``test_aic``, ``test_ap_iou_<t>`` (the
numbers a comparison is judged on; ``val`` is what a search selects on).

Fault tolerance: each epoch's checkpoint holds the model, optimizer, scheduler, AMP scaler,
epoch and metric history; ``FailureConfig(max_failures)`` restarts the workers from it. MLflow
never gets an epoch twice: a restarted worker skips the epochs the run already has and backfills
those of its checkpoint that it lacks. A non-finite loss is deterministic, so it is not retried.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray.train
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    Result,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from workers import timeline
from workers.errors import NonFiniteLossError
from workers.spec import Spec
from workers.tracking import (
    TrackingContext,
    client,
    find_child_run,
    find_or_create_child_run,
    flatten_params,
    log_dict_artifact,
    log_metrics,
    log_missing_epochs,
    log_params,
    logged_steps,
    run_tags,
)

__all__ = [
    "HarmonicTrainer",
    "make_trainer",
    "train_loop_per_worker",
    "dataset_config",
    "resolve_use_gpu",
    "STATE_FILE",
]

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"
MODEL_INFO_FILE = "model.json"
# Artifact folder of the best checkpoint in the child run (what `hdet predict --run` loads).
BEST_ARTIFACT_DIR = "checkpoint"
# Prefix of the metrics of the held-out test split (final epoch only).
TEST_PREFIX = "test_"
# IoU thresholds of the AP-vs-IoU curve as metric suffixes.
_AP_IOU_KEYS = tuple(range(50, 100, 5))


# --------------------------------------------------------------------------- data


def dataset_config(spec: Spec) -> dict[str, Any]:
    """The ``harmonic.data.build_dataset`` config of a spec's dataset (the synthetic set is generated
    there on first use)."""
    return spec.dataset.build_config()


# --------------------------------------------------------------------------- optimizer and schedule


def build_model(spec: Spec, num_classes: int) -> Any:
    """The spec's detector for ``num_classes`` foreground classes: loss, backbone (pretrained body if
    given), image size and evaluation protocol, then ``detector.init_from`` loaded strictly."""
    from harmonic.detectors import build_detector
    from workers.weights import load_init_from

    d = spec.detector
    model = build_detector(
        d.arch,
        num_classes + 1,
        loss=spec.loss_config(),
        backbone=d.backbone,
        image_size=d.image_size,
        pretrained_backbone=d.pretrained_backbone,
        eval_protocol=spec.eval.to_protocol(),
    )
    load_init_from(model, spec)
    return model


def make_optimizer(model: Any, spec: Spec) -> Any:
    """The spec's optimizer (``train.optimizer``: SGD with momentum, or AdamW) over the trainable parameters."""
    import torch

    t = spec.train
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


class WarmupDecay:
    """LR multiplier per iteration: linear warm-up, then multi-step or cosine decay (picklable)."""

    def __init__(self, spec: Spec, iters_per_epoch: int):
        t = spec.train
        self.iters_per_epoch = max(1, iters_per_epoch)
        self.total = self.iters_per_epoch * t.epochs
        self.warmup_iters = min(t.warmup.iters, self.total)
        self.warmup_factor = t.warmup.factor
        self.schedule = t.schedule
        self.steps = t.resolved_lr_steps()
        self.gamma = t.lr_gamma

    def __call__(self, it: int) -> float:
        f = 1.0
        if it < self.warmup_iters:
            a = it / self.warmup_iters
            f = self.warmup_factor * (1 - a) + a
        if self.schedule == "multistep":
            f *= self.gamma ** bisect.bisect_right(self.steps, it // self.iters_per_epoch)
        elif self.schedule == "cosine":
            f *= 0.5 * (1 + math.cos(math.pi * min(it, self.total) / self.total))
        return f


# --------------------------------------------------------------------------- helpers


def _world() -> tuple[int, int]:
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _loss_key(term: str) -> str:
    return term if term.startswith("loss") else f"loss_{term}"


def _short_term(term: str) -> str:
    return term.removeprefix("loss_")


def _say(line: str) -> None:
    """One line to the job log. Not ``print``: Ray Train patches it to also go through logging, and
    once MLflow has wrapped ``sys.stdout`` every printed line would appear twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_coco_results(
    outputs: list[dict[str, Any]], image_ids: list[int], label_to_cat_id: Any
) -> list[dict[str, Any]]:
    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        for b, s, lab in zip(xywh.tolist(), out["scores"].tolist(), out["labels"].tolist()):
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(label_to_cat_id[int(lab)]),
                    "bbox": b,
                    "score": float(s),
                }
            )
    return results


def _image_id(target: dict[str, Any]) -> int:
    v = target["image_id"]
    return int(v.item() if hasattr(v, "item") else v)


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


# --------------------------------------------------------------------------- worker loop


def _quiet_ray_report_log() -> None:
    """Ray Train logs every report's full metrics dict at INFO from a logger named after its file,
    which ``LoggingConfig`` does not reach; our own per-epoch line says the same, readably."""
    import logging

    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """The training function each Ray Train worker runs (see the module docstring).

    Args:
        config: ``spec`` (the resolved spec dict), ``run_id`` (MLflow child run), ``tracking_uri``,
            ``run_name``, ``resume_from`` (a checkpoint directory used when Ray has none).

    Returns:
        On rank 0, a summary: ``run_id``, ``best`` (metrics of the best epoch), ``history``.
    """
    rank, world = _world()
    if rank == 0:
        timeline.set_key(config.get("run_key") or config["run_name"])
        timeline.mark("worker_start")
    import torch
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    _quiet_ray_report_log()
    from harmonic.data import build_dataset
    from harmonic.data.sampler import GroupedBatchSampler, collate_fn, create_aspect_ratio_groups
    from harmonic.data.transforms import build_transforms
    from harmonic.detectors import pop_diagnostics

    spec = Spec.parse(config["spec"], check_paths=False)
    t = spec.train
    run_name: str = config["run_name"]
    run_id: str = config["run_id"]
    _seed_everything(t.seed + rank)

    device = ray.train.torch.get_device()
    use_amp = (t.amp is True) or (t.amp == "auto" and device.type == "cuda")

    data_cfg = dataset_config(spec)
    skip_bad = spec.dataset.skip_bad
    train_ds: Any = build_dataset(
        data_cfg,
        "train",
        transforms=build_transforms(spec.detector.arch, spec.detector.image_size, True, augment=t.augment),
        skip_bad=skip_bad,
    )
    val_ds: Any = build_dataset(
        data_cfg,
        "val",
        transforms=build_transforms(spec.detector.arch, spec.detector.image_size, False),
        skip_bad=skip_bad,
    )
    test_ds: Any = None
    if spec.dataset.has_test():
        test_ds = build_dataset(
            data_cfg,
            "test",
            transforms=build_transforms(spec.detector.arch, spec.detector.image_size, False),
            skip_bad=skip_bad,
        )
    num_classes = int(train_ds.num_classes)
    if rank == 0:
        timeline.mark("data_ready")

    model = build_model(spec, num_classes)
    # Ray wraps the model in DDP (gloo/NCCL process group set up by the TorchTrainer) and moves it.
    model = ray.train.torch.prepare_model(model)
    if rank == 0:
        timeline.mark("model_ready")
    inner: Any = model.module if hasattr(model, "module") else model

    # Training data: DistributedSampler for the shard, GroupedBatchSampler on top of it so each batch
    # holds images of one aspect-ratio group (torchvision's reference recipe).
    sampler: DistributedSampler[Any] = DistributedSampler(
        train_ds, num_replicas=world, rank=rank, shuffle=True, seed=t.seed
    )
    if t.aspect_ratio_groups > 0:
        group_ids = create_aspect_ratio_groups(train_ds.aspect_ratios(), k=t.aspect_ratio_groups)
        batch_sampler: Any = GroupedBatchSampler(sampler, group_ids, t.batch_size)
    else:
        batch_sampler = torch.utils.data.BatchSampler(sampler, t.batch_size, drop_last=True)
    train_loader = DataLoader(
        train_ds, batch_sampler=batch_sampler, num_workers=t.data_workers, collate_fn=collate_fn,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    # Validation: each rank evaluates every world-th image; rank 0 gathers the detections.
    val_loader = DataLoader(
        Subset(val_ds, list(range(rank, len(val_ds), world))), batch_size=t.batch_size, shuffle=False,
        num_workers=t.data_workers, collate_fn=collate_fn,
    )  # fmt: skip
    test_loader = None if test_ds is None else DataLoader(
        Subset(test_ds, list(range(rank, len(test_ds), world))), batch_size=t.batch_size, shuffle=False,
        num_workers=t.data_workers, collate_fn=collate_fn,
    )  # fmt: skip

    optimizer = make_optimizer(model, spec)
    iters_per_epoch = len(batch_sampler)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(spec, iters_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)

    start_epoch, history, best = 0, [], {"AP": -math.inf, "epoch": 0}
    checkpoint = ray.train.get_checkpoint()
    resume_dir = config.get("resume_from")
    ckpt_ctx = checkpoint.as_directory() if checkpoint else (_plain_dir(resume_dir) if resume_dir else None)
    if ckpt_ctx is not None:
        with ckpt_ctx as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
        inner.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, history, best = int(state["epoch"]), list(state["history"]), dict(state["best"])

    # Rank 0's MLflow start-up (importing MLflow, opening the store, the start record; for a trial
    # also its child run: 2-3 s). A trial's runs it in a thread beside the first training steps, as
    # a trial's start cost is what a search pays per configuration; a run that fails within its
    # first seconds may then end before its start record (`hdet.starts`) is written.
    mlf_start = None
    if rank == 0:
        background = not config["run_id"]  # the trainer left the child run to this worker: a trial
        mlf_start = _start_tracking(config, spec, str(device), start_epoch, list(history), background)
    mlf: Any = None
    try:
        label_to_cat_id = val_ds.label_to_cat_id
        is_voc = spec.dataset.format == "voc"
        epoch_times: list[float] = []
        summary: dict[str, Any] = {}
        for epoch in range(start_epoch + 1, t.epochs + 1):
            t0 = time.perf_counter()
            sampler.set_epoch(epoch)
            model.train()
            train = _train_one_epoch(
                model, train_loader, optimizer, scheduler, scaler, device, spec, epoch, rank, iters_per_epoch, use_amp,
                pop_diagnostics,
            )  # fmt: skip
            t1 = time.perf_counter()
            final = epoch == t.epochs
            dets, pre_nms = _evaluate_shard(inner, val_loader, device, label_to_cat_id, with_pre_nms=final)
            all_dets = [d for part in _all_gather(dets) for d in part]
            all_pre = [d for part in _all_gather(pre_nms) for d in part] if final else []
            train_all = _all_gather(train)
            test_dets: list[dict[str, Any]] = []
            if final and test_loader is not None:
                part, _ = _evaluate_shard(inner, test_loader, device, label_to_cat_id, with_pre_nms=False)
                test_dets = [d for p in _all_gather(part) for d in p]
            metrics: dict[str, Any] = {}
            if rank == 0:
                metrics = _epoch_metrics(train_all, all_dets, all_pre, val_ds, is_voc, t.nms_iou, t1 - t0)
                if final and test_ds is not None:
                    metrics.update(_detection_metrics(test_ds, test_dets, is_voc, prefix=TEST_PREFIX))
            epoch_time = time.perf_counter() - t0
            epoch_times.append(epoch_time)
            eta = (sum(epoch_times) / len(epoch_times)) * (t.epochs - epoch)
            metrics.update(
                epoch=epoch, done=final, lr=optimizer.param_groups[0]["lr"], epoch_time_s=epoch_time
            )

            improved = rank == 0 and metrics.get("AP", -1.0) > best["AP"]
            if improved:
                best = {"AP": float(metrics["AP"]), "epoch": epoch}
            if rank == 0:
                history.append({k: v for k, v in metrics.items() if isinstance(v, int | float | bool)})
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    torch.save(
                        {
                            "model": inner.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                            "history": history, "best": best, "spec": spec.to_dict(),
                        },
                        Path(tmp) / STATE_FILE,
                    )  # fmt: skip
                    ckpt = Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{epoch:04d}")

            if mlf_start is not None and mlf is None:
                mlf, run_id = mlf_start.result()  # raises what the start-up raised
            if mlf is not None:
                if epoch not in logged_steps(mlf, run_id):
                    log_metrics(mlf, run_id, metrics, step=epoch)
                if improved:
                    _log_best_model(mlf, run_id, inner, spec, train_ds, metrics)
                _say(_progress_line(run_name, metrics, t.epochs, eta))
                if final:
                    summary = {
                        "run_id": run_id,
                        "best": dict(best),
                        "history": history,
                        "torch_threads": torch.get_num_threads(),
                    }
                    _log_final_artifacts(mlf, run_id, run_name, history, all_dets, val_ds, train_all)
        if mlf_start is not None:
            mlf, run_id = mlf_start.result()
        if rank == 0 and not summary:  # resumed after the last epoch: nothing left to train
            summary = {
                "run_id": run_id,
                "best": dict(best),
                "history": history,
                "torch_threads": torch.get_num_threads(),
            }
    except BaseException:
        # Let rank 0's MLflow start-up finish before the error leaves this worker: written after
        # it, the trial's record of the failure would be overwritten.
        if mlf_start is not None:
            futures_wait([mlf_start], timeout=60)
        raise
    return summary if rank == 0 else None


@contextmanager
def _plain_dir(path: str) -> Iterator[str]:
    yield path


def _train_one_epoch(
    model: Any,
    loader: Any,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    device: Any,
    spec: Spec,
    epoch: int,
    rank: int,
    iters_per_epoch: int,
    use_amp: bool,
    pop_diagnostics: Callable[[Any], dict[str, Any]],
) -> dict[str, Any]:
    """One pass over the shard; returns loss sums, image count, timing and training diagnostics."""
    import torch

    from harmonic.analysis import TrainingDiagnostics

    t = spec.train
    dbg = t.debug
    diag = TrainingDiagnostics()
    sums: dict[str, float] = {}
    steps = images = 0
    step_times: list[float] = []
    t_step = time.perf_counter()
    for step, (imgs, targets) in enumerate(loader):
        if dbg.crash_rank == rank and epoch == dbg.crash_after_epoch + 1 and step == 0 and dbg.crash_marker:
            marker = Path(dbg.crash_marker)
            if not marker.exists():
                marker.write_text(f"rank {rank} exited at epoch {epoch}\n")
                # Let the controller collect the last report first: it polls the workers every 2 s,
                # and a report still waiting in a dead worker is lost (the run would then resume from
                # the checkpoint before it, which is correct but not what this option is for).
                time.sleep(5.0)
                _say(f"[debug] rank {rank} exits on purpose (train.debug.crash_rank)")
                os._exit(1)
        if rank == 0 and step == 0:
            timeline.mark("first_step")  # (the first step of every epoch: the reader keeps the first)
        imgs = [im.to(device, non_blocking=True) for im in imgs]
        targets = [{k: (v.to(device) if hasattr(v, "to") else v) for k, v in tg.items()} for tg in targets]
        with torch.autocast(device_type=device.type, enabled=use_amp):
            loss_dict = model(imgs, targets)
        global_step = (epoch - 1) * iters_per_epoch + step
        if dbg.nonfinite_step == global_step:
            first = sorted(loss_dict)[0]
            loss_dict = {**loss_dict, first: loss_dict[first] * float("inf")}
        for name, value in loss_dict.items():
            if not torch.isfinite(value).all():
                raise NonFiniteLossError(global_step, epoch, name, float(value.detach().float().sum()), rank)
        loss = sum(loss_dict.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if t.clip_grad_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
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
        t_step = now
    median = statistics.median(step_times) if step_times else float("nan")
    return {
        "loss_sums": sums,
        "steps": steps,
        "images": images,
        "step_time_s": median,
        "diag": diag.epoch_summary(),
    }


def _evaluate_shard(
    model: Any, loader: Any, device: Any, label_to_cat_id: Any, *, with_pre_nms: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """This rank's validation shard: its detections as COCO results, and (if asked) its pre-NMS
    predictions in the form of :func:`harmonic.analysis.nms_audit` (numpy, COCO category ids)."""
    import numpy as np
    import torch

    from harmonic.detectors import pre_nms_predictions

    dets: list[dict[str, Any]] = []
    pre: list[dict[str, Any]] = []
    with torch.no_grad(), _eval_mode(model):
        for imgs, targets in loader:
            imgs = [im.to(device) for im in imgs]
            ids = [_image_id(tg) for tg in targets]
            dets.extend(_to_coco_results(model(imgs), ids, label_to_cat_id))
            if with_pre_nms:
                for out, image_id in zip(pre_nms_predictions(model, imgs), ids):
                    labels = out["labels"].cpu().tolist()
                    pre.append(
                        {
                            "image_id": image_id,
                            "boxes": out["boxes"].detach().float().cpu().numpy(),
                            "scores": out["scores"].detach().float().cpu().numpy(),
                            "labels": np.asarray(
                                [label_to_cat_id[int(lab)] for lab in labels], dtype=np.int64
                            ),
                        }
                    )
    return dets, pre


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _epoch_metrics(
    train_all: list[dict[str, Any]],
    dets: list[dict[str, Any]],
    pre_nms: list[dict[str, Any]],
    val_ds: Any,
    is_voc: bool,
    nms_iou: float,
    train_time: float,
) -> dict[str, Any]:
    """Rank 0: the epoch's metrics from every rank's training sums and the gathered detections."""
    from harmonic.analysis import TrainingDiagnostics, nms_audit

    m: dict[str, Any] = {}
    steps = sum(p["steps"] for p in train_all) or 1
    terms = sorted({k for p in train_all for k in p["loss_sums"]})
    total = 0.0
    for term in terms:
        v = sum(p["loss_sums"].get(term, 0.0) for p in train_all) / steps
        m[_loss_key(term)] = v
        total += v
    m["loss"] = total
    images = sum(p["images"] for p in train_all)
    m["images_per_s"] = images / train_time if train_time > 0 else float("nan")
    # The slowest rank's median step: robust to bursts of load on a shared machine.
    m["step_time_s"] = max(p["step_time_s"] for p in train_all)
    diag = TrainingDiagnostics.combine(p["diag"] for p in train_all)
    m["train_aic"] = diag["aic"]
    m["train_one_plus_beta_r"] = diag["mean_one_plus_beta_r"]
    m["train_one_plus_beta_c"] = diag["mean_one_plus_beta_c"]
    m["train_n_pos"] = float(diag["n_pos"])
    m["train_mean_score"] = diag["mean_score"]
    m["train_pushed_down_share"] = diag["pushed_down_share"]
    m["train_pushed_down_mean_score"] = diag["pushed_down_mean_score"]

    m.update(_detection_metrics(val_ds, dets, is_voc))
    if pre_nms:
        audit = nms_audit(val_ds.coco, pre_nms, nms_iou=nms_iou)
        if _finite(audit.get("rate")):
            m["nms_rate"] = float(audit["rate"])
    return m


def _detection_metrics(ds: Any, dets: list[dict[str, Any]], is_voc: bool, prefix: str = "") -> dict[str, Any]:
    """COCO suite, AP90 and the AP-vs-IoU curve, VOC AP (VOC sets) and test-time consistency of
    ``dets`` on ``ds``, with ``prefix`` before every key (``test_`` for the held-out split)."""
    from harmonic.analysis import consistency_report
    from harmonic.eval import evaluate, evaluate_voc

    m: dict[str, Any] = {}
    gt = ds.coco
    res = evaluate(gt, dets)
    for k, v in res.stats.items():
        m[k] = float(v)
    curve = {round(float(k) * 100): float(v) for k, v in res.ap_vs_iou.items()}
    for t in _AP_IOU_KEYS:
        if t in curve:
            m[f"ap_iou_{t}"] = curve[t]
    m["AP90"] = curve.get(90, float("nan"))
    if is_voc:
        for k, v in evaluate_voc(ds.to_coco(), dets).items():
            m[f"voc_{k}"] = float(v)
    cons = consistency_report(gt, dets)
    for k in ("aic", "spearman", "inconsistent_share"):
        if k in cons and _finite(cons[k]):
            m[k] = float(cons[k])
    return {f"{prefix}{k}": v for k, v in m.items()}


def _progress_line(run_name: str, m: dict[str, Any], epochs: int, eta: float) -> str:
    terms = " ".join(f"{_short_term(k)} {v:.3f}" for k, v in m.items() if k.startswith("loss_"))
    ap = m.get("AP", float("nan")) * 100
    ap50 = m.get("AP50", float("nan")) * 100
    return (
        f"[{run_name}] epoch {m['epoch']}/{epochs}  loss {m.get('loss', float('nan')):.3f} ({terms})  "
        f"AP {ap:.1f} AP50 {ap50:.1f} AIC {m.get('aic', float('nan')):.3f}  "
        f"{m.get('images_per_s', float('nan')):.1f} img/s  epoch {_fmt_s(m['epoch_time_s'])}  ETA {_fmt_s(eta)}"
    )


# --------------------------------------------------------------------------- MLflow from rank 0


def _start_tracking(
    config: dict[str, Any],
    spec: Spec,
    device: str,
    start_epoch: int,
    history: list[dict[str, Any]],
    background: bool,
) -> Future[tuple[Any, str]]:
    """Open the MLflow client, find or create the child run when the trainer left it to the worker
    (:func:`prepare_child_run`), and record the run's start (:func:`_on_start`); in a thread if
    ``background``, else before returning.

    Returns:
        A future of ``(client, run id)``.
    """
    from concurrent.futures import ThreadPoolExecutor

    def start() -> tuple[Any, str]:
        mlf = client(config["tracking_uri"])
        run_id = config["run_id"] or prepare_child_run(
            config["tracking"], spec, run_key=config["run_key"], run_name=config["run_name"],
            tags=config.get("run_tags") or {},
        )  # fmt: skip
        _on_start(mlf, run_id, spec, device, start_epoch, history)
        return mlf, run_id

    if not background:
        done: Future[tuple[Any, str]] = Future()
        done.set_result(start())
        return done
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hdet-mlflow-start")
    future = pool.submit(start)
    pool.shutdown(wait=False)
    return future


def _on_start(
    mlf: Any, run_id: str, spec: Spec, device: str, start_epoch: int, history: list[dict[str, Any]]
) -> None:
    from workers.env import environment

    run = mlf.get_run(run_id)
    starts = int(run.data.tags.get("hdet.starts", "0")) + 1
    mlf.set_tag(run_id, "hdet.starts", str(starts))
    if start_epoch:
        mlf.set_tag(run_id, "hdet.resumed_from_epoch", str(start_epoch))
        _say(f"resuming {run.info.run_name} from its epoch {start_epoch} checkpoint (start #{starts})")
    log_dict_artifact(mlf, run_id, environment(device), f"environment/start_{starts}.json")
    # Epochs the checkpoint has but MLflow lacks (the worker died between report and logging).
    log_missing_epochs(mlf, run_id, {int(h["epoch"]): h for h in history})


def _model_info(spec: Spec, train_ds: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "arch": spec.detector.arch,
        "num_classes": int(train_ds.num_classes) + 1,
        "backbone": spec.detector.backbone,
        "image_size": spec.detector.image_size,
        "categories": list(train_ds.categories),
        "label_to_cat_id": {str(k): int(v) for k, v in dict(train_ds.label_to_cat_id).items()},
        "loss": spec.loss.kind,
        "epoch": int(metrics["epoch"]),
        "AP": float(metrics.get("AP", float("nan"))),
    }


def _log_best_model(
    mlf: Any, run_id: str, model: Any, spec: Spec, train_ds: Any, metrics: dict[str, Any]
) -> None:
    """The best epoch's weights as a plain torchvision ``state_dict`` plus a JSON describing the model."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model.state_dict(), Path(tmp) / MODEL_FILE)
        (Path(tmp) / MODEL_INFO_FILE).write_text(json.dumps(_model_info(spec, train_ds, metrics), indent=2))
        mlf.log_artifacts(run_id, tmp, artifact_path=BEST_ARTIFACT_DIR)


def _log_final_artifacts(
    mlf: Any,
    run_id: str,
    run_name: str,
    history: list[dict[str, Any]],
    dets: list[dict[str, Any]],
    val_ds: Any,
    train_all: list[dict[str, Any]],
) -> None:
    from harmonic import plots
    from harmonic.analysis import TrainingDiagnostics, match_detections

    last = history[-1]
    curve = {t / 100: last[f"ap_iou_{t}"] for t in _AP_IOU_KEYS if f"ap_iou_{t}" in last}
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
        diag = TrainingDiagnostics.combine(p["diag"] for p in train_all)
        plots.plot_iou_histogram(diag["iou_hist"], out / "iou_histogram.png", counts=True)
        (out / "ap_vs_iou.json").write_text(json.dumps(curve, indent=2))
        (out / "history.json").write_text(json.dumps(history, indent=2))
        mlf.log_artifacts(run_id, tmp, artifact_path="plots")


# --------------------------------------------------------------------------- driver side


def resolve_use_gpu(spec: Spec) -> bool:
    """``scaling.use_gpu``; ``auto`` means: the Ray cluster has GPUs."""
    if spec.scaling.use_gpu != "auto":
        return bool(spec.scaling.use_gpu)
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


class HarmonicTrainer(TorchTrainer):
    """A ``TorchTrainer`` that closes its MLflow child run, does not retry deterministic errors,
    and can be aborted from another thread.

    ``fit()`` is ``TorchTrainer.fit()`` with these changes:

    * a worker that raised a :class:`~workers.errors.DeterministicTrainingError` (e.g.
      :class:`NonFiniteLossError`), or an invalid spec, dataset or loss option, fails the run at
      once, whatever ``FailureConfig(max_failures)`` says, since a retry from the last checkpoint
      would only hit it again; the error is raised as itself. Other errors are retried as
      configured (:class:`workers.controller_hooks.NoRetryOnDeterministic`).
    * :meth:`abort` stops the run from another thread (a Tune trial that the scheduler stopped
      aborts its trainers this way; Ray Train itself only aborts on Ctrl-C in the main thread).
    * the controller is started without the Ray Data helpers when the run has no Ray datasets
      (this package feeds its workers with torch data loaders): one process less per run.
    """

    mlflow_run_id: str = ""
    tracking: TrackingContext | None = None
    #: (spec, run key, run name, tags) of the child run, for :meth:`child_run_id`.
    child_run: tuple[Spec, str, str, dict[str, str]] | None = None
    _controller: Any = None
    _aborted: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from workers.controller_hooks import TorchBackendConfig

        super().__init__(*args, **kwargs)
        # The same process group, set up by a controller that does not import torch for it.
        light = TorchBackendConfig.of(self.backend_config)  # type: ignore[has-type]
        self.backend_config = light
        object.__setattr__(self.train_run_context, "backend_config", light)  # (a frozen dataclass)

    def controller_init_kwargs(self) -> dict[str, Any]:
        """What the Train controller is created with, but the training function (its object ref).

        All of it is unpickled in the controller process before it can start the workers; a test
        checks that this imports neither torch nor MLflow nor this module.
        """
        from ray.train.v2._internal.execution.scaling_policy import create_scaling_policy

        from workers.controller_hooks import NoRetryOnDeterministic

        return {
            "scaling_policy": create_scaling_policy(self.scaling_config),
            "failure_policy": NoRetryOnDeterministic(self.run_config.failure_config),
            "train_run_context": self.train_run_context,
            "callbacks": self._create_default_callbacks(),
            "validation_config": self.validation_config,
        }

    def fit(self) -> Result:
        from ray.train.v2._internal.util import ObjectRefWrapper

        from workers.controller_hooks import deterministic_cause

        try:
            if self.running_in_local_mode:
                result = self._initialize_and_run_local_controller(self._get_train_func())
            else:
                result = self._initialize_and_run_controller(
                    train_fn_ref=ObjectRefWrapper(self._get_train_func()), **self.controller_init_kwargs()
                )
            if result.error:
                raise result.error
        except BaseException as e:
            if self._aborted:
                self.close_mlflow_run("KILLED")
                raise
            cause = deterministic_cause(e)
            self.close_mlflow_run("FAILED", str(cause or e))
            if cause is not None:
                raise cause from e
            raise
        self.close_mlflow_run("FINISHED")
        return result

    def _initialize_and_run_controller(self, **controller_init_kwargs: Any) -> Result:
        # TorchTrainer's own, keeping the controller's handle for abort().
        import ray
        from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
        from ray.train.v2._internal.constants import (
            DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
            get_env_vars_to_propagate,
        )
        from ray.train.v2._internal.execution.controller import TrainController

        env_vars = get_env_vars_to_propagate()
        env_vars.setdefault(
            RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE
        )
        controller_cls = ray.remote(
            num_cpus=0,
            # on the node of the caller, as Ray Train does
            label_selector={ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()},
            runtime_env={"env_vars": env_vars},
        )(TrainController)
        if self._aborted:
            raise RuntimeError("aborted before it started")
        self._controller = controller_cls.remote(**controller_init_kwargs)
        if self._aborted:  # abort() ran between the check and the assignment
            self.abort_async()
        ray.get(self._controller.run.remote())
        return ray.get(self._controller.get_result.remote())

    def abort_async(self) -> Any:
        """Ask the run to stop: its workers exit and ``fit()`` raises in the thread that called it
        (the MLflow child run is closed as ``KILLED``).

        Returns:
            An ``ObjectRef`` that is ready once the controller has stopped the workers (an actor
            error when it is fetched means the same), or None when the controller had not started.
        """
        self._aborted = True
        controller = self._controller
        return None if controller is None else controller.abort.remote()

    def abort(self, timeout_s: float = 10.0) -> None:
        """:meth:`abort_async`, waiting up to ``timeout_s`` for the workers to be gone."""
        import ray

        ref = self.abort_async()
        if ref is not None:
            ray.wait([ref], timeout=timeout_s)

    def _create_default_callbacks(self) -> list[Any]:
        from ray._private.worker import get_dashboard_url
        from ray.train.v2._internal.callbacks import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

        from workers.env import NO_STATE_API_ENV

        callbacks = super()._create_default_callbacks()
        if os.environ.get(NO_STATE_API_ENV) == "1" or not get_dashboard_url():
            # The placement-group cleaner polls the state API, which the dashboard serves: without a
            # dashboard (a local Ray started without one) it can only log a warning every 2 s.
            callbacks = [cb for cb in callbacks if not isinstance(cb, PlacementGroupCleanerCallback)]
        if not self.datasets:
            # It would start a DatasetManager actor (a process importing Ray Data) for nothing.
            callbacks = [cb for cb in callbacks if not isinstance(cb, DatasetsCallback)]
        return callbacks

    def child_run_id(self) -> str:
        """The MLflow child run; found (or, if its worker never got to it, created) by its key
        when :func:`make_trainer` left it to the worker. Finding it changes nothing on it."""
        if not self.mlflow_run_id and self.tracking is not None and self.child_run is not None:
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
        if self.tracking is None or not self.child_run_id():
            return
        c = client(self.tracking.tracking_uri)
        if error:
            c.set_tag(self.mlflow_run_id, "hdet.error", error[:4000])
        c.set_terminated(self.mlflow_run_id, status=status)


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

    all_tags = {**run_tags(spec, "child"), "hdet.run_name": run_name, **(tags or {})}
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


def make_trainer(
    spec: Spec,
    *,
    run_name: str,
    storage_path: str,
    tracking: TrackingContext,
    callbacks: list[Any] | None = None,
    resume_from: str | None = None,
    run_key: str | None = None,
    tags: dict[str, str] | None = None,
    defer_run: bool = False,
) -> HarmonicTrainer:
    """Build the trainer of one training run of ``spec``, with its MLflow child run.

    Args:
        spec: the (trial's) spec; ``scaling`` gives the workers and their resources.
        run_name: Ray Train run name (its folder under ``storage_path``; the same name resumes the
            run from its latest checkpoint) and the MLflow child run's display name.
        storage_path: Ray Train storage (a local folder, or shared storage on a cluster).
        tracking: the experiment's tracking context (parent run).
        callbacks: ``ray.train.UserCallback`` instances, e.g. Tune's ``TuneReportCallback``.
        resume_from: a checkpoint directory to start from when the run has no checkpoint of its own.
        run_key: key that identifies the MLflow child run across retries (default ``run_name``).
        tags: extra tags of the child run.
        defer_run: leave the child run (:func:`prepare_child_run`) to the rank-0 worker, which
            does it in a thread beside its first training steps: this function then makes no
            MLflow call, and the trainer's controller starts at once (a Tune trial's start is
            about 1.5 s shorter). ``mlflow_run_id`` is then empty; :meth:`HarmonicTrainer.child_run_id`
            finds the run.

    Returns:
        A :class:`HarmonicTrainer`; its ``mlflow_run_id`` is the child run (unless ``defer_run``).
    """
    if spec.dataset.format == "synthetic" and spec.dataset.root is None:
        # Workers run in their own folders (and maybe other machines): pin the generated set's path.
        spec = spec.with_overrides({"dataset.root": spec.dataset.resolved_root()})
    use_gpu = resolve_use_gpu(spec)
    s = spec.scaling
    resources: dict[str, float] = {"CPU": s.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = s.gpus_per_worker
    key = run_key or run_name
    run_id = "" if defer_run else prepare_child_run(tracking, spec, run_key=key, run_name=run_name, tags=tags)

    trainer = HarmonicTrainer(
        train_loop_per_worker,
        train_loop_config={
            "spec": spec.to_dict(),
            "run_id": run_id,
            "run_name": run_name,
            "run_key": key,
            "run_tags": dict(tags or {}),
            "tracking": tracking,
            "tracking_uri": tracking.tracking_uri,
            "resume_from": resume_from,
        },
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            accelerator_type=s.accelerator_type,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks or []),
            # Ray Train's own INFO lines (every report's full metrics dict) drown the progress lines.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    trainer.mlflow_run_id = run_id
    trainer.tracking = tracking
    trainer.child_run = (spec, key, run_name, dict(tags or {}))
    return trainer
