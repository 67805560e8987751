"""Plots of a search's evidence: sensitivity of AP to each hyperparameter, and seed-paired differences.

Plain data in (dicts and lists, AP in [0, 1]), a PNG out; no tracking or Ray imports, so the
report command and the search draw the same figures.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from harmonic.plots import save_figure

PathLike = str | os.PathLike[str]


def plot_sensitivity(
    sensitivity: Mapping[str, Any],
    path: PathLike,
    *,
    baseline: float | None = None,
    title: str = "AP of each configuration (mean over seeds)",
) -> Path:
    """One scatter panel per hyperparameter: its value against the configuration's objective.

    Args:
        sensitivity: the dict of :func:`workers.evidence.sensitivity` (``params``: name ->
            ``{"values", "objective", "spearman"}``, ``best``, ``tolerance``, ``share_within``),
            objective as AP in [0, 1].
        path: PNG file to write.
        baseline: the baseline's AP (mean over seeds), drawn as a dashed line when given.
        title: figure title.

    Returns:
        ``path``.
    """
    params: Mapping[str, Mapping[str, Any]] = sensitivity.get("params", {})
    names = [n for n, p in params.items() if p.get("values")]
    fig = Figure(figsize=(4.2 * max(1, len(names)), 3.8))
    axes = fig.subplots(1, max(1, len(names)), squeeze=False)[0]
    best = sensitivity.get("best", float("nan"))
    tol = sensitivity.get("tolerance", 0.0)
    for ax, name in zip(axes, names):
        p = params[name]
        xs = list(p["values"])
        ys = [100 * y for y in p["objective"]]
        near = [best - tol <= y / 100 for y in ys] if math.isfinite(best) else [False] * len(ys)
        ax.scatter(
            [x for x, n in zip(xs, near) if not n], [y for y, n in zip(ys, near) if not n], color="tab:blue",
            label="configuration",
        )  # fmt: skip
        ax.scatter(
            [x for x, n in zip(xs, near) if n], [y for y, n in zip(ys, near) if n], color="tab:orange",
            label=f"within {100 * tol:.1f} AP of best",
        )  # fmt: skip
        if baseline is not None and math.isfinite(baseline):
            ax.axhline(100 * baseline, color="black", ls="--", lw=1, label="baseline (standard loss)")
        rho = p.get("spearman", float("nan"))
        ax.set_title(f"{name}  (Spearman {rho:+.2f})" if math.isfinite(rho) else name)
        ax.set_xlabel(name)
        ax.set_ylabel("AP (%)")
        ax.grid(alpha=0.3)
    if not names:
        axes[0].text(0.5, 0.5, "no completed configuration", ha="center", va="center")
        axes[0].set_axis_off()
    else:
        axes[0].legend(fontsize=8)
    share = sensitivity.get("share_within", float("nan"))
    suffix = f" - {100 * share:.0f}% within {100 * tol:.1f} AP of the best" if math.isfinite(share) else ""
    fig.suptitle(title + suffix)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_paired_differences(
    comparison: Mapping[str, Mapping[str, Any]],
    path: PathLike,
    *,
    metrics: Sequence[str] = ("AP", "AP50", "AP75", "AP90"),
    title: str = "Best configuration - baseline, per seed",
) -> Path:
    """Per-seed paired differences with the mean and its 95 % interval, per metric.

    The interval is the one the comparison uses (``ci95_low``/``ci95_high``, its method in
    ``ci_method``: the paired t-interval below 6 seeds, the Hodges-Lehmann interval from 6).

    Args:
        comparison: metric -> the dict of :func:`workers.evidence.paired_comparison` (AP metrics
            in [0, 1]; drawn in AP points).
        path: PNG file to write.
        metrics: which metrics to draw (those missing from ``comparison`` are skipped).
        title: figure title.

    Returns:
        ``path``.
    """
    shown = [m for m in metrics if m in comparison]
    fig = Figure(figsize=(1.8 * max(2, len(shown)) + 1.5, 4.0))
    ax = fig.subplots(1, 1)
    ax.axhline(0.0, color="black", lw=1)
    for i, metric in enumerate(shown):
        comp = comparison[metric]
        diffs = [100 * d["diff"] for d in comp["per_seed"].values()]
        ax.scatter([i] * len(diffs), diffs, color="tab:gray", zorder=3, label="seed" if i == 0 else None)
        mean = 100 * comp["mean_diff"]
        lo, hi = 100 * comp["ci95_low"], 100 * comp["ci95_high"]
        if math.isfinite(lo) and math.isfinite(hi):
            ax.errorbar(
                [i + 0.15], [mean], yerr=[[mean - lo], [hi - mean]], fmt="o", color="tab:red", capsize=5,
                label=f"mean, 95% CI ({comp.get('ci_method', 't')})" if i == 0 else None,
            )  # fmt: skip
        else:
            ax.scatter([i + 0.15], [mean], color="tab:red", label="mean" if i == 0 else None)
        p = comp.get("p_adjusted", comp.get("p_value", float("nan")))
        if math.isfinite(p):
            ax.annotate(f"p adj={p:.3g} ({comp.get('test', '')})", (i, hi if math.isfinite(hi) else mean),
                        textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)  # fmt: skip
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels(shown)
    ax.set_ylabel("difference (AP points)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    if shown:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_mechanism(
    curves: Mapping[str, Mapping[str, Mapping[int, float]]],
    path: PathLike,
    *,
    title: str = "What the loss does to the positives (mean over seeds)",
) -> Path:
    """The training-time mechanism per arm over epochs: the share of positives whose score the loss
    pushes down (dL/dp > 0, Eq. 7), their mean score and all positives' mean score, and the
    training AIC.

    Args:
        curves: arm label -> metric (``train_pushed_down_share``, ``train_pushed_down_mean_score``,
            ``train_mean_score``, ``train_aic``) -> {epoch: value}.
        path: PNG file to write.
        title: figure title.

    Returns:
        ``path``.
    """
    panels = (
        ("train_pushed_down_share", "share of positives pushed down (dL/dp > 0)"),
        ("train_mean_score", "mean score p of the positives"),
        ("train_aic", "training AIC (mean |p - IoU|)"),
    )
    fig = Figure(figsize=(13.0, 3.8))
    axes = fig.subplots(1, len(panels))
    for ax, (key, label) in zip(axes, panels):
        for arm, metrics in curves.items():
            points = sorted((int(e), float(v)) for e, v in metrics.get(key, {}).items() if math.isfinite(v))
            if points:
                ax.plot([e for e, _ in points], [v for _, v in points], marker="o", ms=3, label=arm)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
