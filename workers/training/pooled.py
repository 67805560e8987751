"""Pooled trainings: a single-worker training as one Ray task, in a worker process that an earlier
training left idle with torch, torchvision and this package already imported.

Ray Train starts a controller actor and a worker actor for every training; the worker actors carry
a ``runtime_env`` of their own, so each is a fresh process that imports the whole stack before its
first step (about 10 s of a 15-60 s CPU training). A single-worker training needs no process group:
:class:`PooledTrainer` runs :func:`workers.training.worker_loop.run_training` as a plain Ray task
instead. The training reserves what a Ray Train worker would (CPUs, GPUs, memory, accelerator type)
as a placement group of one bundle, which its task runs in: as many trainings run at once as the
cluster holds, the rest queue, and whatever watches placement groups (the REST service's RUNNING
and ``waiting_for``) sees both kinds of training alike. Ray's worker pool hands the task a process
of the same job whose imports are done (the tasks' ``runtime_env`` gives them a pool of their own).
A local Ray that ``hdet run`` starts gets its pool's processes at once (:func:`warm_pool`, sized by
:func:`workers.search.slots.warm_pool_for`), so the first trainings do not wait for a process.

Everything else is the Ray Train path's: the MLflow child run (rank 0 creates it beside its first
steps), the per-epoch reports to the search's event hub, errors that a retry would only repeat
failing at once, the others retried ``scaling.max_failures`` times from the last checkpoint. Each
epoch's train state is kept under ``storage_path/run_name/epoch_NNNN`` (the last two), written
under a temporary name and renamed, so a retry or an ``hdet run --resume`` continues from the
latest one.

``scaling.trainer`` chooses: ``pooled``, ``ray_train``, or ``auto``: pooled for a one-worker
training on CPU with local storage, Ray Train otherwise (DDP, GPUs, remote storage).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, NamedTuple

from workers.resources import resolve_use_gpu, worker_bundle
from workers.spec import Spec
from workers.tracking import Tag, TrackingContext
from workers.training.run_tracking import ChildRun, ChildRunOwner

__all__ = [
    "KEEP_CHECKPOINTS",
    "POOL_ENV",
    "TASK_PREFIX",
    "PooledResult",
    "PooledSession",
    "PooledTrainer",
    "latest_checkpoint",
    "make_training",
    "uses_pool",
    "warm_pool",
]

#: Set in a pooled training's process (its runtime_env): the pool's processes are its own.
POOL_ENV = "HDET_POOLED_TRAINING"

#: The name of a pooled training's task and placement group: this, then the run's name.
TASK_PREFIX = "hdet-train:"

#: Epoch checkpoints kept per run (Ray Train's ``CheckpointConfig(num_to_keep=2)`` on its path).
KEEP_CHECKPOINTS = 2

_EPOCH_DIR = re.compile(r"^epoch_(\d{4,})$")


def uses_pool(spec: Spec, storage_path: str, use_gpu: bool) -> bool:
    """Whether a training of ``spec`` runs pooled (``scaling.trainer``; see the module docstring)."""
    mode = spec.scaling.trainer
    if mode != "auto":
        return mode == "pooled"
    return spec.scaling.num_workers == 1 and not use_gpu and "://" not in storage_path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The run's latest complete epoch checkpoint under ``run_dir`` (None: none yet)."""
    from workers.training.train_state import STATE_FILE

    if not run_dir.is_dir():
        return None
    found = [
        (int(m.group(1)), p)
        for p in run_dir.iterdir()
        if (m := _EPOCH_DIR.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return max(found)[1] if found else None


def keep_checkpoint(run_dir: Path, directory: str, epoch: int) -> Path:
    """Copy the checkpoint ``directory`` to ``run_dir/epoch_NNNN`` (whole or not at all) and drop
    all but the last :data:`KEEP_CHECKPOINTS`; returns where it is."""
    run_dir.mkdir(parents=True, exist_ok=True)
    dest = run_dir / f"epoch_{epoch:04d}"
    tmp = run_dir / f".{dest.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(directory, tmp)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    epochs = sorted((int(m.group(1)), p) for p in run_dir.iterdir() if (m := _EPOCH_DIR.match(p.name)))
    for _, old in epochs[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


class PooledSession:
    """What :func:`~workers.training.worker_loop.run_training` asks of a pooled training's process:
    rank 0 of 1, the device Ray assigned, no DDP, checkpoints under ``run_dir``, reports to ``hub``."""

    def __init__(self, run_dir: Path, hub: Any, key: str):
        self.run_dir, self.hub, self.key = run_dir, hub, key
        self.sent: list[Any] = []  # the reports' puts, waited for by flush()

    def shard(self) -> Any:
        from workers.training.worker_loop import Shard

        return Shard(0, 1)

    def device(self, use_gpu: Any) -> Any:
        from workers.training.worker_loop import worker_device

        return worker_device(use_gpu)

    def prepare_model(self, model: Any, device: Any) -> Any:
        return model.to(device)

    def resume_dir(self, resume_from: str | None) -> AbstractContextManager[str] | None:
        from workers.training.train_state import checkpoint_dir

        latest = latest_checkpoint(self.run_dir)
        return checkpoint_dir(None, str(latest) if latest is not None else resume_from)

    def report(self, metrics: dict[str, Any], directory: str | None, epoch: int) -> None:
        if directory is not None:
            keep_checkpoint(self.run_dir, directory, epoch)
        if self.hub is not None:
            # Not waited for here: a task blocked in ray.get lends its CPU out meanwhile (per
            # epoch, for nothing); flush() waits once, at the end.
            self.sent.append(self.hub.put.remote(("report", self.key, dict(metrics), time.time())))

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until the hub has every report (before the training's end is told)."""
        if self.sent:
            import ray

            ray.wait(self.sent, num_returns=len(self.sent), timeout=timeout_s)
            self.sent.clear()


def _train_task(config: dict[str, Any], run_dir: str, hub: Any, key: str, threads: int) -> Any:
    """The Ray task of one pooled training: its threads, then the loop; returns rank 0's summary."""
    import gc

    import torch

    from workers.training.worker_loop import run_training

    torch.set_num_threads(threads)  # a reused process keeps its last training's setting otherwise
    session = PooledSession(Path(run_dir), hub, key)
    try:
        return run_training(config, session)
    finally:
        session.flush()
        gc.collect()  # the model and loaders of this training, before the process waits for the next


#: The name of the tasks that start the pool's processes (:func:`warm_pool`).
WARM_TASK = "hdet-pool-warm"

# Kept so that the warm-up tasks are not forgotten before they ran.
_warming: list[Any] = []


def _warm_task() -> int:
    """Import what a training imports (torch, torchvision, the detectors, data, evaluation and
    MLflow); the process then waits in the pool for a training. Returns its pid."""
    import mlflow  # noqa: F401
    import pycocotools.coco  # noqa: F401

    import harmonic.data  # noqa: F401
    import harmonic.detectors  # noqa: F401
    import harmonic.eval  # noqa: F401
    import workers.training.recipe  # noqa: F401
    import workers.training.worker_loop  # noqa: F401

    return os.getpid()


def warm_pool(processes: int, cpus: float = 1.0) -> list[Any]:
    """Start ``processes`` pooled training processes now, each importing the training stack (about
    3 s of CPU and 6-9 s of wall on a cold machine) while the caller prepares its experiment, so
    that its first trainings start in a ready process. Each holds ``cpus`` while it imports, as a
    training would: a training that asks meanwhile waits, then takes the process.

    Returns the tasks' ``ObjectRef`` (each the process's pid); nothing needs to wait for them.
    """
    import ray

    task = ray.remote(_warm_task).options(
        num_cpus=cpus, max_retries=0, name=WARM_TASK, runtime_env={"env_vars": {POOL_ENV: "1"}}
    )
    refs = [task.remote() for _ in range(max(processes, 0))]
    _warming[:] = refs
    return refs


class PooledResult(NamedTuple):
    """What :meth:`PooledTrainer.fit` returns: rank 0's summary (as Ray Train's ``Result`` has it)."""

    return_value: Any
    error: BaseException | None = None


def _cause(e: BaseException) -> BaseException:
    """The training's own error inside Ray's task error (``e`` itself when there is none)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


class PooledTrainer(ChildRunOwner):
    """One single-worker training as a Ray task (see the module docstring); the interface of
    :class:`workers.training.trainer.HarmonicTrainer` that the search and ``hdet run`` use.

    Args:
        spec: the training's spec (``scaling.num_workers`` is 1).
        config: :func:`~workers.training.worker_loop.run_training`'s config.
        run_dir: where its epoch checkpoints go.
        resources: what the training reserves, its placement group's one bundle
            (:func:`workers.resources.worker_bundle`: CPUs, GPUs, memory, accelerator type).
        hub: the search's event hub (None: no per-epoch events).
        tracking, child_run, mlflow_run_id: the child run, as for ``HarmonicTrainer``.
    """

    def __init__(
        self,
        spec: Spec,
        config: dict[str, Any],
        *,
        run_dir: Path,
        resources: dict[str, float],
        hub: Any = None,
        tracking: TrackingContext | None = None,
        child_run: ChildRun | None = None,
        mlflow_run_id: str = "",
    ) -> None:
        self.spec, self.config, self.run_dir, self.hub = spec, config, run_dir, hub
        self.resources = dict(resources)
        self.tracking, self.child_run, self.mlflow_run_id = tracking, child_run, mlflow_run_id
        self._ref: Any = None
        self._aborted = False

    def _options(self, group: Any = None) -> dict[str, Any]:
        """The task's options: the bundle's resources, inside ``group`` (its placement group)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        r = dict(self.resources)
        opts: dict[str, Any] = {
            "num_cpus": r.pop("CPU", 1.0),
            "num_gpus": r.pop("GPU", 0.0),
            "max_retries": 0,  # fit() retries, from the last checkpoint, as max_failures says
            "name": f"{TASK_PREFIX}{self.config['run_name']}",
            # A pool of its own: Ray reuses a process only for tasks of the same runtime_env, so the
            # search's other tasks (the arms' drivers) never take a process that has torch loaded.
            "runtime_env": {"env_vars": {POOL_ENV: "1"}},
            # In the training's own placement group, never the caller's (a Tune trial's 0.01 CPU).
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=0, placement_group_capture_child_tasks=False
            ),
        }
        if "memory" in r:
            opts["memory"] = r.pop("memory")
        if r:
            opts["resources"] = r  # custom ones, and the accelerator type's marker
        return opts

    def _reserve(self) -> Any:
        """The training's placement group of one bundle: reserved as Ray Train reserves a worker's,
        so that what watches placement groups (the service's RUNNING, its waiting_for) sees it."""
        from ray.util.placement_group import placement_group

        return placement_group(
            [dict(self.resources)], strategy="PACK", name=f"{TASK_PREFIX}{self.config['run_name']}"
        )

    def fit(self, freed: Callable[[], None] | None = None) -> PooledResult:
        """Train to the end (retrying failures as ``scaling.max_failures`` allows); closes the run.
        ``freed`` is called once the training's resources are given back, before the run is closed.

        Raises:
            the training's error: a deterministic one at once, others once the retries are spent;
            ``RuntimeError`` after :meth:`abort_async`.
        """
        from ray.util.placement_group import remove_placement_group

        group = self._reserve()
        try:
            summary = self._fit_in(group)
        finally:
            remove_placement_group(group)
            if freed is not None:
                freed()
        # after the group is gone: the next training's group is placed while this run is closed
        self.close_mlflow_run("FINISHED")
        return PooledResult(summary)

    def _fit_in(self, group: Any) -> Any:
        """The task's summary once it trained to the end; a failure closes the run and raises."""
        import ray

        from workers.training.controller_hooks import deterministic_cause
        from workers.training.worker_loop import say

        task = ray.remote(_train_task)
        cpus = float(self.resources.get("CPU", 1.0))
        threads = max(1, int(round(cpus)))
        max_failures = self.spec.scaling.max_failures
        failures = 0
        while True:
            if self._aborted:
                self.close_mlflow_run("KILLED")
                raise RuntimeError("the training was aborted")
            self._ref = task.options(**self._options(group)).remote(
                self.config, str(self.run_dir), self.hub, self.config["run_key"], threads
            )
            if self._aborted:  # abort_async() ran between the check and the submission
                self._end_task()
            try:
                summary = ray.get(self._ref)
            except BaseException as e:
                if self._aborted or isinstance(e, KeyboardInterrupt):
                    self._end_task()  # a Ctrl-C or an abort: the task must not train on
                    self.close_mlflow_run("KILLED")
                    raise
                cause = _cause(e)
                det = deterministic_cause(cause)
                if det is not None:
                    self.close_mlflow_run("FAILED", str(det))
                    raise det from e
                failures += 1
                if max_failures != -1 and failures > max_failures:
                    self.close_mlflow_run("FAILED", str(cause))
                    raise cause from (e if cause is not e else None)
                say(
                    f"[{self.config['run_name']}] failed ({type(cause).__name__}: {str(cause)[:200]}); "
                    f"retry {failures} of {'unlimited' if max_failures == -1 else max_failures}, "
                    "from its last checkpoint"
                )
                continue
            return summary

    def _end_task(self) -> None:
        """Kill the task's process. Not a KeyboardInterrupt in it: one that lands inside an MLflow
        write leaves that process, which the pool would reuse, holding the store's lock."""
        import ray

        if self._ref is not None:
            ray.cancel(self._ref, force=True)

    def abort_async(self) -> Any:
        """Ask the training to stop: its process is killed (:meth:`_end_task`), ``fit()`` then raises
        in its thread and the child run is closed as ``KILLED``. Returns an ``ObjectRef`` that is
        ready once the task has ended, or None when it had not been submitted."""
        self._aborted = True
        ref = self._ref
        if ref is None:
            return None
        self._end_task()
        return ref

    def abort(self, timeout_s: float = 10.0) -> None:
        """:meth:`abort_async`, waiting up to ``timeout_s`` for the task to end."""
        import ray

        ref = self.abort_async()
        if ref is not None:
            ray.wait([ref], timeout=timeout_s)


def make_training(
    spec: Spec,
    *,
    run_name: str,
    storage_path: str,
    tracking: TrackingContext,
    callbacks: list[Any] | None = None,
    hub: Any = None,
    resume_from: str | None = None,
    run_key: str | None = None,
    tags: dict[str, str] | None = None,
    defer_run: bool = False,
) -> Any:
    """A trainer of one training of ``spec``: a :class:`PooledTrainer` when :func:`uses_pool` says
    so, else :func:`workers.training.trainer.make_trainer`'s Ray Train one (``callbacks``, for Ray
    Train, and ``hub``, for the pool, carry the per-epoch reports). The arguments are
    ``make_trainer``'s."""
    from workers.training.trainer import make_trainer, prepare_training

    use_gpu = resolve_use_gpu(spec)  # once, for either trainer
    if not uses_pool(spec, storage_path, use_gpu):
        return make_trainer(
            spec, run_name=run_name, storage_path=storage_path, tracking=tracking, callbacks=callbacks,
            resume_from=resume_from, run_key=run_key, tags={**(tags or {}), Tag.TRAINER: "ray_train"},
            defer_run=defer_run, use_gpu=use_gpu,
        )  # fmt: skip
    prep = prepare_training(
        spec, run_name=run_name, tracking=tracking, use_gpu=use_gpu, resume_from=resume_from,
        run_key=run_key, tags={**(tags or {}), Tag.TRAINER: "pooled"}, defer_run=defer_run,
    )  # fmt: skip
    return PooledTrainer(
        prep.spec, prep.config, run_dir=Path(storage_path) / run_name,
        resources=worker_bundle(prep.spec, use_gpu), hub=hub, tracking=tracking,
        child_run=prep.child_run, mlflow_run_id=prep.run_id,
    )  # fmt: skip
