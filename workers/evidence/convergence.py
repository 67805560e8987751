"""Has an arm stopped improving? A verdict taken while an arm's validation AP still climbs measures how
fast each arm learns, not where it ends; this says so, from the seeds' per-epoch history.

The rule (:func:`plateau`, the one place it is written)
    With ``E`` the last epoch every seed reached and ``k = max(1, E // 4)`` (a quarter of the
    schedule, at least one epoch back), the *gain* is the mean over seeds of ``AP[E] - AP[E - k]``
    and the *spread* is the sample SD over seeds of ``AP[E]``. The arm has **plateaued** when the
    gain is at most the spread: what it still gains over the last quarter is within the seed noise
    the comparison has to see through. The spread is the seeds' SD, not its standard error: the
    standard error shrinks with more seeds, so any slow climb would read "still improving" once
    enough seeds ran, while the question is whether the climb is as large as the seed noise.
    Unknown (None) with fewer than 2 epochs or fewer than 2 seeds.

Pure Python on plain dicts; no MLflow (:func:`workers.summary.collect_summary` reads the history).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from workers.evidence.paired import LOWER_IS_BETTER, points_scale

__all__ = ["plateau", "plateau_sentence"]


def plateau(history: Mapping[Any, Mapping[int, float]], metric: str = "AP") -> dict[str, Any]:
    """Whether an arm's ``metric`` has stopped improving (the rule of the module docstring).

    Args:
        history: seed -> epoch (from 1) -> the metric on the validation split; non-finite values
            are ignored.
        metric: the metric's name (kept in the result; its table units come from it).

    Returns:
        dict: ``metric``, ``n_seeds``, ``last_epoch`` (E), ``back`` (k), ``gain`` (mean over seeds
        of the metric at E minus at E - k), ``seed_sd`` (SD over seeds at E) and ``plateaued``
        (``gain <= seed_sd``; None when it cannot be told, then ``reason`` says why). For a metric
        where lower is better the gain is the decrease.
    """
    clean = {
        s: {int(e): float(v) for e, v in h.items() if v is not None and math.isfinite(float(v))}
        for s, h in history.items()
    }
    clean = {s: h for s, h in clean.items() if h}
    nan = float("nan")
    out: dict[str, Any] = {"metric": metric, "n_seeds": len(clean), "last_epoch": 0, "back": 0,
                           "gain": nan, "seed_sd": nan, "plateaued": None}  # fmt: skip
    if len(clean) < 2:
        out["reason"] = f"{len(clean)} seed{'s' if len(clean) != 1 else ''} with a history: no seed spread"
        return out
    last = min(max(h) for h in clean.values())
    back = max(1, last // 4)
    out["last_epoch"], out["back"] = last, back
    if last - back < 1 or any(last not in h or last - back not in h for h in clean.values()):
        out["reason"] = f"{last} epoch{'s' if last != 1 else ''}: no earlier epoch to compare with"
        return out
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    at_last = np.array([h[last] for h in clean.values()])
    earlier = np.array([h[last - back] for h in clean.values()])
    gain = float(sign * (at_last - earlier).mean())
    sd = float(at_last.std(ddof=1))
    out.update(gain=gain, seed_sd=sd, plateaued=bool(gain <= sd))
    return out


def plateau_sentence(arm: str, result: Mapping[str, Any]) -> str:
    """One line on an arm's convergence, in table units, e.g. ``"baseline still improving: +3.1 AP
    over the last 1 of 3 epochs against a seed SD of 0.9; the verdict compares arms before they
    converged"``."""
    metric = str(result.get("metric", "AP"))
    if result.get("plateaued") is None:
        return f"{arm}: convergence unknown ({result.get('reason', 'no history')})"
    scale = points_scale(metric)
    digits = 1 if scale != 1.0 else 3
    gain, sd = scale * float(result["gain"]), scale * float(result["seed_sd"])
    facts = (
        f"{gain:+.{digits}f} {metric} over the last {result['back']} of {result['last_epoch']} epochs "
        f"against a seed SD of {sd:.{digits}f}"
    )
    if result["plateaued"]:
        return f"{arm} plateaued: {facts}"
    return f"{arm} still improving: {facts}; the verdict compares arms before they converged"
