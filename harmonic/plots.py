"""The paper's figures as PNG files, from plain data (lists, arrays, dicts).

Every function takes the numbers and a path, writes a PNG and returns the path, so the workers
can log the file to MLflow and the report can embed it. Figures are built with matplotlib's
object API on an Agg canvas (no pyplot, no global backend switch): safe in worker threads and
in processes where another backend is active.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch

__all__ = ["plot_ap_vs_iou", "plot_iou_histogram", "plot_score_iou_density", "plot_training_consistency"]

PathLike = str | os.PathLike[str]


def save_figure(fig: Figure, path: PathLike, *, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG at ``path`` (folders created) through the Agg canvas, no pyplot."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, format="png", dpi=dpi)
    return out


def _curve(run: Mapping[Any, float]) -> tuple[np.ndarray, np.ndarray]:
    # Thresholds may be floats or the "0.50" strings of EvalResult.to_dict(); -1 means undefined.
    items = sorted((float(t), float(v)) for t, v in run.items())
    if not items:
        raise ValueError("an AP-vs-IoU run has no points")
    t = np.array([x for x, _ in items])
    v = np.array([y for _, y in items])
    return t, np.where(v < 0, np.nan, v * 100.0)


def plot_ap_vs_iou(
    runs: Mapping[str, Mapping[Any, float]],
    path: PathLike,
    *,
    reference: str | None = None,
    title: str = "AP at each IoU threshold",
) -> Path:
    """AP-vs-IoU-threshold curves of several runs, and their difference to a reference run.

    The paper's claim is that its gains grow with the IoU threshold; the lower panel shows
    exactly that: AP(run) - AP(reference) at each threshold, in AP points.

    Args:
        runs: run name -> {IoU threshold -> AP in [0, 1]} (``EvalResult.ap_vs_iou`` or its JSON
            form with "0.50" keys).
        path: PNG file to write.
        reference: the run the others are compared with; default the first run. The lower
            panel is drawn when there are at least two runs.
        title: figure title.

    Returns:
        ``path``.
    """
    if not runs:
        raise ValueError("plot_ap_vs_iou needs at least one run")
    names = list(runs)
    if reference is not None and reference not in runs:
        raise ValueError(f"reference run {reference!r} is not among the runs {names}")
    ref = reference if reference is not None else names[0]
    two = len(runs) > 1
    fig = Figure(figsize=(7, 6.5 if two else 4.5))
    if two:
        ax, ax_d = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    else:
        ax, ax_d = fig.subplots(1, 1), None
    curves = {n: _curve(r) for n, r in runs.items()}
    for name, (t, v) in curves.items():
        ax.plot(t, v, marker="o", lw=2 if name == ref else 1.5, label=name)
    ax.set_ylabel("AP (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="run")
    if ax_d is not None:
        t_ref, v_ref = curves[ref]
        ax_d.axhline(0.0, color="black", lw=1)
        for name, (t, v) in curves.items():
            if name == ref:
                continue
            common, i_run, i_ref = np.intersect1d(np.round(t, 4), np.round(t_ref, 4), return_indices=True)
            ax_d.plot(common, v[i_run] - v_ref[i_ref], marker="o", label=f"{name} - {ref}")
        ax_d.set_ylabel(f"AP - AP({ref})\n(points)")
        ax_d.grid(alpha=0.3)
        ax_d.legend()
        ax_d.set_xlabel("IoU threshold")
    else:
        ax.set_xlabel("IoU threshold")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_score_iou_density(
    scores: Sequence[float] | np.ndarray,
    ious: Sequence[float] | np.ndarray,
    path: PathLike,
    *,
    title: str = "Classification score vs IoU",
    band: float = 0.2,
) -> Path:
    """2-D density of detections' score against their IoU with the object (paper Fig. 5).

    The harmonious region ``|score - IoU| <= band`` around the diagonal is shaded: a consistent
    detector puts its detections there, an inconsistent one spreads them above (confident,
    badly localised) and below (well localised, ranked low).

    Args:
        scores: classification scores in [0, 1].
        ious: IoU of the same detections with their ground truth.
        path: PNG file to write.
        title: figure title (e.g. the run's name).
        band: half-width of the harmonious region.

    Returns:
        ``path``.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    i = np.asarray(ious, dtype=np.float64).reshape(-1)
    if s.shape != i.shape:
        raise ValueError(f"scores and ious differ in length: {s.size} vs {i.size}")
    fig = Figure(figsize=(6.2, 5.2))
    ax = fig.subplots()
    xs = np.array([0.0, 1.0])
    ax.fill_between(xs, xs - band, xs + band, color="tab:green", alpha=0.15, lw=0)
    (diag,) = ax.plot(xs, xs, color="tab:green", lw=1.5, ls="--", label="score = IoU")
    if s.size:
        hb = ax.hexbin(i, s, gridsize=35, extent=(0, 1, 0, 1), cmap="viridis", norm=LogNorm())
        fig.colorbar(hb, ax=ax, label="detections per cell")
    else:
        ax.text(0.5, 0.5, "no detections", ha="center", va="center", transform=ax.transAxes)
    inside = float(np.mean(np.abs(s - i) <= band)) if s.size else float("nan")
    handles = [
        diag,
        Patch(color="tab:green", alpha=0.3, label=f"harmonious region |score - IoU| <= {band:g}"),
    ]
    ax.legend(handles=handles, loc="upper left", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("IoU with ground truth")
    ax.set_ylabel("classification score")
    ax.set_title(f"{title}\n{s.size} detections, {inside:.0%} in the harmonious region" if s.size else title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_training_consistency(
    epochs: Sequence[float] | None,
    beta_r: Sequence[float] | None,
    beta_c: Sequence[float] | None,
    aic: Sequence[float] | None,
    path: PathLike,
    *,
    runs: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    label: str = "run",
) -> Path:
    """Mean harmonic factors and AIC of the positives over training (paper Fig. 4).

    Left: mean ``1 + beta_r`` (weight of the classification loss, solid) and mean
    ``1 + beta_c`` (weight of the localisation loss, dashed) per epoch; right: the average
    inconsistency coefficient (AIC, mean |score - IoU|) per epoch.

    Args:
        epochs, beta_r, beta_c, aic: one run's curves (``beta_*`` are the means of
            ``1 + beta``, as ``TrainingDiagnostics.epoch_summary`` gives them); all ``None``
            when only ``runs`` are plotted.
        path: PNG file to write.
        runs: further runs to overlay (e.g. ``{"standard": {...}, "harmonicdet": {...}}``),
            each a dict with ``epochs``, ``beta_r``, ``beta_c``, ``aic`` lists.
        label: legend name of the run given positionally.

    Returns:
        ``path``.
    """
    all_runs: dict[str, Mapping[str, Sequence[float]]] = {}
    if epochs is not None:
        all_runs[label] = {"epochs": epochs, "beta_r": beta_r or [], "beta_c": beta_c or [], "aic": aic or []}
    all_runs.update(runs or {})
    if not all_runs:
        raise ValueError("plot_training_consistency needs epochs or runs")
    fig = Figure(figsize=(11, 4.2))
    ax_b, ax_a = fig.subplots(1, 2)
    colors = [f"C{i}" for i in range(10)]
    for n, (name, r) in enumerate(all_runs.items()):
        missing = [k for k in ("epochs", "beta_r", "beta_c", "aic") if k not in r]
        if missing:
            raise ValueError(f"run {name!r} lacks {missing}")
        ep = np.asarray(r["epochs"], dtype=np.float64)
        c = colors[n % 10]
        for key, ls, sym in (("beta_r", "-", "1+β_r"), ("beta_c", "--", "1+β_c")):
            y = np.asarray(r[key], dtype=np.float64)
            if y.size:
                if y.size != ep.size:
                    raise ValueError(f"run {name!r}: {key} has {y.size} values for {ep.size} epochs")
                ax_b.plot(ep, y, ls=ls, color=c, marker="o", ms=3, label=f"{name}: mean {sym}")
        y = np.asarray(r["aic"], dtype=np.float64)
        if y.size:
            if y.size != ep.size:
                raise ValueError(f"run {name!r}: aic has {y.size} values for {ep.size} epochs")
            ax_a.plot(ep, y, color=c, marker="o", ms=3, label=name)
    ax_b.set_title("Harmonic factors of the positives")
    ax_b.set_xlabel("epoch")
    ax_b.set_ylabel("mean factor (1 = no reweighting, 2 = max)")
    ax_b.grid(alpha=0.3)
    ax_b.legend(fontsize=8)
    ax_a.set_title("Average inconsistency coefficient (AIC)")
    ax_a.set_xlabel("epoch")
    ax_a.set_ylabel("mean |score - IoU| (lower = more consistent)")
    ax_a.grid(alpha=0.3)
    ax_a.legend(fontsize=8, title="run")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_iou_histogram(
    counts_or_ious: Sequence[float] | np.ndarray | Mapping[str, Sequence[float] | np.ndarray],
    path: PathLike,
    *,
    bins: int = 10,
    title: str = "IoU of positive samples",
    counts: bool | None = None,
) -> Path:
    """Histogram of the IoU of positive samples with their object (paper Fig. 3a).

    Args:
        counts_or_ious: either ``bins`` counts over [0, 1] (``epoch_summary()["iou_hist"]``),
            or raw IoU values; or a dict run name -> either, to compare runs (bars side by
            side, as shares so runs with different sample counts compare).
        path: PNG file to write.
        bins: number of equal bins over [0, 1].
        title: figure title.
        counts: whether the values are counts; default: integers of length ``bins`` are.

    Returns:
        ``path``.
    """
    series = dict(counts_or_ious) if isinstance(counts_or_ious, Mapping) else {"": counts_or_ious}
    if not series:
        raise ValueError("plot_iou_histogram needs data")
    hists: dict[str, np.ndarray] = {}
    for name, values in series.items():
        v = np.asarray(values)
        is_counts = counts if counts is not None else (v.size == bins and np.issubdtype(v.dtype, np.integer))
        if is_counts:
            if v.size != bins:
                raise ValueError(f"{bins} counts expected, got {v.size}")
            hists[name] = v.astype(np.float64)
        else:
            h, _ = np.histogram(np.clip(v.astype(np.float64), 0, 1), bins=bins, range=(0, 1))
            hists[name] = h.astype(np.float64)
    several = len(hists) > 1
    edges = np.linspace(0, 1, bins + 1)
    width = (edges[1] - edges[0]) / (len(hists) + 0.5)
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for n, (name, h) in enumerate(hists.items()):
        total = h.sum()
        y = h / total * 100 if several and total > 0 else h
        lbl = f"{name} (n={int(total)})" if name else f"n={int(total)}"
        left = edges[:-1] + width * (n + 0.25)
        ax.bar(left, y, width=width, align="edge", label=lbl, edgecolor="black", lw=0.5)
    ax.set_xticks(edges)
    ax.set_xticklabels([f"{e:.1f}" for e in edges])
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU with the assigned ground truth")
    ax.set_ylabel("share of positives (%)" if several else "number of positives")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)
