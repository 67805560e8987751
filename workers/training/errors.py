"""Errors of a training run that must reach the user whole, across Ray's process boundaries."""

from __future__ import annotations

from typing import Any

__all__ = ["DeviceMismatchError", "NonFiniteLossError", "DeterministicTrainingError"]


class DeterministicTrainingError(RuntimeError):
    """An error that would happen again on a retry from the last checkpoint.

    Ray Train's ``FailureConfig(max_failures)`` retries worker errors; a run that fails with one of
    these is stopped at once instead (see :class:`workers.training.trainer.HarmonicTrainer`).
    """


class NonFiniteLossError(DeterministicTrainingError):
    """A loss term became NaN or infinite.

    Args:
        step: global training step (0-based) at which it happened.
        epoch: 1-based epoch.
        term: name of the first non-finite loss term (``"classification"``, ``"bbox_regression"``...).
        value: its value.
        rank: the worker that saw it.
        fp16_skipped: under ``train.amp: fp16``, the steps in a row, this one included, whose loss was
            non-finite and that were skipped before the training gave up (0: not fp16).
    """

    def __init__(self, step: int, epoch: int, term: str, value: float, rank: int = 0, fp16_skipped: int = 0):
        self.step, self.epoch, self.term, self.value, self.rank = step, epoch, term, value, rank
        self.fp16_skipped = fp16_skipped
        if fp16_skipped:
            advice = (
                f"Under train.amp: fp16, {fp16_skipped} steps in a row had a non-finite loss (each skipped, "
                "the gradient scaler lowering its scale): the model overflows fp16's range. Set train.amp: "
                "bf16 (GPUs from Ampere on) or off (float32)."
            )
        else:
            advice = "Lower train.lr, set train.clip_grad_norm, or check the data for degenerate boxes."
        super().__init__(
            f"non-finite loss at step {step} (epoch {epoch}, rank {rank}): loss term {term!r} = {value}. {advice}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.step, self.epoch, self.term, self.value, self.rank, self.fp16_skipped))


class DeviceMismatchError(DeterministicTrainingError):
    """A worker was not given the device its spec asks for (``scaling.use_gpu`` against the GPUs
    Ray assigned it and the CUDA devices torch sees); the message names both sides."""
