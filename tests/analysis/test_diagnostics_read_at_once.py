"""TrainingDiagnostics.update_steps: several steps read in one transfer give the very numbers of
reading each step (to the last digit), the reservoir sample included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harmonic.analysis import TrainingDiagnostics


def _steps(seed: int) -> list[dict[str, object]]:
    g = torch.Generator().manual_seed(seed)
    steps: list[dict[str, object]] = []
    for i, n in enumerate([7, 0, 33, 1, 120, 12]):
        d: dict[str, object] = {k: torch.rand(n, generator=g) for k in ("score", "iou", "beta_r", "beta_c")}
        d["dl_dp"] = torch.randn(n, generator=g)
        if i == 2:  # under AMP a field may come in half precision
            d["score"] = d["score"].half()  # type: ignore[union-attr]
        if i == 3:  # a step without dl_dp
            del d["dl_dp"]
        if i == 5:  # plain arrays are taken too
            d["iou"] = np.asarray(d["iou"])
        steps.append(d)
    steps.insert(4, {})  # a step that recorded nothing
    return steps


def test_steps_read_at_once_equal_steps_read_one_by_one() -> None:
    steps = _steps(0)
    one_by_one = TrainingDiagnostics(sample_size=50, seed=3)
    for d in steps:
        if d:
            one_by_one.update(d)
    at_once = TrainingDiagnostics(sample_size=50, seed=3)
    at_once.update_steps(steps[:3])
    at_once.update_steps(steps[3:])
    a, b = one_by_one.epoch_summary(), at_once.epoch_summary()
    assert a["n_pos"] == 173 and a["n_pushed"] > 0
    assert repr(a) == repr(b)  # every float to the last digit, the sample's pairs included


def test_a_bad_step_read_at_once_is_refused_as_update_refuses_it() -> None:
    good = {k: torch.rand(3) for k in ("score", "iou", "beta_r", "beta_c")}
    with pytest.raises(ValueError, match="differ in length"):
        TrainingDiagnostics().update_steps([good, {**good, "iou": torch.rand(2)}])
    with pytest.raises(ValueError, match="lack"):
        TrainingDiagnostics().update_steps([{"score": torch.rand(3)}])


def test_no_steps_change_nothing() -> None:
    acc = TrainingDiagnostics()
    acc.update_steps([])
    acc.update_steps([{}, {}])
    assert acc.epoch_summary()["n_pos"] == 0
