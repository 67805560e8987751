"""Per-seed metrics summarised: mean and spread per configuration, and how sensitive AP is to each
searched parameter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from workers.evidence.paired import EvidenceError


def aggregate_seeds(per_seed: Mapping[Any, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of each metric over seeds.

    Args:
        per_seed (Mapping[seed, Mapping[metric, float]]): metrics of each seed; non-numeric and
            non-finite values are ignored.

    Returns:
        dict: metric -> ``{"mean", "std", "n"}`` (``std`` is the sample standard deviation,
        ``ddof=1``; 0 with a single seed).
    """
    values: dict[str, list[float]] = {}
    for metrics in per_seed.values():
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(float(value)):
                values.setdefault(key, []).append(float(value))
    out: dict[str, dict[str, float]] = {}
    for key, vals in values.items():
        arr = np.asarray(vals)
        out[key] = {
            "mean": float(arr.mean()),
            "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "n": float(len(arr)),
        }
    return out


def sensitivity(
    configs: Iterable[Mapping[str, Any]],
    params: Sequence[str] = ("alpha", "gamma", "margin"),
    *,
    tolerance: float = 0.5,
) -> dict[str, Any]:
    """How much the objective depends on each hyperparameter, and how flat the optimum is.

    Args:
        configs (Iterable[Mapping]): one entry per configuration, ``{"params": {name: value},
            "objective": float | None}``; entries whose objective is missing or not finite
            (failed trials) are counted in ``n_failed`` and otherwise ignored. A parameter name
            matches either exactly or as the last part of a dotted name (``alpha`` matches
            ``loss.alpha``).
        params (Sequence[str]): the parameters to analyse.
        tolerance (float): width of the "near the best" band, in the objective's units (0.5 AP
            points when AP is on the 0-100 scale).

    Returns:
        dict: ``best`` (objective), ``tolerance``, ``n_configs``, ``n_failed``, ``n_within`` and
        ``share_within`` (configurations whose objective is within ``tolerance`` of the best,
        the best included), and ``params``: name -> ``{"values", "objective", "spearman"}``
        (scatter data and the Spearman rank correlation of value and objective; NaN when the
        parameter is constant or has fewer than 3 points).
    """
    if tolerance < 0:
        raise EvidenceError(f"tolerance: must be >= 0, got {tolerance}")
    ok: list[tuple[Mapping[str, Any], float]] = []
    n_failed = 0
    for cfg in configs:
        obj = cfg.get("objective")
        if obj is None or not math.isfinite(float(obj)):
            n_failed += 1
            continue
        ok.append((cfg.get("params", {}), float(obj)))
    result: dict[str, Any] = {
        "best": float("nan"),
        "tolerance": tolerance,
        "n_configs": len(ok),
        "n_failed": n_failed,
        "n_within": 0,
        "share_within": float("nan"),
        "params": {},
    }
    if not ok:
        return result
    objs = np.array([o for _, o in ok])
    best = float(objs.max())
    n_within = int((objs >= best - tolerance).sum())
    result.update(best=best, n_within=n_within, share_within=n_within / len(ok))
    for name in params:
        xs: list[float] = []
        ys: list[float] = []
        for p, obj in ok:
            value = _lookup_param(p, name)
            if value is None:
                continue
            xs.append(float(value))
            ys.append(obj)
        if not xs:
            continue
        rho = float("nan")
        if len(xs) >= 3 and len(set(xs)) > 1 and len(set(ys)) > 1:
            from scipy import stats

            rho = float(stats.spearmanr(xs, ys).statistic)
        result["params"][name] = {"values": xs, "objective": ys, "spearman": rho}
    return result


def _lookup_param(params: Mapping[str, Any], name: str) -> float | None:
    if name in params:
        value = params[name]
    else:
        matches = [k for k in params if k.rsplit(".", 1)[-1] == name]
        if len(matches) != 1:
            return None
        value = params[matches[0]]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
