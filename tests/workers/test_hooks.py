"""The training loop's hooks (workers.training.hooks): loaded by name from HDET_TRAIN_HOOKS on every rank,
dispatched by method, how the benchmarks' marks plug in (rank 0 only), and the tests' fault
injection (tests/faults.py) through them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import faults
import pytest
import torch

from benchmarks import timeline
from workers.training import hooks
from workers.training.errors import NonFiniteLossError


class _Held:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def phase(self, label: str) -> None:
        self.calls.append(("phase", label))

    def epoch_start(self, epoch: int) -> None:
        self.calls.append(("epoch", epoch))

    def step_end(self, epoch: int, seconds: float, images: int, *, last: bool) -> bool:
        self.calls.append(("step", (epoch, images, last)))
        return last


def test_hooks_are_called_by_the_methods_they_have() -> None:
    held, other = _Held(), _Held()
    h = hooks.TrainHooks([held, other, object()])
    h.phase("data_ready")
    h.train_start()  # nobody has it: a no-op
    h.epoch_start(2)
    assert h.on_steps and not h.on_losses  # nobody wants the losses: the loop never asks
    assert h.step_end(1, 0.5, 4, last=False) is False
    assert h.step_end(1, 0.5, 4, last=True) is True  # one hook held the worker
    assert (
        held.calls
        == other.calls
        == [("phase", "data_ready"), ("epoch", 2), ("step", (1, 4, False)), ("step", (1, 4, True))]
    )
    assert not hooks.TrainHooks().on_steps and not hooks.TrainHooks().on_losses


class _Scale:
    def __init__(self, factor: float, at: int):
        self.factor, self.at = factor, at

    def step_losses(self, step: int, losses: dict[str, Any]) -> dict[str, Any] | None:
        return {k: v * self.factor for k, v in losses.items()} if step == self.at else None


def test_each_loss_hook_gets_what_the_one_before_returned_and_none_keeps_the_losses() -> None:
    h = hooks.TrainHooks([_Scale(2.0, at=3), _Scale(10.0, at=3), _Scale(0.0, at=4)])
    assert h.on_losses
    assert h.step_losses(3, {"a": 1.0, "b": 0.5}) == {"a": 20.0, "b": 10.0}
    assert h.step_losses(5, {"a": 1.0}) == {"a": 1.0}


def _by_rank(run_key: str, rank: int) -> Any:
    """A factory that acts on rank 1 only."""
    return _Held() if rank == 1 else None


def test_every_rank_calls_the_factories_with_its_rank() -> None:
    entry = f"{__name__}:_by_rank"
    assert not hooks.load("run", 0, entry)._epoch
    assert len(hooks.load("run", 1, entry)._epoch) == 1


def test_the_timeline_marks_a_workers_phases_only_when_asked_and_on_rank_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(timeline.ENV, raising=False)
    assert not hooks.load("run-a", 0, timeline.HOOK)._phase  # no file named: no hook
    path = tmp_path / "timeline.jsonl"
    monkeypatch.setenv(timeline.ENV, str(path))
    assert not hooks.load("run-a", 1, timeline.HOOK)._phase
    hooks.load("run-a", 0, timeline.HOOK).phase("worker_start")
    (mark,) = timeline.read(path)
    assert (mark["label"], mark["key"], mark["pid"]) == ("worker_start", "run-a", os.getpid())


@pytest.mark.parametrize(
    "names", ["benchmarks.timeline", "no.such.module:hook", "benchmarks.timeline:nothing"]
)
def test_a_bad_hook_name_is_refused_naming_the_variable(names: str) -> None:
    with pytest.raises(ValueError, match="HDET_TRAIN_HOOKS"):
        hooks.load("run", 0, names)


def test_installed_adds_an_entry_for_the_block_and_restores_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(hooks.ENV, "a:b")
    with hooks.installed(timeline.HOOK):
        assert os.environ[hooks.ENV] == f"a:b,{timeline.HOOK}"
    assert os.environ[hooks.ENV] == "a:b"
    monkeypatch.delenv(hooks.ENV)
    with hooks.installed(timeline.HOOK):
        assert os.environ[hooks.ENV] == timeline.HOOK
    assert hooks.ENV not in os.environ


# ------------------------------------------------------------------------------ fault injection


def test_without_a_plan_the_fault_hooks_add_nothing(tmp_path: Path) -> None:
    plan = tmp_path / "faults.json"
    with faults.installed(plan):
        h = hooks.load("run", 1)
        assert not (h._epoch or h.on_losses or h.on_steps)
        with faults.planned(plan, crash_rank=1, crash_marker=str(tmp_path / "m")):
            h = hooks.load("run", 1)
            assert h._epoch and not h.on_losses  # a crash alone: no per-step call
            assert not hooks.load("run", 0)._epoch  # another rank
        assert not plan.exists()


def test_a_crash_needs_a_marker_so_that_it_happens_once(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="crash_marker"):
        faults.Plan(crash_rank=0)
    marker = tmp_path / "crashed"
    marker.write_text("rank 0 exited at epoch 2\n")
    with faults.installed(tmp_path / "faults.json"):
        with faults.planned(tmp_path / "faults.json", crash_rank=0, crash_marker=str(marker)):
            hooks.load("run", 0).epoch_start(2)  # it happened already: the process goes on


def test_the_fault_plan_reaches_a_process_started_in_the_block(tmp_path: Path) -> None:
    """What a Ray worker does: a fresh interpreter elsewhere loads the hooks by name."""
    plan = tmp_path / "faults.json"
    code = "from workers.training import hooks; print(hooks.load('run', 1).on_losses)"
    with faults.installed(plan), faults.planned(plan, nonfinite_step=0):
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
        ).stdout
    assert out.strip() == "True"
    assert faults.HOOKS not in os.environ.get(hooks.ENV, "")
    assert str(Path(faults.__file__).parent) not in os.environ.get("PYTHONPATH", "")


def test_a_planned_non_finite_loss_ends_the_epoch_naming_step_and_term(tmp_path: Path) -> None:
    from harmonic.detectors import pop_diagnostics
    from workers.spec import Spec
    from workers.training import recipe
    from workers.training.epoch_metrics import train_epoch
    from workers.training.train_state import TrainParts

    spec = Spec.parse(
        {
            "name": "nan",
            "dataset": {"format": "synthetic", "train": 4, "val": 2, "image_size": 48, "root": str(tmp_path)},
            "detector": {"arch": "retinanet", "backbone": "resnet18_fpn", "image_size": 48},
            "train": {"epochs": 1, "batch_size": 2, "aspect_ratio_groups": 0},
        }
    )
    data = recipe.build_datasets(spec)
    model = recipe.build_model(spec, data.num_classes)
    loader = recipe.train_loader(data.train, batch_size=2, aspect_ratio_groups=0, seed=0)
    optimizer = recipe.make_optimizer(model, spec)
    parts = TrainParts(
        model, optimizer, recipe.make_scheduler(optimizer, spec, 2), recipe.grad_scaler("cpu", None)
    )
    plan = tmp_path / "faults.json"
    with faults.installed(plan), faults.planned(plan, nonfinite_step=1):
        worker_hooks = hooks.load("run", 0)
    model.train()
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 1 .*'bbox_regression' = inf"):
        train_epoch(
            model, loader.loader, parts, torch.device("cpu"), spec, epoch=1, rank=0,
            iters_per_epoch=loader.iters_per_epoch, use_amp=False,
            pop_diagnostics=pop_diagnostics, hooks=worker_hooks,
        )  # fmt: skip
