"""TrainingDiagnostics: running sums, histogram, reservoir bound, exact merge across ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harmonic.analysis import TrainingDiagnostics


def _steps(seed: int, n_steps: int = 6) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 40, (n_steps,), generator=g).tolist()
    return [{k: torch.rand(n, generator=g) for k in ("score", "iou", "beta_r", "beta_c")} for n in sizes]


def _concat(steps: list[dict[str, torch.Tensor]], key: str) -> np.ndarray:
    return torch.cat([s[key] for s in steps]).double().numpy()


def test_summary_matches_direct_computation() -> None:
    steps = _steps(0)
    acc = TrainingDiagnostics()
    for s in steps:
        acc.update(s)
    out = acc.epoch_summary()
    score, iou = _concat(steps, "score"), _concat(steps, "iou")
    assert out["n_pos"] == len(score)
    assert out["aic"] == pytest.approx(np.abs(score - iou).mean())
    assert out["mean_one_plus_beta_r"] == pytest.approx(1 + _concat(steps, "beta_r").mean())
    assert out["mean_one_plus_beta_c"] == pytest.approx(1 + _concat(steps, "beta_c").mean())
    assert out["iou_hist"] == np.histogram(iou, bins=10, range=(0, 1))[0].tolist()
    acc.reset()
    empty = acc.epoch_summary()
    assert empty["n_pos"] == 0 and np.isnan(empty["aic"]) and sum(empty["iou_hist"]) == 0


def test_ranks_combine_exactly() -> None:
    a, b = _steps(1), _steps(2)
    whole = TrainingDiagnostics()
    for s in a + b:
        whole.update(s)
    rank0, rank1 = TrainingDiagnostics(), TrainingDiagnostics()
    for s in a:
        rank0.update(s)
    for s in b:
        rank1.update(s)
    combined = TrainingDiagnostics.combine([rank0.epoch_summary(), rank1.epoch_summary()])
    ref = whole.epoch_summary()
    for k in ("aic", "mean_one_plus_beta_r", "mean_one_plus_beta_c"):
        assert combined[k] == pytest.approx(ref[k], rel=1e-12)
    assert combined["n_pos"] == ref["n_pos"] and combined["iou_hist"] == ref["iou_hist"]


def test_reservoir_is_bounded_and_drawn_from_the_data() -> None:
    acc = TrainingDiagnostics(sample_size=50, seed=0)
    for s in _steps(3, n_steps=20):
        acc.update(s)
    scores, ious = acc.sample
    assert len(scores) == len(ious) == 50
    assert acc.n_pos > 50
    # Reservoir is uniform: with 1000 values 0..999 offered, its mean is near the middle.
    acc = TrainingDiagnostics(sample_size=200, seed=1)
    v = torch.arange(1000, dtype=torch.float64) / 1000
    for chunk in v.split(37):
        acc.update({"score": chunk, "iou": chunk, "beta_r": chunk, "beta_c": chunk})
    assert 0.4 < float(np.mean(acc.sample[0])) < 0.6


def test_bad_diagnostics_are_named() -> None:
    acc = TrainingDiagnostics()
    with pytest.raises(ValueError, match="beta_c"):
        acc.update({"score": [0.1], "iou": [0.2], "beta_r": [0.3]})
    with pytest.raises(ValueError, match="differ in length"):
        acc.update({"score": [0.1, 0.2], "iou": [0.2], "beta_r": [0.3], "beta_c": [0.3]})
    with pytest.raises(ValueError, match="summary lacks"):
        acc.merge({"n_pos": 1})
