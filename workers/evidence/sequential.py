"""Seeds in rounds until the primary metric is known to the precision asked for: a stopping rule that
stays valid however often the data are looked at, its four-way verdict, and its simulation.

Why a confidence sequence
    A t-interval recomputed after every round of seeds, with the run stopped once it looks decided,
    is wrong more often than its level says (:func:`simulate` with ``method="t"`` measures
    it). A *confidence sequence* holds the true mean at every n at once with probability >= 1 -
    alpha, so the interval at whatever n the rule stops at keeps its level (Howard, Ramdas,
    McAuliffe & Sekhon 2021, "Time-uniform, nonparametric, nonasymptotic confidence sequences",
    Ann. Statist. 49(2)).

The sequence used: a scale-invariant t-mixture (Lai 1976; Wang & Ramdas 2023)
    For paired differences d_i ~ N(mu, sigma^2) with sigma unknown, Lai ("On confidence
    sequences", Ann. Statist. 4(2), 1976) mixes the likelihood ratio over sigma with the right Haar
    measure d sigma / sigma. Mixing over the standardised effect theta = mu / sigma ~ N(0, 1/c)
    instead of Lai's flat mixture gives, with S = sum(d_i - mu0) and Q = sum((d_i - mu0)^2),

        M_n(mu0) = sqrt(c / (c + n)) * (1 - S^2 / ((c + n) Q)) ** (-n / 2),

    a nonnegative martingale under mu = mu0 in the filtration of the scale-invariant statistics,
    with M_1 = 1 (Wang & Ramdas, "Anytime-valid t-tests and confidence sequences for Gaussian
    means with unknown variance", arXiv:2310.03722, 2023). Ville's inequality gives
    P(exists n: M_n(mu) >= 1/alpha) <= alpha, so ``{mu0: M_n(mu0) < 1/alpha}`` is a confidence
    sequence; solved for mu0 it is ``mean +- h_n`` with the closed form of :func:`halfwidth`. The
    e-value M_n(0) is also an anytime-valid test: p = min(1, 1 / M_n(0)) < alpha exactly when the
    interval excludes 0. The mixture precision c sets the n where the sequence is tightest; it is
    fixed from the plan alone (:meth:`Rule.mixture_precision`), never from the data. Like the
    t-test it assumes normal seed differences; the price of looking after every round is a wider
    interval (about 1.6 times the fixed-n t-interval from 10 seeds on).

Verdicts (:func:`verdict`): ``better`` (interval above 0; for a lower-is-better metric below),
``worse``, ``equivalent`` (interval inside [-margin, +margin]) or ``undecided``, with the seeds
that would likely decide it from the observed SD and the minimum detectable effect at 80 % power.

Pure numpy (scipy only for t quantiles); no Ray, no MLflow.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "METHOD",
    "OUTCOMES",
    "Decision",
    "Rule",
    "SimResult",
    "Verdict",
    "anytime_p",
    "confidence_sequence",
    "family_rule",
    "halfwidth",
    "minimum_detectable_effect",
    "seeds_to_decide",
    "should_stop",
    "simulate",
    "verdict",
]

#: how the interval of a sequential comparison is named in tables (``ci_method``).
METHOD = "t-mixture-cs"
#: the four verdicts of :func:`verdict`.
OUTCOMES = ("better", "worse", "equivalent", "undecided")
#: the power at which the minimum detectable effect is given.
POWER = 0.8
#: the most seeds :func:`seeds_to_decide` looks for.
SEEDS_LOOKED_FOR = 10_000

#: the intervals :func:`simulate` can run: the t-mixture sequence, or the t-interval for a fixed n
#: (valid at one planned n, not when recomputed after every round and stopped on).
Method = Literal["t-mixture", "t"]


@dataclass(frozen=True)
class Rule:
    """The plan of a sequential comparison (validated where it enters: the spec's ``evidence``).

    Attributes:
        alpha: the primary's level (interval 1 - alpha, false-verdict rate <= alpha).
        target_halfwidth: stop once the interval's half-width is at most this (units of the
            differences); None: a fixed number of seeds, ``min_seeds``.
        min_seeds: seeds of the first round.
        max_seeds: the most seeds.
        round_size: seeds added per round.
        max_trainings: budget of trainings over all arms; None: no budget.
        margin: equivalence margin; None: ``target_halfwidth`` (no equivalence verdict without both).
        arms: trainings per seed (baseline and the compared arm: 2).
    """

    alpha: float = 0.05
    target_halfwidth: float | None = None
    min_seeds: int = 5
    max_seeds: int = 64
    round_size: int = 2
    max_trainings: int | None = None
    margin: float | None = None
    arms: int = 2

    @property
    def equivalence_margin(self) -> float | None:
        return self.target_halfwidth if self.margin is None else self.margin

    @property
    def seed_cap(self) -> int:
        """The most seeds the plan can reach: ``max_seeds``, or fewer when the budget says so."""
        cap = self.max_seeds
        if self.max_trainings is not None:
            cap = min(cap, self.max_trainings // self.arms)
        return max(cap, 0)

    @property
    def final_n(self) -> int:
        """The seeds of the last look: the fixed n, or the cap of the rounds."""
        return self.looks()[-1]

    def looks(self) -> list[int]:
        """The numbers of seeds at which the data are looked at: min, min + round, ..., the cap."""
        cap = self.seed_cap
        if self.target_halfwidth is None:
            return [min(self.min_seeds, cap)]
        ns = list(range(min(self.min_seeds, cap), cap + 1, self.round_size))
        if ns[-1] != cap:
            ns.append(cap)
        return ns

    def mixture_precision(self) -> float:
        """c of the t-mixture: the one whose interval is, on average over the plan's looks, the
        least wider than a fixed-n t-interval (mean log ratio of the two half-widths).

        c depends on the plan alone (alpha and the looks), never on the data, so choosing it costs
        no validity.
        """
        return _best_precision(self.alpha, tuple(self.looks()))


@functools.lru_cache(maxsize=256)
def _best_precision(alpha: float, looks: tuple[int, ...]) -> float:
    ns = np.asarray([n for n in looks if n >= 2] or [2], dtype=float)
    grid = np.geomspace(1e-2, 1e2, 401)[:, None]
    widths = halfwidth(ns[None, :], ns[None, :] - 1.0, alpha, grid)
    loss = np.log(widths / _t_halfwidth(ns, np.ones_like(ns), alpha)[None, :]).mean(axis=1)
    return float(grid[int(np.argmin(loss)), 0])


def halfwidth(n: ArrayLike, ss: ArrayLike, alpha: float, c: ArrayLike) -> np.ndarray:
    """Half-width of the t-mixture confidence sequence at n observations.

    ``M_n(mu0) < 1/alpha`` with ``S = n (mean - mu0)``, ``Q = ss + n (mean - mu0)^2`` solves to
    ``(mean - mu0)^2 < k (c + n) ss / (n (n - k (c + n)))`` with
    ``k = 1 - (alpha sqrt(c / (c + n))) ** (2 / n)``; infinite while ``n <= k (c + n)``.

    Args:
        n: observations (broadcast with the others).
        ss: the sum of squared deviations from their mean, ``sum((d - mean)^2)``.
        alpha: 1 - the confidence level.
        c: the mixture precision.

    Returns:
        np.ndarray: the half-width (inf with fewer than 2 observations or too little data).
    """
    n_ = np.asarray(n, dtype=float)
    ss_ = np.asarray(ss, dtype=float)
    c_ = np.asarray(c, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        k = 1.0 - (alpha * np.sqrt(c_ / (c_ + n_))) ** (2.0 / n_)
        denom = n_ - k * (c_ + n_)
        h = np.sqrt(k * (c_ + n_) * ss_ / (n_ * denom))
    return np.where((n_ >= 2) & (denom > 0), h, np.inf)


def _log_e_value(n: np.ndarray, s: np.ndarray, q: np.ndarray, c: float) -> np.ndarray:
    """log M_n(0) of the t-mixture from S = sum(d) and Q = sum(d^2)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(q > 0, s**2 / ((c + n) * q), 0.0)
        return 0.5 * np.log(c / (c + n)) - 0.5 * n * np.log1p(-np.minimum(r, 1.0))


def confidence_sequence(diffs: ArrayLike, rule: Rule) -> tuple[float, float]:
    """The t-mixture interval of the mean of ``diffs`` at their n (valid at any n the rule stops at)."""
    d = np.asarray(diffs, dtype=float)
    if d.size < 2:
        return -math.inf, math.inf
    mean = float(d.mean())
    h = float(halfwidth(d.size, float(((d - mean) ** 2).sum()), rule.alpha, rule.mixture_precision()))
    return mean - h, mean + h


def anytime_p(diffs: ArrayLike, rule: Rule) -> float:
    """``min(1, 1 / M_n(0))``: a p-value valid at any stopping time; below alpha exactly when the
    interval of :func:`confidence_sequence` excludes 0."""
    d = np.asarray(diffs, dtype=float)
    if d.size < 2:
        return 1.0
    log_m = float(
        _log_e_value(
            np.asarray(d.size, float), np.asarray(d.sum()), np.asarray((d**2).sum()), rule.mixture_precision()
        )
    )
    return float(min(1.0, math.exp(-log_m))) if math.isfinite(log_m) else 0.0


def _t_halfwidth(n: np.ndarray, sd: np.ndarray, alpha: float) -> np.ndarray:
    from scipy import stats  # (imported on use: the spec imports this module)

    with np.errstate(invalid="ignore", divide="ignore"):
        q = stats.t.ppf(1 - alpha / 2, np.maximum(n - 1, 1))
        return np.where(n >= 2, q * sd / np.sqrt(n), np.inf)


def minimum_detectable_effect(n: int, sd: float, rule: Rule, method: Method = "t-mixture") -> float:
    """The smallest true difference found (interval excluding 0 in its direction) with 80 % power at n.

    For an interval ``mean +- h_n`` this is ``h_n + z_0.8 sd / sqrt(n)`` (the mean must land beyond
    h_n in 80 % of experiments), with h_n at the observed SD.
    """
    if n < 2 or not math.isfinite(sd):
        return math.inf
    z = NormalDist().inv_cdf(POWER)
    if method == "t":
        h = float(_t_halfwidth(np.asarray(float(n)), np.asarray(sd), rule.alpha))
    else:
        h = float(halfwidth(n, (n - 1) * sd**2, rule.alpha, rule.mixture_precision()))
    return h + z * sd / math.sqrt(n)


def seeds_to_decide(estimate: float, sd: float, rule: Rule) -> int | None:
    """The seeds at which the interval would likely decide, if the observed mean and SD held.

    Decided: the interval excludes 0 (``h < |estimate|``) or lies inside ±margin
    (``h < margin - |estimate|``); h is the rule's own interval (:func:`rule_method`: the
    t-interval of a fixed n planned in advance, else the t-mixture sequence). None when no n up to
    :data:`SEEDS_LOOKED_FOR` would.
    """
    if not (math.isfinite(estimate) and math.isfinite(sd)):
        return None
    need = abs(estimate)
    margin = rule.equivalence_margin
    if margin is not None:
        need = max(need, margin - abs(estimate))
    if sd == 0:
        return 2
    if need <= 0:
        return None
    ns = np.arange(2, SEEDS_LOOKED_FOR + 1, dtype=float)
    if rule_method(rule) == "t":
        h = _t_halfwidth(ns, np.full_like(ns, sd), rule.alpha)
    else:
        h = halfwidth(ns, (ns - 1) * sd**2, rule.alpha, rule.mixture_precision())
    ok = np.flatnonzero(h < need)
    return int(ns[ok[0]]) if ok.size else None


@dataclass(frozen=True)
class Decision:
    """Whether to stop after a round: ``reason`` is ``target reached``, ``max seeds``, ``budget``,
    ``fixed seeds`` or ``continue`` (then ``next_n`` is the seeds of the next round)."""

    stop: bool
    reason: str
    n: int
    halfwidth: float
    next_n: int | None = None


def should_stop(diffs: ArrayLike, rule: Rule) -> Decision:
    """Stop when the t-mixture half-width is at most the target, or the seed cap is reached.

    Args:
        diffs: the paired differences of the primary so far, one per seed.
        rule: the plan.
    """
    d = np.asarray(diffs, dtype=float)
    n = int(d.size)
    lo, hi = confidence_sequence(d, rule)
    h = (hi - lo) / 2
    if rule.target_halfwidth is None:
        return Decision(
            n >= rule.min_seeds,
            "fixed seeds" if n >= rule.min_seeds else "continue",
            n,
            h,
            None if n >= rule.min_seeds else rule.min_seeds,
        )
    if n >= rule.min_seeds and h <= rule.target_halfwidth:
        return Decision(True, "target reached", n, h)
    if n >= rule.seed_cap:
        capped_by_budget = rule.max_trainings is not None and rule.seed_cap < rule.max_seeds
        return Decision(True, "budget" if capped_by_budget else "max seeds", n, h)
    nxt = next(k for k in rule.looks() if k > n)
    return Decision(False, "continue", n, h, nxt)


def family_rule(rule: Rule, k: int) -> Rule:
    """The rule of each of ``k`` arms judged against one baseline on the same seeds: Bonferroni, each
    arm's test and interval at ``alpha / k``, so the chance of any false verdict across the arms is
    at most ``alpha`` whatever their dependence (they share the baseline); ``1 + k`` trainings a seed."""
    k = max(1, int(k))
    return replace(rule, alpha=rule.alpha / k, arms=1 + k)


@dataclass(frozen=True)
class Verdict:
    """The verdict of a sequential comparison on its primary metric (units of the differences).

    ``outcome`` is one of :data:`OUTCOMES`; ``within_margin`` flags a better/worse difference whose
    whole interval is still inside ±margin (real but smaller than the margin).
    """

    outcome: str
    n: int
    estimate: float
    low: float
    high: float
    sd: float
    alpha: float
    margin: float | None
    p_value: float
    mde: float
    seeds_to_decide: int | None
    within_margin: bool = False
    method: str = METHOD

    @property
    def halfwidth(self) -> float:
        return (self.high - self.low) / 2


def verdict(diffs: ArrayLike, rule: Rule, *, higher_is_better: bool = True) -> Verdict:
    """The four-way verdict of the t-mixture interval of the mean of ``diffs``."""
    d = np.asarray(diffs, dtype=float)
    n = int(d.size)
    lo, hi = confidence_sequence(d, rule)
    mean = float(d.mean()) if n else math.nan
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    return _four_way(
        n,
        mean,
        lo,
        hi,
        sd,
        rule,
        higher_is_better,
        anytime_p(d, rule),
        minimum_detectable_effect(n, sd, rule),
    )


def _four_way(
    n: int,
    mean: float,
    lo: float,
    hi: float,
    sd: float,
    rule: Rule,
    higher_is_better: bool,
    p: float,
    mde: float,
    method: str = METHOD,
) -> Verdict:
    margin = rule.equivalence_margin
    inside = margin is not None and -margin <= lo and hi <= margin
    if lo > 0 or hi < 0:
        outcome = "better" if (lo > 0) == higher_is_better else "worse"
    elif inside:
        outcome = "equivalent"
    else:
        outcome = "undecided"
    to_decide = seeds_to_decide(mean, sd, rule) if outcome == "undecided" else None
    return Verdict(
        outcome,
        n,
        mean,
        lo,
        hi,
        sd,
        rule.alpha,
        margin,
        p,
        mde,
        to_decide,
        within_margin=inside and outcome in ("better", "worse"),
        method=method,
    )


def fixed_verdict(
    n: int,
    estimate: float,
    low: float,
    high: float,
    sd: float,
    p: float,
    rule: Rule,
    *,
    higher_is_better: bool = True,
    method: str = "t",
) -> Verdict:
    """The four-way verdict of a fixed-seed interval (a comparison whose seeds were not chosen by
    looking); its minimum detectable effect is the t-test's at n."""
    return _four_way(
        n,
        estimate,
        low,
        high,
        sd,
        rule,
        higher_is_better,
        p,
        minimum_detectable_effect(n, sd, rule, "t"),
        method,
    )


@dataclass
class SimResult:
    """What :func:`simulate` measured over ``n_experiments`` simulated comparisons."""

    method: str
    true_diff: float
    sd: float
    n_experiments: int
    false_verdict_rate: float
    coverage: float
    mean_seeds: float
    p90_seeds: float
    outcomes: dict[str, float] = field(default_factory=dict)
    stop_reasons: dict[str, float] = field(default_factory=dict)
    seeds: np.ndarray = field(default_factory=lambda: np.zeros(0, int), repr=False)

    def mc_error(self, rate: float) -> float:
        """Monte-Carlo standard error of a rate measured over the experiments."""
        return math.sqrt(max(rate * (1 - rate), 1e-12) / self.n_experiments)

    def as_dict(self) -> dict[str, Any]:
        """Every measure (not the seeds of each experiment)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "seeds"}


def rule_method(rule: Rule) -> Method:
    """The interval a rule is judged with: the t-mixture sequence when it looks more than once."""
    return "t" if rule.target_halfwidth is None else "t-mixture"


def simulate(
    sd: float,
    true_diff: float,
    rule: Rule,
    n_experiments: int,
    rng: np.random.Generator,
    *,
    method: Method | None = None,
    stop_when_decided: bool = False,
) -> SimResult:
    """Run the rule on ``n_experiments`` simulated comparisons with normal paired differences.

    Args:
        sd: SD of the paired differences.
        true_diff: their true mean.
        rule: the plan (looks, target, cap, alpha, margin).
        n_experiments: simulated comparisons (vectorised: one matrix of draws).
        rng: the random generator.
        method: ``t-mixture`` (the sequence) or ``t`` (the t-interval of a fixed n: valid for a
            rule with one look, invalid when recomputed at every look and stopped on); None: the
            rule's own (:func:`rule_method`).
        stop_when_decided: also stop at a look whose interval excludes 0 (what a person peeking
            at a t-interval does).

    Returns:
        SimResult: the rate of false verdicts (better or worse against the true sign, or
        equivalent when the truth lies outside ±margin), the interval's coverage of the truth at
        the stopping n, the mean and 90th percentile of the seeds used, and the share of each
        outcome and stop reason.
    """
    method = rule_method(rule) if method is None else method
    looks = np.asarray(rule.looks(), dtype=int)
    x = rng.normal(true_diff, sd, size=(n_experiments, int(looks[-1])))
    s = np.cumsum(x, axis=1)[:, looks - 1]
    q = np.cumsum(x**2, axis=1)[:, looks - 1]
    n = looks.astype(float)[None, :]
    mean = s / n
    ss = np.maximum(q - n * mean**2, 0.0)
    if method == "t-mixture":
        h = halfwidth(n, ss, rule.alpha, rule.mixture_precision())
    else:
        h = _t_halfwidth(n, np.sqrt(ss / np.maximum(n - 1, 1)), rule.alpha)
    lo, hi = mean - h, mean + h
    stop = np.zeros_like(h, dtype=bool)
    if rule.target_halfwidth is not None:
        stop |= (h <= rule.target_halfwidth) & (n >= rule.min_seeds)
    if stop_when_decided:
        stop |= (lo > 0) | (hi < 0)
    stop[:, -1] = True
    at = np.argmax(stop, axis=1)
    rows = np.arange(n_experiments)
    lo_s, hi_s, n_s = lo[rows, at], hi[rows, at], looks[at]
    reached = (
        (h[rows, at] <= rule.target_halfwidth)
        if rule.target_halfwidth is not None
        else np.ones(n_experiments, bool)
    )
    margin = rule.equivalence_margin
    better, worse = lo_s > 0, hi_s < 0
    equivalent = (
        ~better
        & ~worse
        & ((lo_s >= -margin) & (hi_s <= margin) if margin is not None else np.zeros(n_experiments, bool))
    )
    false = (better & (true_diff <= 0)) | (worse & (true_diff >= 0))
    if margin is not None:
        false |= equivalent & (abs(true_diff) >= margin)
    undecided = ~(better | worse | equivalent)
    return SimResult(
        method=method,
        true_diff=true_diff,
        sd=sd,
        n_experiments=n_experiments,
        false_verdict_rate=float(false.mean()),
        coverage=float(((lo_s <= true_diff) & (true_diff <= hi_s)).mean()),
        mean_seeds=float(n_s.mean()),
        p90_seeds=float(np.quantile(n_s, 0.9)),
        outcomes={
            "better": float(better.mean()),
            "worse": float(worse.mean()),
            "equivalent": float(equivalent.mean()),
            "undecided": float(undecided.mean()),
        },
        stop_reasons={"target reached": float(reached.mean()), "cap": float((~reached).mean())},
        seeds=n_s,
    )


def describe(rule: Rule) -> str:
    """The rule in one line, for tables and the planner."""
    if rule.target_halfwidth is None:
        return f"{rule.min_seeds} fixed seeds"
    budget = f", at most {rule.max_trainings} trainings" if rule.max_trainings is not None else ""
    return (
        f"t-mixture confidence sequence (Lai 1976; Wang & Ramdas 2023) at alpha {rule.alpha:g} "
        f"(c = {rule.mixture_precision():.3g}): "
        f"{rule.min_seeds} seeds, then {rule.round_size} per round until the half-width is <= "
        f"{rule.target_halfwidth:.3g} or {rule.max_seeds} seeds{budget}"
    )


def looks_text(looks: Sequence[int]) -> str:
    return ", ".join(map(str, looks[:6])) + (f", ..., {looks[-1]}" if len(looks) > 6 else "")
