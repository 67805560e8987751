"""Consistency metrics of the paper."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def average_inconsistency(scores: Tensor | Sequence[float], ious: Tensor | Sequence[float]) -> float:
    """Average Inconsistency Coefficient: Eq. 14 divided by N, ``mean_i |p_i - IoU_i|``.

    Args:
        scores: classification score of each positive/matched sample.
        ious: IoU of the same samples with their ground truth.

    Returns:
        The mean absolute gap in [0, 1]; 0 means perfectly consistent predictions. NaN when
        there are no samples (an undefined mean is not reported as perfect consistency).
    """
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    i = torch.as_tensor(ious, dtype=torch.float64).flatten()
    if s.shape != i.shape:
        raise ValueError(f"scores and ious differ in length: {s.numel()} vs {i.numel()}")
    if s.numel() == 0:
        return float("nan")
    return float((s - i).abs().mean())
