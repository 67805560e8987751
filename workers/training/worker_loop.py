"""The training function each Ray Train worker runs: its epoch loop, evaluation, reports,
checkpoints and progress lines. Whatever else acts inside the loop (benchmarks, the tests' fault
injection) does it through the worker's hooks (:mod:`workers.training.hooks`).

Per epoch, the metrics reported (and logged to MLflow at ``step = epoch``) are: ``epoch``,
``loss`` and ``loss_<term>`` for each loss term, ``lr``, the COCO suite (``AP``, ``AP50``,
``AP75``, ``APs``, ``APm``, ``APl``, ``AR100``), ``AP90`` and ``ap_iou_50`` ... ``ap_iou_95``
(the AP-vs-IoU curve), ``voc_AP``... for a VOC dataset, the test-time consistency (``aic``,
``spearman``, ``inconsistent_share``), the training-time consistency (``train_aic``,
``train_one_plus_beta_r``, ``train_one_plus_beta_c``, ``train_n_pos``, and what explains a
Harmonic-loss result: ``train_mean_score`` (mean p of the positives), ``train_pushed_down_share``
(share of positives whose score the loss pushes down, dL/dp > 0, Eq. 7) and
``train_pushed_down_mean_score`` (their mean p)), ``train_skipped_steps`` (steps skipped for a
non-finite loss under fp16), ``images_per_s``, ``step_time_s`` (median training step of the
slowest rank), ``epoch_time_s``, ``nms_rate`` (final epoch) and ``done``.
Evaluation follows the spec's ``eval`` protocol (score threshold, detections per image, NMS IoU),
the same for every arch. When the dataset has a held-out ``test`` split, the final epoch's model
is also evaluated on it: ``test_AP``, ``test_AP50``, ... ``test_aic``, ``test_ap_iou_<t>`` (the
numbers a comparison is judged on; ``val`` is what a search selects on), and the same suite at each
of ``eval.extra_score_thresholds`` as ``test_<m>_thr<t>`` (e.g. ``test_AP_thr0.001``), from the same
inference (:func:`workers.training.epoch_metrics.held_out_metrics`).

Fault tolerance: each epoch's checkpoint holds the train state (:mod:`workers.training.train_state`); a
restarted worker resumes from it. MLflow never gets an epoch twice: a restarted worker skips the
epochs the run already has and backfills those of its checkpoint that it lacks.
"""

from __future__ import annotations

import sys
import tempfile
import time
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, NamedTuple

import ray.train
import ray.train.torch
from ray.train import Checkpoint

from workers import ray_compat
from workers.spec import Spec
from workers.tracking import log_metrics, logged_steps
from workers.training import hooks as train_hooks
from workers.training import recipe
from workers.training.epoch_metrics import epoch_metrics, evaluate_shard, held_out_metrics, train_epoch
from workers.training.run_tracking import (
    ChildRun,
    TrackedRun,
    log_best_model,
    log_final_artifacts,
    start_tracking,
)
from workers.training.train_state import (
    Progress,
    TrainParts,
    checkpoint_dir,
    load_train_state,
    save_train_state,
)

__all__ = [
    "train_loop_per_worker",
    "run_training",
    "loop_config",
    "say",
    "Shard",
    "RayTrainSession",
    "worker_device",
]


class Shard(NamedTuple):
    """This worker's place in the worker group."""

    rank: int
    world: int


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def worker_device(use_gpu: Any, cuda_device: Any = None) -> Any:
    """This worker's torch device: the GPU Ray assigned it (``cuda_device()``, default the first
    visible one), or the CPU; a mismatch between ``use_gpu`` (resolved by the driver; ``auto`` here
    means: whatever Ray assigned) and what the worker has is refused
    (:func:`workers.training.recipe.worker_device_type`)."""
    import torch

    gpu_ids = ray.get_gpu_ids()
    wanted = bool(gpu_ids) if use_gpu == "auto" else bool(use_gpu)
    if recipe.worker_device_type(wanted, gpu_ids, torch.cuda.is_available()) == "cuda":
        return cuda_device() if cuda_device is not None else torch.device("cuda", 0)
    return torch.device("cpu")


class RayTrainSession:
    """What the loop asks of the process that runs it, on a Ray Train worker: its rank, device,
    DDP wrapping, the checkpoint to resume from, and each epoch's report and checkpoint.
    (:class:`workers.training.pooled.PooledSession` is the same for a pooled training.)"""

    def shard(self) -> Shard:
        ctx = ray.train.get_context()
        return Shard(ctx.get_world_rank(), ctx.get_world_size())

    def device(self, use_gpu: Any) -> Any:
        return worker_device(use_gpu, ray.train.torch.get_device)

    def prepare_model(self, model: Any, device: Any) -> Any:
        # DDP over the process group set up by the TorchTrainer (gloo/NCCL), on ``device``.
        return ray.train.torch.prepare_model(model, move_to_device=device)

    def resume_dir(self, resume_from: str | None) -> AbstractContextManager[str] | None:
        return checkpoint_dir(ray.train.get_checkpoint(), resume_from)

    def report(self, metrics: dict[str, Any], directory: str | None, epoch: int) -> None:
        ckpt = Checkpoint.from_directory(directory) if directory is not None else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{epoch:04d}")


def say(line: str) -> None:
    """One line to the job log. Not ``print``: Ray Train patches it to also go through logging, and
    once MLflow has wrapped ``sys.stdout`` every printed line would appear twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _progress_line(run_name: str, m: dict[str, Any], epochs: int, eta: float) -> str:
    terms = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in m.items() if k.startswith("loss_"))
    ap = m.get("AP", float("nan")) * 100
    ap50 = m.get("AP50", float("nan")) * 100
    return (
        f"[{run_name}] epoch {m['epoch']}/{epochs}  loss {m.get('loss', float('nan')):.3f} ({terms})  "
        f"AP {ap:.1f} AP50 {ap50:.1f} AIC {m.get('aic', float('nan')):.3f}  "
        f"{m.get('images_per_s', float('nan')):.1f} img/s  epoch {_fmt_s(m['epoch_time_s'])}  ETA {_fmt_s(eta)}"
    )


def _summary(run_id: str, progress: Progress) -> dict[str, Any]:
    import torch

    return {
        "run_id": run_id,
        "best": dict(progress.best),
        "history": progress.history,
        "torch_threads": torch.get_num_threads(),
    }


def loop_config(
    spec: Spec, *, run_id: str, run_name: str, run_key: str, tags: dict[str, str] | None, tracking: Any,
    resume_from: str | None, use_gpu: bool,
) -> dict[str, Any]:  # fmt: skip
    """The config :func:`run_training` takes (its Args), for a training of ``spec``."""
    return {
        "spec": spec.to_dict(),
        "run_id": run_id,
        "run_name": run_name,
        "run_key": run_key,
        "run_tags": dict(tags or {}),
        "tracking": tracking,
        "resume_from": resume_from,
        "use_gpu": use_gpu,
    }


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """The training function each Ray Train worker runs: :func:`run_training` on Ray Train."""
    return run_training(config, RayTrainSession())


def run_training(config: dict[str, Any], session: Any) -> dict[str, Any] | None:
    """One training's loop (see the module docstring), on a Ray Train worker or a pooled one.

    Args:
        config: ``spec`` (the resolved spec dict), ``run_id`` (MLflow child run; empty when the
            trainer left it to rank 0), ``run_name``, ``run_key``, ``run_tags``, ``tracking``,
            ``resume_from`` (a checkpoint directory used when Ray has none), ``use_gpu`` (the
            driver's resolved ``scaling.use_gpu``, checked against the worker's device).
        session: where the loop runs: :class:`RayTrainSession` or
            :class:`workers.training.pooled.PooledSession`.

    Returns:
        On rank 0, a summary: ``run_id``, ``best`` (metrics of the best epoch), ``history``.
    """
    rank, world = session.shard()
    hooks = train_hooks.load(config.get("run_key") or config["run_name"], rank)
    hooks.phase("worker_start")
    ray_compat.quiet_train_report_log()  # our progress line says the same, readably
    from harmonic.detectors import pop_diagnostics

    spec = Spec.parse(config["spec"], check_paths=False)
    t = spec.train
    run_name: str = config["run_name"]
    recipe.seed_everything(t.seed + rank)

    device = session.device(config.get("use_gpu", spec.scaling.use_gpu))
    amp_dtype = recipe.amp_dtype(spec, device.type)
    data = recipe.build_datasets(spec)
    hooks.phase("data_ready")

    model = recipe.build_model(spec, data.num_classes)
    model = session.prepare_model(model, device)
    hooks.phase("model_ready")
    inner: Any = model.module if hasattr(model, "module") else model

    # Built once per training: their loader processes (if any) serve every epoch.
    io = recipe.loading(spec, device.type)
    train = recipe.train_loader(
        data.train, batch_size=t.batch_size, aspect_ratio_groups=t.aspect_ratio_groups, seed=t.seed,
        data_workers=io.data_workers, rank=rank, world=world, pin_memory=io.pin_memory,
        resample=t.resample, resample_fraction=t.resample_fraction,
    )  # fmt: skip
    # Validation: each rank evaluates every world-th image; rank 0 gathers the detections.
    val_loader = recipe.eval_loader(
        data.val, batch_size=t.batch_size, data_workers=io.data_workers, rank=rank, world=world,
        pin_memory=io.pin_memory,
    )  # fmt: skip
    test_loader = None if data.test is None else recipe.eval_loader(
        data.test, batch_size=t.batch_size, data_workers=io.data_workers, rank=rank, world=world,
        pin_memory=io.pin_memory, persistent=False,  # used once, after the last epoch
    )  # fmt: skip

    optimizer = recipe.make_optimizer(model, spec)
    scheduler = recipe.make_scheduler(optimizer, spec, train.iters_per_epoch)
    scaler = recipe.grad_scaler(device.type, amp_dtype)
    parts = TrainParts(inner, optimizer, scheduler, scaler)

    progress = Progress()
    resume = session.resume_dir(config.get("resume_from"))
    if resume is not None:
        with resume as d:
            progress = load_train_state(Path(d), parts)

    # Rank 0's MLflow start-up (importing MLflow, opening the store, the start record; for a trial
    # also its child run). A trial's runs it in a thread beside the first training steps; a run
    # that fails within its first seconds may then end before its start record is written.
    tracker: Future[TrackedRun] | None = None
    if rank == 0:
        child = ChildRun(spec, config["run_key"], run_name, config.get("run_tags") or {})
        tracker = start_tracking(
            config["tracking"], child, config["run_id"], device=str(device), start_epoch=progress.epoch,
            history=list(progress.history), background=not config["run_id"], say=say,
        )  # fmt: skip
    run: TrackedRun | None = None
    try:
        is_voc = spec.dataset.format == "voc"
        label_to_cat_id = data.val.label_to_cat_id
        epoch_times: list[float] = []
        summary: dict[str, Any] = {}
        hooks.train_start()
        hooks.phase("epochs_start")
        for epoch in range(progress.epoch + 1, t.epochs + 1):
            t0 = time.perf_counter()
            train.sampler.set_epoch(epoch)
            model.train()
            hooks.epoch_start(epoch)
            stats = train_epoch(
                model, train.loader, parts, device, spec, epoch=epoch, rank=rank,
                iters_per_epoch=train.iters_per_epoch, use_amp=amp_dtype is not None, amp_dtype=amp_dtype,
                pop_diagnostics=pop_diagnostics, hooks=hooks,
            )  # fmt: skip
            t1 = time.perf_counter()
            final = epoch == t.epochs
            val = evaluate_shard(inner, val_loader, device, label_to_cat_id, with_pre_nms=final)
            all_dets = [d for part in _all_gather(val.dets) for d in part]
            all_pre = [d for part in _all_gather(val.pre_nms) for d in part] if final else []
            train_all = _all_gather(stats)
            test_dets: list[dict[str, Any]] = []
            if final and test_loader is not None:
                # one inference at the lowest of eval.score_thresh and its extra thresholds
                test = evaluate_shard(
                    inner, test_loader, device, label_to_cat_id, with_pre_nms=False,
                    score_thresh=spec.eval.test_inference_thresh(),
                )  # fmt: skip
                test_dets = [d for p in _all_gather(test.dets) for d in p]
            metrics: dict[str, Any] = {}
            if rank == 0:
                metrics = epoch_metrics(train_all, all_dets, all_pre, data.val, is_voc, t.nms_iou, t1 - t0)
                if final and data.test is not None:
                    ev = spec.eval
                    metrics.update(
                        held_out_metrics(
                            data.test, test_dets, is_voc, ev.score_thresh, ev.extra_score_thresholds
                        )
                    )
            epoch_time = time.perf_counter() - t0
            epoch_times.append(epoch_time)
            eta = (sum(epoch_times) / len(epoch_times)) * (t.epochs - epoch)
            metrics.update(
                epoch=epoch, done=final, lr=optimizer.param_groups[0]["lr"], epoch_time_s=epoch_time
            )

            progress.epoch = epoch
            improved = rank == 0 and metrics.get("AP", -1.0) > progress.best["AP"]
            if improved:
                progress.best = {"AP": float(metrics["AP"]), "epoch": epoch}
            if rank == 0:
                progress.history.append(
                    {k: v for k, v in metrics.items() if isinstance(v, int | float | bool)}
                )
            if final:
                hooks.phase("epochs_done")
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    save_train_state(Path(tmp), parts, progress, spec)
                session.report(metrics, tmp if rank == 0 else None, epoch)

            if tracker is not None:
                run = tracker.result()  # raises what the start-up raised
                if epoch not in logged_steps(run.client, run.run_id):
                    log_metrics(run.client, run.run_id, metrics, step=epoch)
                if improved:
                    log_best_model(run, inner, spec, data.train, metrics)
                say(_progress_line(run_name, metrics, t.epochs, eta))
                if final:
                    summary = _summary(run.run_id, progress)
                    diagnostics = [p.diag for p in train_all]
                    log_final_artifacts(run, run_name, progress.history, all_dets, data.val, diagnostics)
        if tracker is not None:
            run = tracker.result()
            if not summary:  # resumed after the last epoch: nothing left to train
                summary = _summary(run.run_id, progress)
        hooks.phase("training_end")
    except BaseException:
        # Let rank 0's MLflow start-up finish before the error leaves this worker: written after
        # it, the trial's record of the failure would be overwritten.
        if tracker is not None:
            futures_wait([tracker], timeout=60)
        raise
    return summary if rank == 0 else None
