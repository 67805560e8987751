"""The one optimizer step of every training loop (harmonic.step): the same update as the loop it
replaced, clipping after unscaling, and a step skipped under fp16 when a loss term is not finite."""

from __future__ import annotations

import torch
from torch import nn

from harmonic.step import optimizer_step, total_loss


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _loss(net: nn.Module) -> torch.Tensor:
    x = torch.linspace(-1, 1, 12).reshape(3, 4)
    return (net(x) ** 2).sum() * 50  # large enough that a norm of 0.5 clips


def test_the_step_is_zero_grad_backward_clip_step_schedule() -> None:
    mine, theirs = _net(), _net()
    opt_a = torch.optim.SGD(mine.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, 1, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, 1, gamma=0.5)
    for _ in range(3):
        optimizer_step(_loss(mine), opt_a, scheduler=sched_a, clip_grad_norm=0.5)
        loss = _loss(theirs)
        opt_b.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5)
        assert norm > 0.5  # the clip acted
        opt_b.step()
        sched_b.step()
    for a, b in zip(mine.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"] == 0.1 * 0.5**3


def test_a_disabled_scaler_changes_nothing() -> None:
    mine, theirs = _net(), _net()
    opt_a, opt_b = (torch.optim.SGD(n.parameters(), lr=0.1) for n in (mine, theirs))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    optimizer_step(_loss(mine), opt_a, scaler=scaler, clip_grad_norm=0.5, params=mine.parameters())
    optimizer_step(_loss(theirs), opt_b, clip_grad_norm=0.5)
    for a, b in zip(mine.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)


def test_under_an_enabled_scaler_clipping_sees_unscaled_gradients() -> None:
    mine, theirs = _net(), _net()
    opt_a, opt_b = (torch.optim.SGD(n.parameters(), lr=0.1) for n in (mine, theirs))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    optimizer_step(_loss(mine), opt_a, scaler=scaler, clip_grad_norm=0.5)
    optimizer_step(_loss(theirs), opt_b, clip_grad_norm=0.5)
    for a, b in zip(mine.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert scaler.get_scale() == 1024.0  # no overflow: the scale stays


def test_a_non_finite_term_under_fp16_skips_the_step_and_halves_the_scale() -> None:
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    terms = {"cls": _loss(net), "box": torch.tensor(float("nan"))}
    finite = torch.stack([v.detach().reshape(()) for v in terms.values()])
    optimizer_step(total_loss({"cls": terms["cls"]}), opt, scaler=scaler, finite=finite)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert scaler.get_scale() == 512.0
