"""Errors of a training run that must reach the user whole, across Ray's process boundaries."""

from __future__ import annotations

from typing import Any

__all__ = ["DeviceMismatchError", "NonFiniteLossError", "DeterministicTrainingError"]


class DeterministicTrainingError(RuntimeError):
    """An error that would happen again on a retry from the last checkpoint.

    Ray Train's ``FailureConfig(max_failures)`` retries worker errors; a run that fails with one of
    these is stopped at once instead (see :class:`workers.trainer.HarmonicTrainer`).
    """


class NonFiniteLossError(DeterministicTrainingError):
    """A loss term became NaN or infinite.

    Args:
        step: global training step (0-based) at which it happened.
        epoch: 1-based epoch.
        term: name of the first non-finite loss term (``"classification"``, ``"bbox_regression"``...).
        value: its value.
        rank: the worker that saw it.
    """

    def __init__(self, step: int, epoch: int, term: str, value: float, rank: int = 0):
        self.step, self.epoch, self.term, self.value, self.rank = step, epoch, term, value, rank
        super().__init__(
            f"non-finite loss at step {step} (epoch {epoch}, rank {rank}): loss term {term!r} = {value}. "
            "Lower train.lr, set train.clip_grad_norm, or check the data for degenerate boxes."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.step, self.epoch, self.term, self.value, self.rank))


class DeviceMismatchError(DeterministicTrainingError):
    """A worker was not given the device its spec asks for (``scaling.use_gpu`` against the GPUs
    Ray assigned it and the CUDA devices torch sees); the message names both sides."""
