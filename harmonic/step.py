"""The optimizer step every training loop of the project takes: the Ray workers' epoch, fine-tuning,
the plain loop the benchmarks compare with, the loss benchmark and body pretraining.

A loop computes its loss (a detector's ``sum(model(images, targets).values())``, or pretraining's
classification loss) and hands it to :func:`optimizer_step`, which clears the gradients,
back-propagates (scaled, under a gradient scaler), clips the gradients' norm, steps the optimizer
(through the scaler) and then the learning-rate scheduler, in that order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["optimizer_step", "total_loss"]


def total_loss(loss_dict: dict[str, Tensor]) -> Tensor:
    """A detector's training loss: the sum of the terms it returns (torchvision's convention)."""
    return sum(loss_dict.values())  # type: ignore[return-value]


def optimizer_step(
    loss: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: Any = None,
    scaler: Any = None,
    clip_grad_norm: float | None = None,
    params: Iterable[Tensor] | None = None,
    finite: Tensor | None = None,
) -> None:
    """One step on ``loss``.

    ``scaler``: a :class:`torch.amp.GradScaler` (enabled or not) or None. ``clip_grad_norm``: the
    gradients' largest total norm, over ``params`` (default: every parameter of the optimizer),
    after unscaling. ``finite``: the loss terms; under an enabled scaler, when one of them is not
    finite every gradient becomes NaN (on every DDP rank, through the all-reduce), so that the
    scaler skips the step and lowers its scale without the host waiting for the device.
    ``scheduler``: stepped after the optimizer (per iteration).
    """
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        loss = scaler.scale(loss)
        if finite is not None and scaler.is_enabled():
            loss = loss * torch.where(torch.isfinite(finite).all(), 1.0, float("nan"))
    loss.backward()
    if clip_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        if params is None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
