"""The trainer of one training run on Ray Train (Train V2): :class:`HarmonicTrainer` and its
construction from a spec (:func:`make_trainer`: workers, resources, storage, MLflow child run).

``fit()`` trains ``scaling.num_workers`` DDP workers (gloo on CPU, NCCL on GPU) with
:func:`workers.training.worker_loop.train_loop_per_worker`, which evaluates every epoch, reports
``ray.train.report(metrics, checkpoint)`` once per epoch and logs to one MLflow child run. The same
trainer is what a Tune trial fits (pass Tune's ``TuneReportCallback`` in ``callbacks``).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from workers import ray_compat
from workers.resources import resolve_use_gpu, worker_resources
from workers.spec import Spec
from workers.tracking import TrackingContext
from workers.training.run_tracking import ChildRun, ChildRunOwner, prepare_child_run
from workers.training.worker_loop import loop_config, train_loop_per_worker

__all__ = [
    "HarmonicTrainer",
    "ChildRun",
    "make_trainer",
    "prepare_training",
    "prepare_child_run",
    "resolve_use_gpu",
    "worker_resources",
]


class HarmonicTrainer(ChildRunOwner, TorchTrainer):
    """A ``TorchTrainer`` that closes its MLflow child run, does not retry deterministic errors,
    and can be aborted from another thread.

    ``fit()`` is ``TorchTrainer.fit()`` with these changes:

    * a worker that raised a :class:`~workers.training.errors.DeterministicTrainingError` (e.g.
      :class:`~workers.training.errors.NonFiniteLossError`), or an invalid spec, dataset or loss option,
      fails the run at once, whatever ``FailureConfig(max_failures)`` says, since a retry from the
      last checkpoint would only hit it again; the error is raised as itself. Other errors are
      retried as configured (:class:`workers.training.controller_hooks.NoRetryOnDeterministic`).
    * :meth:`abort` stops the run from another thread (a Tune trial that the scheduler stopped
      aborts its trainers this way; Ray Train itself only aborts on Ctrl-C in the main thread).
    * the controller is started without the Ray Data helpers when the run has no Ray datasets
      (this package feeds its workers with torch data loaders): one process less per run.

    Args:
        *args, **kwargs: those of ``TorchTrainer``.
        tracking: the experiment's tracking context (None: no MLflow run to close).
        child_run: what finds the MLflow child run again (:meth:`child_run_id`).
        mlflow_run_id: the child run, when it exists already (empty: found when needed).
    """

    def __init__(
        self,
        *args: Any,
        tracking: TrackingContext | None = None,
        child_run: ChildRun | None = None,
        mlflow_run_id: str = "",
        **kwargs: Any,
    ) -> None:
        from workers.training.controller_hooks import TorchBackendConfig

        self.tracking = tracking
        self.child_run = child_run
        self.mlflow_run_id = mlflow_run_id
        self._controller: Any = None
        self._aborted = False
        super().__init__(*args, **kwargs)
        # The same process group, set up by a controller that does not import torch for it.
        light = TorchBackendConfig.of(self.backend_config)  # type: ignore[has-type]
        self.backend_config = light
        object.__setattr__(self.train_run_context, "backend_config", light)  # (a frozen dataclass)

    def controller_init_kwargs(self) -> dict[str, Any]:
        """What the Train controller is created with, but the training function (its object ref).

        All of it is unpickled in the controller process before it can start the workers; a test
        checks that this imports neither torch nor MLflow nor the training modules.
        """
        from workers.training.controller_hooks import NoRetryOnDeterministic

        return {
            "scaling_policy": self._scaling_policy(),
            "failure_policy": NoRetryOnDeterministic(self.run_config.failure_config),
            "train_run_context": self.train_run_context,
            "callbacks": self._create_default_callbacks(),
            "validation_config": self.validation_config,
        }

    def _scaling_policy(self) -> Any:
        """Ray Train's, but on a Ray without an autoscaler a fixed-size run's sends no resource
        requests (:class:`workers.training.controller_hooks.FixedScalingWithoutAutoscaler`)."""
        from workers.env import ray_has_no_autoscaler
        from workers.training.controller_hooks import FixedScalingWithoutAutoscaler

        if ray_has_no_autoscaler() and not self.scaling_config.elasticity_enabled:
            return FixedScalingWithoutAutoscaler(scaling_config=self.scaling_config)
        return ray_compat.create_scaling_policy()(self.scaling_config)

    def fit(self) -> Result:
        from workers.training.controller_hooks import deterministic_cause

        try:
            if self.running_in_local_mode:
                result = self._initialize_and_run_local_controller(self._get_train_func())
            else:
                result = self._initialize_and_run_controller(
                    train_fn_ref=ray_compat.object_ref_wrapper()(self._get_train_func()),
                    **self.controller_init_kwargs(),
                )
            if result.error:
                raise result.error
        except BaseException as e:
            if self._aborted or isinstance(e, KeyboardInterrupt):  # abort(), or SIGINT in this thread
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

        controller_cls = ray.remote(
            num_cpus=0,
            # on the node of the caller, as Ray Train does
            label_selector=ray_compat.this_node_label_selector(),
            runtime_env={"env_vars": ray_compat.controller_env_vars()},
        )(ray_compat.train_controller())
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
        from workers.env import NO_STATE_API_ENV

        callbacks = super()._create_default_callbacks()
        if os.environ.get(NO_STATE_API_ENV) == "1" or not ray_compat.dashboard_url()():
            # The placement-group cleaner polls the state API, which the dashboard serves: without a
            # dashboard (a local Ray started without one) it can only log a warning every 2 s.
            cleaner = ray_compat.placement_group_cleaner_callback()
            callbacks = [cb for cb in callbacks if not isinstance(cb, cleaner)]
        if not self.datasets:
            # It would start a DatasetManager actor (a process importing Ray Data) for nothing.
            datasets_cb = ray_compat.datasets_callback()
            callbacks = [cb for cb in callbacks if not isinstance(cb, datasets_cb)]
        return callbacks


class PreparedTraining(NamedTuple):
    """What either trainer of one training needs: the spec with its paths pinned, the worker
    loop's config, the MLflow child run ("" while deferred) and what finds it again."""

    spec: Spec
    config: dict[str, Any]
    run_id: str
    child_run: ChildRun


def prepare_training(
    spec: Spec,
    *,
    run_name: str,
    tracking: TrackingContext,
    use_gpu: bool,
    resume_from: str | None = None,
    run_key: str | None = None,
    tags: dict[str, str] | None = None,
    defer_run: bool = False,
) -> PreparedTraining:
    """The part of building a trainer that does not depend on how it runs (Ray Train or the pool);
    the arguments are :func:`make_trainer`'s."""
    if spec.dataset.format == "synthetic" and spec.dataset.root is None:
        # Not resolved by the driver (hdet run does it): workers run in their own folders, so pin it here.
        spec = spec.with_resolved_paths()
    key = run_key or run_name
    run_id = "" if defer_run else prepare_child_run(tracking, spec, run_key=key, run_name=run_name, tags=tags)
    config = loop_config(
        spec, run_id=run_id, run_name=run_name, run_key=key, tags=tags, tracking=tracking,
        resume_from=resume_from, use_gpu=use_gpu,
    )  # fmt: skip
    return PreparedTraining(spec, config, run_id, ChildRun(spec, key, run_name, dict(tags or {})))


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
    use_gpu: bool | None = None,
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
            MLflow call and the trainer's controller starts at once. ``mlflow_run_id`` is then
            empty; :meth:`HarmonicTrainer.child_run_id` finds the run.
        use_gpu: ``scaling.use_gpu`` already resolved by the caller (None: resolved here).

    Returns:
        A :class:`HarmonicTrainer`; its ``mlflow_run_id`` is the child run (unless ``defer_run``).
    """
    # auto: per training, from the nodes the cluster has or can start (workers.resources)
    use_gpu = resolve_use_gpu(spec) if use_gpu is None else use_gpu
    prep = prepare_training(
        spec, run_name=run_name, tracking=tracking, resume_from=resume_from, run_key=run_key,
        tags=tags, defer_run=defer_run, use_gpu=use_gpu,
    )  # fmt: skip
    s = prep.spec.scaling
    return HarmonicTrainer(
        train_loop_per_worker,
        train_loop_config=prep.config,
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=worker_resources(prep.spec, use_gpu),
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
        tracking=tracking,
        child_run=prep.child_run,
        mlflow_run_id=prep.run_id,
    )
