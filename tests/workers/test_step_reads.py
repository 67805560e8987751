"""A training step waits for the device only where torchvision does: the loop reads its loss terms
and diagnostics once per READ_EVERY steps, to the same numbers; loaders sized for a GPU."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from workers.spec import Spec
from workers.training import recipe
from workers.training.epoch_metrics import ShardTrainStats, train_epoch
from workers.training.train_state import TrainParts

# --------------------------------------------------------------------------- loading


def _spec(**train: Any) -> Spec:
    return Spec.parse({"name": "io", "dataset": {"format": "synthetic"}, "train": train}, check_paths=False)


def _with_cpus(spec: Spec, cpus: float) -> Spec:
    return spec.with_overrides({"scaling.cpus_per_worker": cpus}, check_paths=False)


def test_auto_loading_on_a_gpu_has_loader_processes_and_pinned_memory() -> None:
    spec = _spec()
    assert spec.train.data_workers == "auto"
    assert recipe.loading(spec, "cuda") == recipe.Loading(data_workers=1, pin_memory=True)
    assert recipe.loading(_with_cpus(spec, 4), "cuda").data_workers == 3  # all but the training's own
    assert recipe.loading(_with_cpus(spec, 0.5), "cuda").data_workers == 1  # a shared GPU still gets one


def test_auto_loading_on_a_cpu_stays_in_the_training_process() -> None:
    io = recipe.loading(_with_cpus(_spec(), 4), "cpu")
    assert io == recipe.Loading(data_workers=0, pin_memory=False)


def test_a_number_of_data_workers_is_taken_as_given() -> None:
    assert recipe.loading(_spec(data_workers=2), "cpu").data_workers == 2
    assert recipe.loading(_spec(data_workers=0), "cuda") == recipe.Loading(data_workers=0, pin_memory=True)


class _Pids(Dataset[tuple[torch.Tensor, dict[str, Any]]]):
    """Images that say which process loaded them."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        return torch.zeros(1), {"index": i, "pid": os.getpid()}


def _epoch(loader: Any) -> tuple[list[int], set[int]]:
    order, pids = [], set()
    for _, targets in loader:
        order += [t["index"] for t in targets]
        pids |= {t["pid"] for t in targets}
    return order, pids


def test_a_loader_with_processes_keeps_them_across_epochs_and_still_reshuffles() -> None:
    train = recipe.train_loader(_Pids(), batch_size=2, aspect_ratio_groups=0, seed=0, data_workers=1)
    assert train.loader.persistent_workers
    train.sampler.set_epoch(1)
    order1, pids1 = _epoch(train.loader)
    train.sampler.set_epoch(2)
    order2, pids2 = _epoch(train.loader)
    assert pids1 == pids2 and os.getpid() not in pids1  # the same loader process both epochs
    assert sorted(order1) == sorted(order2) and order1 != order2
    val = recipe.eval_loader(_Pids(), batch_size=2, data_workers=1, pin_memory=False)
    assert val.persistent_workers and _epoch(val)[1] == _epoch(val)[1]
    once = recipe.eval_loader(_Pids(), batch_size=2, data_workers=1, persistent=False)
    assert not once.persistent_workers


def test_loaders_without_processes_are_built_as_before() -> None:
    train = recipe.train_loader(_Pids(), batch_size=2, aspect_ratio_groups=0, seed=0)
    val = recipe.eval_loader(_Pids(), batch_size=2)
    for loader in (train.loader, val):
        assert loader.num_workers == 0 and not loader.persistent_workers and not loader.pin_memory
    assert recipe.eval_loader(_Pids(), batch_size=2, pin_memory=True).pin_memory


# --------------------------------------------------------------------------- the training step

_WATCHED = ("workers/training/epoch_metrics.py", "harmonic/analysis/training.py")
_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every call that copies a tensor's value to the host (a wait for a GPU), made by the training
    loop, the diagnostics or ``pop_diagnostics`` (torchvision's own are not counted)."""
    seen: list[str] = []

    def watch(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            code = sys._getframe(1).f_code
            path = code.co_filename.replace(os.sep, "/")
            if path.endswith(_WATCHED) or code.co_name == "pop_diagnostics":
                seen.append(f"{name} in {code.co_name}")
            return method(self, *args, **kwargs)

        return wrapper

    for name in _READS:
        monkeypatch.setattr(torch.Tensor, name, watch(name, getattr(torch.Tensor, name)))
    yield seen


def _train(tmp_path: Path, images: int, *, epochs: int = 1, **kwargs: Any) -> list[ShardTrainStats]:
    from harmonic.detectors import pop_diagnostics

    spec = Spec.parse(
        {
            "name": "reads",
            "dataset": {
                "format": "synthetic",
                "train": images,
                "val": 2,
                "image_size": 48,
                "root": str(tmp_path),
            },
            "detector": {"arch": "retinanet", "backbone": "resnet18_fpn", "image_size": 48},
            "loss": {"kind": "harmonicdet"},
            "train": {"epochs": epochs, "batch_size": 2, "aspect_ratio_groups": 0, "warmup": {"iters": 1}},
        }
    )
    recipe.seed_everything(0)
    data = recipe.build_datasets(spec)
    model = recipe.build_model(spec, data.num_classes)
    loader = recipe.train_loader(data.train, batch_size=2, aspect_ratio_groups=0, seed=0)
    optimizer = recipe.make_optimizer(model, spec)
    scheduler = recipe.make_scheduler(optimizer, spec, loader.iters_per_epoch)
    parts = TrainParts(model, optimizer, scheduler, recipe.grad_scaler("cpu", None))
    model.train()
    out = []
    for epoch in range(1, epochs + 1):
        loader.sampler.set_epoch(epoch)
        out.append(
            train_epoch(
                model, loader.loader, parts, torch.device("cpu"), spec, epoch=epoch, rank=0,
                iters_per_epoch=loader.iters_per_epoch, use_amp=False, pop_diagnostics=pop_diagnostics,
                **kwargs,
            )
        )  # fmt: skip
    return out


def test_the_loop_reads_the_device_once_per_read_not_once_per_step(tmp_path: Path, reads: list[str]) -> None:
    (two,) = _train(tmp_path / "a", 4)
    few = list(reads)
    reads.clear()
    (six,) = _train(tmp_path / "b", 12)
    assert two.steps == 2 and six.steps == 6
    assert reads == few, "the host read the device more often with more steps"
    assert len(reads) <= 3, reads  # the losses, the diagnostics: one copy each per read


def test_reading_every_step_or_every_few_gives_the_same_numbers_to_the_last_digit(tmp_path: Path) -> None:
    every = _train(tmp_path / "a", 10, epochs=2, read_every=1)
    grouped = _train(tmp_path / "b", 10, epochs=2, read_every=3)
    for a, b in zip(every, grouped, strict=True):
        assert a.steps == b.steps == 5 and a.images == b.images == 10
        assert repr(a.loss_sums) == repr(b.loss_sums)
        assert repr(a.diag) == repr(b.diag) and a.diag["n_pos"] > 0
