"""Every plot writes a non-empty PNG; bad input is named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harmonic.plots import (
    plot_ap_vs_iou,
    plot_iou_histogram,
    plot_score_iou_density,
    plot_training_consistency,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 5000


def test_plots_write_png(tmp_path: Path) -> None:
    t = [round(0.5 + 0.05 * i, 2) for i in range(10)]
    base = {x: 0.6 - 0.6 * (x - 0.5) for x in t}
    better = {f"{x:.2f}": v + 0.1 * (x - 0.5) for x, v in base.items()}  # JSON-form keys work too
    p = plot_ap_vs_iou({"standard": base, "harmonicdet": better}, tmp_path / "ap.png", reference="standard")
    assert p == tmp_path / "ap.png" and _is_png(p)
    assert _is_png(plot_ap_vs_iou({"only": base}, tmp_path / "ap1.png"))

    rng = np.random.default_rng(0)
    iou = rng.uniform(0.3, 1.0, 500)
    score = np.clip(iou + rng.normal(0, 0.15, 500), 0, 1)
    assert _is_png(plot_score_iou_density(score, iou, tmp_path / "sub" / "dens.png", title="harmonicdet"))

    ep = list(range(1, 6))
    runs = {
        "standard": {
            "epochs": ep,
            "beta_r": [1.3, 1.4, 1.45, 1.5, 1.52],
            "beta_c": [1.2] * 5,
            "aic": [0.4, 0.35, 0.3, 0.28, 0.27],
        },
    }
    p = plot_training_consistency(
        ep,
        [1.3] * 5,
        [1.25] * 5,
        [0.3, 0.25, 0.2, 0.18, 0.17],
        tmp_path / "tr.png",
        runs=runs,
        label="harmonicdet",
    )
    assert _is_png(p)

    assert _is_png(plot_iou_histogram([0, 0, 0, 1, 5, 30, 40, 20, 8, 2], tmp_path / "h1.png"))
    assert _is_png(plot_iou_histogram(iou, tmp_path / "h2.png"))
    assert _is_png(
        plot_iou_histogram({"a": iou, "b": [0, 0, 0, 1, 5, 30, 40, 20, 8, 2]}, tmp_path / "h3.png")
    )


def test_plots_reject_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reference"):
        plot_ap_vs_iou({"a": {0.5: 0.5}}, tmp_path / "x.png", reference="b")
    with pytest.raises(ValueError, match="differ in length"):
        plot_score_iou_density([0.1, 0.2], [0.3], tmp_path / "x.png")
    with pytest.raises(ValueError, match="aic has 1 values for 2 epochs"):
        plot_training_consistency([1, 2], [1.1, 1.2], [1.1, 1.2], [0.3], tmp_path / "x.png")
    with pytest.raises(ValueError, match="10 counts expected"):
        plot_iou_histogram([1, 2, 3], tmp_path / "x.png", counts=True)
