"""Pooled trainings (workers.training.pooled): which trainings run pooled, their checkpoints, and on
a real local Ray of one CPU, two seeds trained one after the other in the same process, a training
whose process dies resumed from its checkpoint, and an invalid choice refused by name.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faults
import pytest
import ray
from hdet_run import start_test_ray, tiny_spec
from mlflow import MlflowClient

from benchmarks import timeline
from workers.resources import ACCELERATOR_MARKER, worker_bundle
from workers.search import train_on_seeds
from workers.search.slots import warm_pool_for
from workers.spec import Spec, SpecError
from workers.tracking import Tag, open_parent_run
from workers.training import hooks as train_hooks
from workers.training.pooled import (
    KEEP_CHECKPOINTS,
    POOL_ENV,
    TASK_PREFIX,
    PooledTrainer,
    keep_checkpoint,
    latest_checkpoint,
    uses_pool,
    warm_pool,
)
from workers.training.train_state import STATE_FILE

EPOCHS = 2


def _spec(root: Path, **scaling: Any) -> Spec:
    return tiny_spec(
        "pooled", root, train={"epochs": EPOCHS}, scaling={"cpus_per_worker": 1, "max_failures": 1, **scaling},
        search={"space": {}, "seeds": [0, 1], "baseline": False, "confirmatory": True},
    )  # fmt: skip


# --------------------------------------------------------------------------- without Ray


@pytest.mark.unit
@pytest.mark.parametrize(
    ("scaling", "storage", "use_gpu", "pooled"),
    [
        ({}, "/tmp/storage", False, True),  # auto: one CPU worker, local storage
        ({}, "/tmp/storage", True, False),  # auto: a GPU training stays on Ray Train
        ({}, "s3://bucket/storage", False, False),  # auto: remote storage stays on Ray Train
        ({"num_workers": 2}, "/tmp/storage", False, False),  # DDP
        ({"trainer": "ray_train"}, "/tmp/storage", False, False),
        ({"trainer": "pooled"}, "s3://bucket/storage", True, True),  # asked for: as asked
    ],
)
def test_which_trainings_run_pooled(
    tmp_path: Path, scaling: dict[str, Any], storage: str, use_gpu: bool, pooled: bool
) -> None:
    assert uses_pool(_spec(tmp_path, **scaling), storage, use_gpu) is pooled


@pytest.mark.unit
def test_pooled_with_several_workers_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"trainer: pooled runs one worker .* num_workers: 2"):
        _spec(tmp_path, trainer="pooled", num_workers=2)


@pytest.mark.unit
def test_checkpoints_are_whole_the_last_two_kept_and_the_latest_found(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert latest_checkpoint(run_dir) is None
    for epoch in (1, 2, 3):
        src = tmp_path / f"src{epoch}"
        src.mkdir()
        (src / STATE_FILE).write_text(f"epoch {epoch}")
        keep_checkpoint(run_dir, str(src), epoch)
    kept = sorted(p.name for p in run_dir.iterdir())
    assert kept == ["epoch_0002", "epoch_0003"] and KEEP_CHECKPOINTS == 2
    assert latest_checkpoint(run_dir) == run_dir / "epoch_0003"
    # a later epoch's folder without its state file (a copy cut short) is not a checkpoint
    (run_dir / "epoch_0004").mkdir()
    (run_dir / ".epoch_0005.123.tmp").mkdir()
    assert latest_checkpoint(run_dir) == run_dir / "epoch_0003"
    # the same epoch written again replaces it whole
    src = tmp_path / "again"
    src.mkdir()
    (src / STATE_FILE).write_text("epoch 3, again")
    keep_checkpoint(run_dir, str(src), 3)
    assert (run_dir / "epoch_0003" / STATE_FILE).read_text() == "epoch 3, again"


@pytest.mark.unit
def test_the_task_reserves_what_a_ray_train_worker_would(tmp_path: Path) -> None:
    spec = _spec(tmp_path, accelerator_type="A10G")
    bundle = worker_bundle(spec, use_gpu=True)  # CPU, GPU, the accelerator type's marker
    config = {"run_name": "r", "run_key": "k"}
    resources = {**bundle, "memory": 2.0**30, "node_pool_a": 1.0}
    opts = PooledTrainer(spec, config, run_dir=tmp_path, resources=resources)._options()
    assert opts["num_cpus"] == 1.0 and opts["num_gpus"] == 1.0 and opts["memory"] == 2.0**30
    assert opts["resources"] == {"node_pool_a": 1.0, "accelerator_type:A10G": ACCELERATOR_MARKER}
    assert opts["max_retries"] == 0  # fit() retries, from the checkpoint
    assert opts["runtime_env"] == {"env_vars": {POOL_ENV: "1"}}
    assert opts["name"] == f"{TASK_PREFIX}r"
    # in the training's own placement group (None here), never the caller's
    strategy = opts["scheduling_strategy"]
    assert (
        strategy.placement_group_bundle_index == 0 and strategy.placement_group_capture_child_tasks is False
    )


# --------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def pooled_ray(
    request: pytest.FixtureRequest, scratch: Callable[[pytest.FixtureRequest, str], Path]
) -> Iterator[Path]:
    """A local Ray of one CPU that keeps idle workers (as hdet run's does), with the fault hooks
    and the timeline's marks (``home/timeline.jsonl``, the test process's marks too)."""
    home = scratch(request, "pooled")
    key = "RAY_idle_worker_killing_time_threshold_ms"
    saved = os.environ.get(key)
    os.environ[key] = "60000"
    os.environ[timeline.ENV] = str(home / "timeline.jsonl")
    try:
        with faults.installed(home / "faults.json"), train_hooks.installed(timeline.HOOK):
            start_test_ray(1)
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved
    yield home
    os.environ.pop(timeline.ENV, None)
    ray.shutdown()


def _start_pid(c: MlflowClient, run_id: str, start: int) -> int:
    path = c.download_artifacts(run_id, f"environment/start_{start}.json")
    return int(json.loads(Path(path).read_text())["pid"])


def _seed_runs(c: MlflowClient, experiment_id: str, trial_id: str) -> dict[str, Any]:
    runs = c.search_runs([experiment_id], filter_string=f"tags.`hdet.trial_id` = '{trial_id}'")
    return {r.data.tags[Tag.SEED]: r for r in runs}


@pytest.mark.unit
def test_a_ray_train_spec_warms_no_pool(tmp_path: Path) -> None:
    assert warm_pool_for(_spec(tmp_path, trainer="ray_train"), str(tmp_path / "storage")) == []


def test_seeds_train_one_after_another_in_one_process(pooled_ray: Path) -> None:
    home = pooled_ray
    # the pool's process started before the experiment, as hdet run starts it beside its preparations
    (warmed,) = ray.get(warm_pool(1), timeout=120)
    spec = _spec(home)
    uri = f"sqlite:///{home / 'mlflow.db'}"
    ctx = open_parent_run(spec, uri)
    c = MlflowClient(tracking_uri=uri)
    out = train_on_seeds(
        spec,
        {},
        trial_id="reuse",
        arm="confirmatory",
        ctx=ctx,
        storage_path=str(home / "storage"),
        replay=False,
    )
    assert sorted(out["history"]) == [0, 1] and all(len(h) == EPOCHS for h in out["history"].values())
    runs = _seed_runs(c, ctx.experiment_id, "reuse")
    assert sorted(runs) == ["0", "1"]
    for run in runs.values():
        assert run.info.status == "FINISHED" and run.data.tags[Tag.TRAINER] == "pooled"
        assert [m.step for m in c.get_metric_history(run.info.run_id, "AP")] == list(range(1, EPOCHS + 1))
    # one CPU: the second seed waited for the first, then took its process (torch imported): the
    # one the warm-up started
    assert _start_pid(c, runs["0"].info.run_id, 1) == _start_pid(c, runs["1"].info.run_id, 1) == warmed
    # each training's marks, in order, from the search (trainer_fit, fit_end) and its task
    order = ("trainer_fit", "worker_start", "data_ready", "model_ready", "epochs_start", "first_step",
             "epochs_done", "training_end", "fit_end")  # fmt: skip
    marks = timeline.read(home / "timeline.jsonl")
    for run in runs.values():
        mine = [m["label"] for m in marks if m["key"] == run.data.tags[Tag.RUN_KEY] and m["label"] in order]
        assert [label for label in order if label in mine] == list(order)
        firsts = [mine.index(label) for label in order]
        assert firsts == sorted(firsts), mine
    costs = timeline.training_costs(marks, 0.0, time.time())
    assert costs["fits"] == 2 and costs["fixed_s"] > 0
    assert all(s >= 0 for s in costs["per_training"].values()), costs
    # and the trainings' placement groups are gone (removed as they end: Ray frees them soon after)
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) < 1.0 and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 1.0


def test_a_training_whose_process_dies_resumes_from_its_checkpoint(pooled_ray: Path) -> None:
    home = pooled_ray
    spec = _spec(home).model_copy(update={"name": "pooled-crash"})
    uri = f"sqlite:///{home / 'mlflow.db'}"
    ctx = open_parent_run(spec, uri)
    c = MlflowClient(tracking_uri=uri)
    marker = home / "crashed.marker"
    with faults.planned(home / "faults.json", crash_rank=0, crash_after_epoch=1, crash_marker=str(marker)):
        train_on_seeds(
            spec, {}, trial_id="crash", arm="confirmatory", ctx=ctx, storage_path=str(home / "storage"),
            replay=False,
        )  # fmt: skip
    assert marker.exists()  # one training's process exited at the start of its epoch 2
    runs = _seed_runs(c, ctx.experiment_id, "crash")
    restarted = [r for r in runs.values() if r.data.tags.get(Tag.STARTS) == "2"]
    assert len(restarted) == 1, {s: r.data.tags.get(Tag.STARTS) for s, r in runs.items()}
    (run,) = restarted
    assert run.info.status == "FINISHED" and run.data.tags[Tag.RESUMED_FROM_EPOCH] == "1"
    # every epoch logged once, the first from before the crash
    assert [m.step for m in c.get_metric_history(run.info.run_id, "AP")] == list(range(1, EPOCHS + 1))
    assert _start_pid(c, run.info.run_id, 1) != _start_pid(c, run.info.run_id, 2)


def test_a_comparison_leaves_no_hub_or_slots_actor_behind(pooled_ray: Path) -> None:
    import ray._private.state as ray_state

    from workers.search import run_search

    def alive() -> list[str]:
        names = [a["ActorClassName"] for a in ray_state.actors().values() if a["State"] == "ALIVE"]
        return [n for n in names if n.endswith(("EventHub", "TrainingSlots"))]

    home = pooled_ray
    spec = tiny_spec(
        "pooled-actors", home, search={"space": {}, "seeds": [0], "baseline": True, "confirmatory": True}
    )
    before = alive()
    ctx = open_parent_run(spec, f"sqlite:///{home / 'mlflow.db'}")
    summary = run_search(spec, ctx, str(home / "storage"), verbose=0, print_table=False)
    assert summary.complete
    # a suite's or a benchmark's searches run in one process: each stops its own actors
    deadline = time.time() + 30
    while alive() != before and time.time() < deadline:
        time.sleep(0.5)
    assert alive() == before
