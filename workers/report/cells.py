"""How one number of a report is written: AP in points, p-values, mean ± sd over seeds, durations.
Shared by every renderer of workers.report (Markdown/HTML document, terminal table).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.summary import TrialRecord


def points(v: float | None, scale: float = 100.0, digits: int = 1, sign: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{scale * v:{'+' if sign else ''}.{digits}f}"


def scale_of(metric: str) -> tuple[float, int]:
    return (100.0, 1) if metric.startswith("AP") or metric.startswith("ap_iou") else (1.0, 3)


def seed_mean_sd(rec: TrialRecord, metric: str) -> str:
    from workers.evidence import aggregate_seeds

    vals = {s: {metric: m[metric]} for s, m in rec.per_seed.items() if metric in m}
    if not vals:
        return "-"
    a = aggregate_seeds(vals)[metric]
    scale, digits = scale_of(metric)
    return f"{points(a['mean'], scale, digits)} ± {points(a['std'], scale, digits)}"


def arm_mean_sd_cell(comp: Mapping[str, Any], arm: str, metric: str) -> str:
    """One arm's mean ± sd over the paired seeds of a comparison: the values its diff is made of."""
    from workers.evidence import arm_mean_sd

    mean, sd = arm_mean_sd(comp, arm)
    scale, digits = scale_of(metric)
    return f"{points(mean, scale, digits)} ± {points(sd, scale, digits)}" if math.isfinite(mean) else "-"


def fmt_value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def pval(p: float) -> str:
    return f"{p:.3g}" if math.isfinite(p) else "-"


def num(v: float, digits: int = 0) -> str:
    return f"{v:.{digits}f}" if v is not None and math.isfinite(v) else "-"
