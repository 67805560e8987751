"""What a Ray Train controller process loads of this package: the failure policy, the report
callback and event hub, the torch backend config; kept light (no torch, MLflow, SciPy, pydantic).

Every training run (and so every seed of every Tune trial) gets a fresh Train controller process,
which unpickles the trainer's failure policy and its callbacks before it can start the worker
group. Whatever module they live in is imported there, on the critical path of the trial's
start. So they live here, in a module that imports Ray and nothing else of this package but
:mod:`workers.ray_compat` (itself import-free).

* :class:`NoRetryOnDeterministic`: Ray Train's default failure policy, except that errors a
  retry would only repeat (a non-finite loss, an invalid spec, dataset or loss option) fail the
  run at once. The check goes by class names (:data:`DETERMINISTIC_ERRORS`), so it imports none
  of those classes' modules.
* :class:`SeedReportCallback` and :class:`EventHub`: a trainer's per-epoch reports reach the Tune
  trial that started it (see :mod:`workers.search`).
* :class:`FixedScalingWithoutAutoscaler`: Ray Train's fixed scaling policy for a Ray without an
  autoscaler (a local one): the same decisions, no autoscaling coordinator.
* :class:`TorchBackendConfig`: what ``TorchTrainer``'s ``TorchConfig`` is to the controller, without
  importing torch there (``ray.train.torch.config`` imports torch). The controller only
  orchestrates the process group: it runs Ray Train's own worker-side functions
  (``_setup_torch_process_group`` and friends) on the workers, which import torch anyway.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from workers import ray_compat

__all__ = [
    "DETERMINISTIC_ERRORS",
    "EventHub",
    "FixedScalingWithoutAutoscaler",
    "start_event_hub",
    "TorchBackendConfig",
    "NoRetryOnDeterministic",
    "SeedReportCallback",
    "deterministic_cause",
    "is_deterministic_error",
]

#: Errors that a restart from the last checkpoint would only repeat (module-qualified class
#: names; subclasses count too).
DETERMINISTIC_ERRORS = frozenset(
    {
        "workers.training.errors.DeterministicTrainingError",  # NonFiniteLossError and friends
        "workers.spec.base.SpecError",
        "harmonic.data.check.DatasetError",
        "harmonic.config.LossConfigError",
    }
)


def is_deterministic_error(e: BaseException) -> bool:
    """True if ``e`` is (a subclass of) one of :data:`DETERMINISTIC_ERRORS`."""
    return any(f"{c.__module__}.{c.__qualname__}" in DETERMINISTIC_ERRORS for c in type(e).__mro__)


def deterministic_cause(e: BaseException) -> BaseException | None:
    """``e`` itself, or the first worker's error inside a ``WorkerGroupError``, if it is deterministic."""
    if is_deterministic_error(e):
        return e
    failures = getattr(e, "worker_failures", None) or {}
    for rank in sorted(failures):
        if is_deterministic_error(failures[rank]):
            return failures[rank]
    return None


class NoRetryOnDeterministic(ray_compat.default_failure_policy()):  # type: ignore[misc]
    """Ray Train's default failure policy, except that deterministic errors are never retried."""

    def make_decision(self, training_failed_error: Any) -> Any:
        if deterministic_cause(training_failed_error) is not None:
            return ray_compat.failure_decision().RAISE
        return super().make_decision(training_failed_error)


def _user_callback_base() -> type:
    from ray.train import UserCallback

    return UserCallback


class SeedReportCallback(_user_callback_base()):  # type: ignore[misc]
    """Forwards one trainer's per-epoch reports from its Train controller to the trial, through
    the search's :class:`EventHub`.

    Events are ``("report", key, metrics, time)``; ``key`` names the trainer (its MLflow run key).
    The put is waited for, so a report is in the hub before the trainer's ``fit()`` returns.
    """

    def __init__(self, hub: Any, key: str):
        self._hub = hub
        self._key = key

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        import ray

        ray.get(self._hub.put.remote(("report", self._key, dict(metrics[0]), time.time())))


class EventHub:
    """One mailbox per training run (by run key) between Train controllers and the trials.

    A Ray actor (async), one per search: a trial takes the events of its own seeds' runs only, so
    one hub serves every trial and the baseline (a queue per trial would be one more process to
    start per trial process). Events are tuples whose second item is the run key.
    """

    def __init__(self) -> None:
        self._boxes: dict[str, list[tuple[Any, ...]]] = {}
        self._changed: Any = None

    def _condition(self) -> Any:
        import asyncio

        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def put(self, event: tuple[Any, ...]) -> None:
        self._boxes.setdefault(str(event[1]), []).append(event)
        async with self._condition():
            self._condition().notify_all()

    async def take(self, keys: list[str], timeout_s: float = 10.0) -> list[tuple[Any, ...]]:
        """The events of ``keys`` in arrival order, waiting up to ``timeout_s`` for one."""
        import asyncio

        def ready() -> bool:
            return any(self._boxes.get(k) for k in keys)

        if not ready():
            try:
                async with self._condition():
                    await asyncio.wait_for(self._condition().wait_for(ready), timeout_s)
            except TimeoutError:
                return []
        out = [e for k in keys for e in self._boxes.pop(k, [])]
        return sorted(out, key=lambda e: e[3])  # (kind, key, payload, time)


def start_on_this_node(cls: type, *args: Any) -> Any:
    """An actor of ``cls`` (no CPU reserved, many calls at once) on this node, where its callers are."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    strategy = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return (
        ray.remote(num_cpus=0, max_concurrency=1000)(cls).options(scheduling_strategy=strategy).remote(*args)
    )


def start_event_hub() -> Any:
    """An :class:`EventHub` actor on this node."""
    return start_on_this_node(EventHub)


# --------------------------------------------------------------------------- scaling policy


class FixedScalingWithoutAutoscaler(ray_compat.fixed_scaling_policy()):  # type: ignore[misc]
    """Ray Train's fixed-size scaling policy without its resource requests.

    Ray's sends the worker group's resources to a cluster-wide autoscaling coordinator (a detached
    actor that Ray Data shares) at the controller's start and every 20 s, for an autoscaler to add
    nodes. A one-machine Ray has no autoscaler: the requests go nowhere, and the coordinator is one
    more process waking 100 times a second beside the training (stopped together with the
    synchronization actor in a run, the two had cost about 3% of a 2-core machine's training
    throughput). The decisions (start the group at its fixed size, keep it) are Ray's.
    """

    def after_controller_start(self, train_run_context: Any) -> None:
        pass

    def _maybe_send_resource_request(self) -> None:
        pass

    def _send_resource_request(self) -> None:
        pass


# --------------------------------------------------------------------------- torch process group


def _backend_config_base() -> type:
    from ray.train.backend import BackendConfig

    return BackendConfig


def _backend_base() -> type:
    from ray.train.backend import Backend

    return Backend


@dataclass
class TorchBackendConfig(_backend_config_base()):  # type: ignore[misc]
    """``ray.train.torch.TorchConfig`` (same fields, same process group), importable without torch.

    :class:`workers.training.trainer.HarmonicTrainer` puts it in place of the ``TorchConfig`` that
    ``TorchTrainer`` made, so that the Train controller, which unpickles the backend config to set
    up the workers' process group, does not import torch for it.
    """

    backend: str | None = None
    init_method: str = "env"
    timeout_s: int = 1800

    @classmethod
    def of(cls, torch_config: Any) -> TorchBackendConfig:
        return cls(
            backend=torch_config.backend,
            init_method=torch_config.init_method,
            timeout_s=torch_config.timeout_s,
        )

    @property
    def backend_cls(self) -> type:
        return _TorchProcessGroupBackend

    @property
    def train_func_context(self) -> Any:
        # Used where the trainer is built (which imports torch anyway) and pickled by reference
        # into the training function, which only workers unpickle.
        from ray.train.torch.config import TorchConfigContextManager

        return TorchConfigContextManager

    @property
    def framework(self) -> Any:
        return ray_compat.training_framework().TORCH

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": self.init_method, "timeout_s": self.timeout_s}


class _TorchProcessGroupBackend(_backend_base()):  # type: ignore[misc]
    """Ray Train's torch backend (``_TorchBackend``) for GPUs and CPUs, driven from the controller
    without importing torch: every torch call happens on the workers (see the functions below)."""

    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group: Any, backend_config: TorchBackendConfig) -> None:
        import ray

        n = len(worker_group)
        # LOCAL_RANK, RANK, WORLD_SIZE... before init_process_group, as torch expects.
        worker_group.execute(_set_distributed_env_vars)
        if n == 1:
            # One worker has no one to talk to: no process group (whose gloo loop thread would
            # wake 100 times a second beside the training). The training function gathers only
            # when a group is initialized and wraps in DDP only when the world is larger than 1.
            return
        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        addr, port = worker_group.execute_single(0, _address_and_port)
        if backend_config.init_method == "env":
            worker_group.execute(_set_master_env, addr=addr, port=port)
            url = "env://"
        elif backend_config.init_method == "tcp":
            url = f"tcp://{ray_compat.build_address()(addr, port)}"
        else:
            raise ValueError(f"init_method must be 'env' or 'tcp', not {backend_config.init_method!r}")
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    _setup_process_group,
                    backend=backend,
                    world_rank=rank,
                    world_size=n,
                    init_method=url,
                    timeout_s=backend_config.timeout_s,
                )  # fmt: skip
                for rank in range(n)
            ]
        )

    def on_shutdown(self, worker_group: Any, backend_config: TorchBackendConfig) -> None:
        import ray
        from ray.exceptions import GetTimeoutError
        from ray.train.constants import DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S

        futures = worker_group.execute_async(_shutdown_process_group, destroy=len(worker_group) > 1)
        timeout_s = float(
            os.environ.get(
                "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S
            )
        )
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:
            logging.getLogger(__name__).warning(
                "torch process group shutdown timed out after %s s", timeout_s
            )


# Run on the workers (pickled by reference to this module; they import torch there).


def _address_and_port() -> tuple[str, int]:
    addr, port = ray_compat.get_address_and_port()()
    return addr, port


def _set_master_env(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


def _set_distributed_env_vars() -> None:
    ray_compat.set_torch_distributed_env_vars()()


def _setup_process_group(**kwargs: Any) -> None:
    ray_compat.setup_torch_process_group()(**kwargs)


def _shutdown_process_group(destroy: bool) -> None:
    ray_compat.shutdown_torch()(destroy_process_group=destroy)
