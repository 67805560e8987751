"""Every name this package takes from Ray's private modules, behind one accessor each.
Ray moves these between releases: ``tests/workers/test_ray_compat.py`` names the one that moved.

Each accessor imports its module when called, never at import time (the Train controller imports
this module: it must stay light). :data:`PRIVATE` lists them all (accessor name -> ``module:name``)
and :data:`TORCH_TRAINER_INTERNALS` the private members of ``TorchTrainer`` that
:class:`workers.training.trainer.HarmonicTrainer` overrides or calls.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = [
    "PRIVATE",
    "TORCH_TRAINER_INTERNALS",
    "RayPrivateMoved",
    "load",
    "default_failure_policy",
    "failure_decision",
    "training_framework",
    "object_ref_wrapper",
    "create_scaling_policy",
    "fixed_scaling_policy",
    "train_controller",
    "datasets_callback",
    "placement_group_cleaner_callback",
    "dashboard_url",
    "get_address_and_port",
    "build_address",
    "set_torch_distributed_env_vars",
    "setup_torch_process_group",
    "shutdown_torch",
    "get_or_create_autoscaling_coordinator",
    "quiet_train_report_log",
    "controller_env_vars",
    "this_node_label_selector",
]

#: accessor name -> ``"module:name"`` of the Ray private name it returns.
PRIVATE: dict[str, str] = {}

#: Private members of ``ray.train.torch.TorchTrainer`` that HarmonicTrainer overrides or uses
#: (``running_in_local_mode`` and ``train_run_context`` are instance attributes).
TORCH_TRAINER_INTERNALS = (
    "_initialize_and_run_controller",
    "_initialize_and_run_local_controller",
    "_get_train_func",
    "_create_default_callbacks",
    "running_in_local_mode",
    "train_run_context",
)


class RayPrivateMoved(ImportError):
    """A Ray private name this package uses is not where it was (a Ray upgrade moved it)."""


def load(path: str) -> Any:
    """The object at ``"module:name"``, or :class:`RayPrivateMoved` naming the path."""
    module, _, name = path.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise RayPrivateMoved(f"Ray private module {module} is gone ({_ray_version()}): {e}") from e
    try:
        return getattr(mod, name)
    except AttributeError:
        raise RayPrivateMoved(
            f"Ray private name {module}.{name} is gone ({_ray_version()}); see workers/ray_compat.py"
        ) from None


def _ray_version() -> str:
    try:
        import ray

        return f"Ray {ray.__version__}"
    except ImportError:  # pragma: no cover
        return "Ray not installed"


def _private(name: str, path: str) -> Callable[[], Any]:
    PRIVATE[name] = path

    def get() -> Any:
        return load(path)

    get.__name__ = get.__qualname__ = name
    get.__doc__ = f"``{path.replace(':', '.')}`` (imported when called)."
    return get


# --------------------------------------------------------------------------- Train V2 controller

default_failure_policy = _private(
    "default_failure_policy", "ray.train.v2._internal.execution.failure_handling:DefaultFailurePolicy"
)
failure_decision = _private(
    "failure_decision", "ray.train.v2._internal.execution.failure_handling:FailureDecision"
)
training_framework = _private("training_framework", "ray.train.v2._internal.util:TrainingFramework")
object_ref_wrapper = _private("object_ref_wrapper", "ray.train.v2._internal.util:ObjectRefWrapper")
create_scaling_policy = _private(
    "create_scaling_policy", "ray.train.v2._internal.execution.scaling_policy:create_scaling_policy"
)
fixed_scaling_policy = _private(
    "fixed_scaling_policy", "ray.train.v2._internal.execution.scaling_policy:FixedScalingPolicy"
)
train_controller = _private("train_controller", "ray.train.v2._internal.execution.controller:TrainController")
datasets_callback = _private("datasets_callback", "ray.train.v2._internal.callbacks:DatasetsCallback")
placement_group_cleaner_callback = _private(
    "placement_group_cleaner_callback",
    "ray.train.v2._internal.callbacks.placement_group_callback:PlacementGroupCleanerCallback",
)
_train_context_file = _private("_train_context_file", "ray.train.v2._internal.execution.context:__file__")
_env_vars_to_propagate = _private(
    "_env_vars_to_propagate", "ray.train.v2._internal.constants:get_env_vars_to_propagate"
)
_warn_blocking_get_default = _private(
    "_warn_blocking_get_default",
    "ray.train.v2._internal.constants:DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE",
)
_warn_blocking_get_env = _private(
    "_warn_blocking_get_env", "ray._common.constants:RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR"
)
_node_id_key = _private("_node_id_key", "ray._raylet:RAY_NODE_ID_KEY")
dashboard_url = _private("dashboard_url", "ray._private.worker:get_dashboard_url")

# --------------------------------------------------------------------------- torch process group

get_address_and_port = _private("get_address_and_port", "ray.train._internal.utils:get_address_and_port")
build_address = _private("build_address", "ray._common.network_utils:build_address")
set_torch_distributed_env_vars = _private(
    "set_torch_distributed_env_vars", "ray.train.torch.config:_set_torch_distributed_env_vars"
)
setup_torch_process_group = _private(
    "setup_torch_process_group", "ray.train.torch.config:_setup_torch_process_group"
)
shutdown_torch = _private("shutdown_torch", "ray.train.torch.config:_shutdown_torch")

# --------------------------------------------------------------------------- Ray Data

get_or_create_autoscaling_coordinator = _private(
    "get_or_create_autoscaling_coordinator",
    "ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator:get_or_create_autoscaling_coordinator",
)


# --------------------------------------------------------------------------- built on them


def quiet_train_report_log() -> None:
    """Ray Train logs every report's full metrics dict at INFO from a logger named after its file,
    which ``LoggingConfig`` does not reach: raise that logger to WARNING."""
    import logging

    logging.getLogger(_train_context_file()).setLevel(logging.WARNING)


def controller_env_vars() -> dict[str, str]:
    """The environment a Train controller actor is started with, as ``TorchTrainer`` makes it."""
    env_vars: dict[str, str] = _env_vars_to_propagate()()
    env_vars.setdefault(_warn_blocking_get_env(), _warn_blocking_get_default())
    return env_vars


def this_node_label_selector() -> dict[str, str]:
    """A ``label_selector`` that places an actor on the node of the caller."""
    import ray

    return {_node_id_key(): ray.get_runtime_context().get_node_id()}
