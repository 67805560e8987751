"""A trial's trainers on a real local Ray: a stopped trial stops them, and what a Train controller
loads stays light.

* When Tune's scheduler stops a trial, ``tune.report`` raises ``SystemExit`` in the trial function;
  the trial must then abort its seeds' trainers (Tune reuses the trial's process for the next trial,
  where they would otherwise train on) and leave their child runs closed with the epochs reported.
* The Train controller process unpickles the trainer's policies, callbacks and run context before
  it can start any worker: none of that may import torch, MLflow or the training module (each
  import is seconds of every trial's start).
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from hdet_run import start_test_ray, tiny_spec
from mlflow import MlflowClient

from workers.env import NO_AUTOSCALER_ENV, NO_STATE_API_ENV
from workers.search import TrialFailure
from workers.search import train_on_seeds as run_configuration
from workers.spec import Spec
from workers.tracking import TrackingContext, open_parent_run
from workers.training.controller_hooks import (
    DETERMINISTIC_ERRORS,
    deterministic_cause,
    is_deterministic_error,
)
from workers.training.errors import NonFiniteLossError

EPOCHS = 3


def _spec(root: Path, **train: Any) -> Spec:
    return tiny_spec(
        "lifecycle", root, train={"epochs": EPOCHS, **train},
        search={"space": {"alpha": {"uniform": [0.5, 2.5]}}, "seeds": [0, 1], "baseline": False},
    )  # fmt: skip


# --------------------------------------------------------------------------- without Ray


def test_controller_unpickles_without_torch_mlflow_or_the_training_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray.cloudpickle

    from workers.training.controller_hooks import SeedReportCallback, TorchBackendConfig
    from workers.training.trainer import make_trainer

    monkeypatch.setenv(NO_STATE_API_ENV, "1")  # (no Ray here to ask for its dashboard)
    monkeypatch.setenv(NO_AUTOSCALER_ENV, "1")  # (the policy of a local Ray is pickled too)
    spec = _spec(tmp_path).with_overrides({"scaling.num_workers": 2})
    ctx = TrackingContext(f"sqlite:///{tmp_path / 'none.db'}", "lifecycle", "0", "0" * 32)
    trainer = make_trainer(
        spec, run_name="r", storage_path=str(tmp_path), tracking=ctx,
        callbacks=[SeedReportCallback(None, "t-seed0")], defer_run=True,
    )  # fmt: skip
    kwargs = trainer.controller_init_kwargs()
    assert isinstance(kwargs["train_run_context"].backend_config, TorchBackendConfig)
    blob = tmp_path / "controller_args.pkl"
    blob.write_bytes(ray.cloudpickle.dumps(kwargs))
    probe = (
        "import pickle, sys\n"
        f"pickle.loads(open({str(blob)!r}, 'rb').read())\n"
        "heavy = ('torch', 'torchvision', 'mlflow', 'scipy', 'workers.training.trainer', 'workers.training.worker_loop',"
        " 'workers.training.recipe', 'workers.training.epoch_metrics', 'workers.training.train_state', 'workers.search', 'harmonic')\n"
        "print(sorted({m for m in sys.modules for h in heavy if m == h or m.startswith(h + '.')}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("local", [True, False])
def test_a_local_ray_s_runs_ask_no_autoscaler_for_resources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local: bool
) -> None:
    from workers.training.controller_hooks import FixedScalingWithoutAutoscaler
    from workers.training.trainer import make_trainer

    monkeypatch.setenv(NO_STATE_API_ENV, "1")
    monkeypatch.setenv(NO_AUTOSCALER_ENV, "1" if local else "0")
    ctx = TrackingContext(f"sqlite:///{tmp_path / 'none.db'}", "lifecycle", "0", "0" * 32)
    trainer = make_trainer(
        _spec(tmp_path), run_name="r", storage_path=str(tmp_path), tracking=ctx, defer_run=True
    )
    policy = trainer.controller_init_kwargs()["scaling_policy"]
    # Ray's own fixed policy on a cluster (its autoscaler adds nodes for the requests), ours on a
    # one-machine Ray: the same decisions, and no coordinator client is ever made.
    assert isinstance(policy, FixedScalingWithoutAutoscaler) is local
    assert type(policy).__mro__[int(local)].__name__ == "FixedScalingPolicy"
    if local:  # (Ray's would need its coordinator client, made at the controller's start)
        policy.after_controller_start(trainer.train_run_context)
        assert policy.make_decision_for_non_running_worker_group().num_workers == 1
        assert policy._coordinator_client is None


def test_deterministic_errors_are_told_by_name() -> None:
    from harmonic.config import LossConfigError
    from harmonic.data import DatasetError
    from workers.spec import SpecError

    # the names must stay those of the real classes
    for cls in (NonFiniteLossError.__mro__[1], SpecError, DatasetError, LossConfigError):
        assert f"{cls.__module__}.{cls.__qualname__}" in DETERMINISTIC_ERRORS
    assert is_deterministic_error(NonFiniteLossError(3, 1, "classification", float("nan")))
    assert is_deterministic_error(SpecError([("train.lr", "must be > 0")]))
    assert not is_deterministic_error(RuntimeError("worker died"))

    class WorkerGroupError(RuntimeError):
        worker_failures = {1: ValueError("x"), 0: NonFiniteLossError(0, 1, "tc", float("inf"))}

    cause = deterministic_cause(WorkerGroupError())
    assert isinstance(cause, NonFiniteLossError) and cause.term == "tc"
    assert pickle.loads(pickle.dumps(cause)).step == 0


# --------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def local_ray(
    request: pytest.FixtureRequest, scratch: Callable[[pytest.FixtureRequest, str], Path]
) -> Iterator[Path]:
    home = scratch(request, "lifecycle")
    start_test_ray(2)
    yield home
    ray.shutdown()


def _experiment(home: Path) -> tuple[Spec, TrackingContext, MlflowClient]:
    spec = _spec(home)
    uri = f"sqlite:///{home / 'mlflow.db'}"
    return spec, open_parent_run(spec, uri), MlflowClient(tracking_uri=uri)


def _all_cpus_free_soon() -> bool:
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(0.5)
    return bool(ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"])


def _children(c: MlflowClient, ctx: TrackingContext, trial_id: str) -> dict[str, Any]:
    runs = c.search_runs([ctx.experiment_id], filter_string=f"tags.`hdet.trial_id` = '{trial_id}'")
    return {r.data.tags["hdet.seed"]: r for r in runs}


def test_a_stopped_trial_aborts_its_trainers_and_the_process_runs_the_next(local_ray: Path) -> None:
    home = local_ray
    spec, ctx, c = _experiment(home)
    reported: list[dict[str, Any]] = []

    def report(row: dict[str, Any]) -> None:  # what tune.report does when the scheduler says stop
        reported.append(row)
        raise SystemExit(0)

    t0 = time.time()
    with pytest.raises(SystemExit):
        run_configuration(
            spec, {"loss.alpha": 1.0}, trial_id="stopped", arm="search", ctx=ctx,
            storage_path=str(home / "storage"), report=report, replay=False,
        )  # fmt: skip
    assert [r["epoch"] for r in reported] == [1]
    assert time.time() - t0 < 300

    def settled() -> dict[str, Any]:
        return _children(c, ctx, "stopped")

    runs = settled()
    assert sorted(runs) == ["0", "1"]
    for seed, run in runs.items():
        assert run.info.status == "KILLED", seed  # closed before the trial returned
        # epoch 1 (what the trial reported) is logged with the reported values; a seed that ran
        # ahead of the slower one may also have finished epoch 2 before the stop reached it, never 3
        ap = {m.step: m.value for m in c.get_metric_history(run.info.run_id, "AP")}
        assert ap[1] == pytest.approx(reported[0][f"AP_seed{seed}"])
        assert run.data.metrics["epoch"] in (1, 2), seed
        assert run.data.metrics["trial_wall_s"] > 0
    # The trainers are gone: their workers' CPUs are free again, and no epoch comes in later.
    assert _all_cpus_free_soon()
    time.sleep(3)
    assert {s: r.data.metrics["epoch"] for s, r in settled().items()} == {
        s: r.data.metrics["epoch"] for s, r in runs.items()
    }

    # The same process then runs the next configuration to its end (the event queue is shared
    # with the stopped trial's trainers, whose last events must not be taken for this one's).
    rows: list[dict[str, Any]] = []
    out = run_configuration(
        spec.with_overrides({"train.epochs": 1}), {"loss.alpha": 2.0}, trial_id="next", arm="search", ctx=ctx,
        storage_path=str(home / "storage"), report=rows.append, replay=False,
    )  # fmt: skip
    assert [r["epoch"] for r in rows] == [1]
    assert out["first_step_s"] > 0
    runs = _children(c, ctx, "next")
    assert sorted(runs) == ["0", "1"]
    assert all(r.data.metrics["epoch"] == 1 and r.info.status == "FINISHED" for r in runs.values())


def test_a_failing_configuration_records_why_on_every_seed_and_frees_its_workers(local_ray: Path) -> None:
    home = local_ray
    spec, ctx, c = _experiment(home)
    # the loss turns non-finite at once: the first seed to fail fails the configuration, and
    # whatever the other seed is doing then is stopped
    with pytest.raises(TrialFailure, match=r"seed \d: .*non-finite"):
        run_configuration(
            spec, {"loss.alpha": 1.0, "train.lr": 1.0e12}, trial_id="failing", arm="search", ctx=ctx,
            storage_path=str(home / "storage"), replay=False,
        )  # fmt: skip
    runs = _children(c, ctx, "failing")
    assert sorted(runs) == ["0", "1"]
    for run in runs.values():
        assert run.data.tags["hdet.trial_status"] == "failed"
        assert "non-finite" in run.data.tags["hdet.error"]
        assert run.info.status in ("FAILED", "KILLED")
        assert run.data.metrics.get("epoch", 0) < EPOCHS
    assert _all_cpus_free_soon()
