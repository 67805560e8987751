"""A non-finite loss: under fp16 the step is skipped and retried (the gradient scaler lowers its
scale) up to FP16_SKIP_LIMIT in a row; under float32 or bf16 it ends the training at once, naming
the first such step even when the loop reads its losses only every few steps. Real torch on CPU:
a small model, a real GradScaler (enabled for fp16 as on a GPU), a real optimizer."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch
from torch import nn

from workers.spec import Spec
from workers.training.epoch_metrics import FP16_SKIP_LIMIT, ShardTrainStats, train_epoch, train_metrics
from workers.training.errors import NonFiniteLossError
from workers.training.train_state import TrainParts

BAD = float("inf")


class _Model(nn.Module):
    """A detector's interface (images, targets -> named loss terms); a batch's ``bad`` target makes
    a term non-finite: ``grad`` through the weights, or a term the weights do not reach."""

    def __init__(self, fail_after_bad: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.fail_after_bad = fail_after_bad
        self.saw_bad = False

    def forward(self, imgs: list[torch.Tensor], targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.fail_after_bad and self.saw_bad:
            raise RuntimeError("a box went NaN")
        x = torch.stack(imgs)
        fit = (self.lin(x) - 1.0).pow(2).mean()
        other = torch.tensor(0.5)
        bad = targets[0]["bad"]
        if bad == "grad":
            fit = fit * BAD
        elif bad == "detached":
            other = torch.tensor(float("nan"))
        self.saw_bad = self.saw_bad or bool(bad)
        return {"fit": fit, "other": other}


def _batches(bad: dict[int, str], n: int) -> list[tuple[list[torch.Tensor], list[dict[str, Any]]]]:
    g = torch.Generator().manual_seed(0)
    return [
        ([torch.rand(3, generator=g) for _ in range(2)], [{"bad": bad.get(i, "")}, {"bad": ""}])
        for i in range(n)
    ]


class _Run:
    def __init__(self, *, fp16: bool, model: _Model | None = None) -> None:
        self.model = model or _Model()
        self.spec = Spec.parse({"name": "nan", "dataset": {"format": "synthetic"}}, check_paths=False)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.steps_taken = 0
        self.optimizer.register_step_post_hook(lambda *_: self._took_a_step())
        scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        self.scaler = torch.amp.GradScaler("cpu", enabled=fp16)
        self.parts = TrainParts(self.model, self.optimizer, scheduler, self.scaler)

    def _took_a_step(self) -> None:
        self.steps_taken += 1

    def epoch(self, batches: list[Any], *, epoch: int = 1, read_every: int = 4) -> ShardTrainStats:
        return train_epoch(
            self.model, batches, self.parts, torch.device("cpu"), self.spec, epoch=epoch, rank=0,
            iters_per_epoch=len(batches), use_amp=False, pop_diagnostics=lambda _m, **_k: {},
            read_every=read_every,
        )  # fmt: skip


@pytest.mark.parametrize("bad", ["grad", "detached"])
def test_fp16_skips_a_step_whose_loss_is_non_finite_and_goes_on(bad: str) -> None:
    run = _Run(fp16=True)
    stats = run.epoch(_batches({2: bad}, 6))
    assert run.steps_taken == 5  # the optimizer never saw the bad step, even where the weights got no NaN
    assert run.scaler.get_scale() == 2.0**15  # GradScaler's 2^16, halved once
    assert stats.skipped_steps == 1 and stats.steps == 5 and stats.images == 12
    assert all(v == v and abs(v) < BAD for v in stats.loss_sums.values())  # the bad step is left out
    assert train_metrics([stats, stats], 1.0)["train_skipped_steps"] == 2.0
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_fp16_gives_up_after_the_limit_of_non_finite_steps_in_a_row_and_says_what_to_try() -> None:
    run = _Run(fp16=True)
    first_bad = 3
    batches = _batches({i: "grad" for i in range(first_bad, 40)}, 40)
    with pytest.raises(NonFiniteLossError) as e:
        run.epoch(batches, epoch=2, read_every=7)
    last = first_bad + FP16_SKIP_LIMIT - 1
    assert (e.value.step, e.value.epoch, e.value.term, e.value.value) == (40 + last, 2, "fit", BAD)
    assert e.value.fp16_skipped == FP16_SKIP_LIMIT
    assert "train.amp: fp16" in str(e.value) and "bf16" in str(e.value) and "off" in str(e.value)
    assert run.steps_taken == first_bad


def test_fp16_retries_fewer_than_the_limit_in_a_row() -> None:
    run = _Run(fp16=True)
    streak = range(2, 2 + FP16_SKIP_LIMIT - 1)
    stats = run.epoch(_batches({i: "grad" for i in streak} | {30: "grad"}, 32))
    assert stats.skipped_steps == FP16_SKIP_LIMIT and stats.steps == 32 - FP16_SKIP_LIMIT


@pytest.mark.parametrize("read_every", [1, 5, 100])
def test_float32_fails_at_the_first_non_finite_loss_whatever_the_reads(read_every: int) -> None:
    run = _Run(fp16=False)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3 .*'fit' = inf\. Lower train.lr"):
        run.epoch(_batches({3: "grad", 6: "detached"}, 8), read_every=read_every)


def test_a_detached_non_finite_term_ends_a_float32_training_too() -> None:
    with pytest.raises(NonFiniteLossError, match=r"step 1 .*'other' = nan"):
        _Run(fp16=False).epoch(_batches({1: "detached"}, 3))


def test_an_error_after_a_non_finite_loss_is_reported_as_that_loss() -> None:
    """Steps after it train on NaN weights; whatever fails there, the cause named is the loss."""
    run = _Run(fp16=False, model=_Model(fail_after_bad=True))
    with pytest.raises(NonFiniteLossError, match="step 1 ") as e:
        run.epoch(_batches({1: "grad"}, 6), read_every=100)
    assert isinstance(e.value.__cause__, RuntimeError)


def test_the_fp16_error_reaches_the_driver_whole() -> None:
    err = pickle.loads(pickle.dumps(NonFiniteLossError(7, 2, "fit", BAD, 1, fp16_skipped=16)))
    assert (err.step, err.rank, err.fp16_skipped) == (7, 1, 16) and "16 steps in a row" in str(err)
