"""Seeds in rounds for the fixed arms: with ``evidence.target_halfwidth`` the baseline and the arms
judged against it (the confirmatory arm, ``search.arms``) train on ``min_seeds`` seeds, then
``round_size`` more at a time, until every arm's primary t-mixture interval
(:mod:`workers.evidence.sequential`, at ``alpha / k`` for k arms) is that narrow or the seed cap
(``max_seeds``, ``max_trainings``) is reached. Each interval is anytime-valid, so stopping on all of
them keeps the family's level. The search's trials keep ``search.seeds``.

The seeds are ``search.seeds`` followed by the integers after its largest, so a round's seeds are
known before it starts and a resumed run finds the same ones. After each round the parent run's
``SEEDS_RUN_TAG`` lists every seed started, so the summary pairs them all.

A search's best configuration, confirmed on fresh seeds (``search.confirm_best``), goes on in rounds
too (:func:`run_confirm_rounds`): best vs baseline on the fresh seeds only, at ``alpha`` (it is
judged alone, not in the fixed arms' family), until its interval reaches the target or the fresh
seeds reach ``max_seeds``; ``CONFIRM_SEEDS_TAG`` lists them.

Ray and MLflow are imported inside the functions, like the rest of the search.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from workers.evidence import points_scale
from workers.evidence.sequential import Decision, Rule, should_stop
from workers.spec import Spec
from workers.summary import (
    CONFIRM_SEEDS_TAG,
    CONFIRM_STOP_TAG,
    CONFIRMATORY_ID,
    ROUNDS_STOP_TAG,
    SEEDS_RUN_TAG,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from workers.tracking import TrackingContext

__all__ = [
    "RoundsOutcome",
    "confirm_rule",
    "confirm_seeds",
    "first_round",
    "run_confirm_rounds",
    "run_rounds",
    "seed_sequence",
]


class RoundsOutcome(NamedTuple):
    """How the rounds ended: the decision at the last look, the seeds run, and a failure's reason."""

    decision: Decision | None
    seeds: list[int]
    error: str | None = None


def seed_sequence(spec: Spec, n: int) -> list[int]:
    """The seeds of the fixed arms up to ``n``: ``search.seeds`` (all of them, however many), then the
    integers after its largest."""
    assert spec.search is not None
    seeds = list(spec.search.seeds)
    nxt = max(seeds) + 1
    while len(seeds) < n:
        seeds.append(nxt)
        nxt += 1
    return seeds


def confirm_seeds(spec: Spec) -> list[int]:
    """The fresh seeds the searched best configuration is confirmed on (``search.confirm_best``): as
    many as ``search.seeds``, the integers after its largest; the rounds add the same seeds first, so
    the baseline may have trained them already."""
    assert spec.search is not None
    n = len(spec.search.seeds)
    return seed_sequence(spec, 2 * n)[n:]


def rounds_rule(spec: Spec) -> Rule | None:
    """The evidence rule of each fixed arm (:meth:`Spec.evidence_rule`) when the spec asks for seeds
    in rounds and arms are judged against the baseline, else None."""
    ev, search = spec.evidence, spec.search
    if ev is None or ev.target_halfwidth is None or search is None or not search.compared_arms():
        return None
    return spec.evidence_rule()


def confirm_rule(spec: Spec) -> Rule | None:
    """The rule of the best configuration's confirmation when the spec asks for seeds in rounds: the
    evidence section's own (one arm against the baseline, at ``alpha``), else None (fixed seeds)."""
    ev = spec.evidence
    return ev.rule() if ev is not None and ev.target_halfwidth is not None else None


def first_round(spec: Spec) -> list[int]:
    """The seeds of the fixed arms' first round: ``search.seeds``, extended to ``min_seeds`` with rounds."""
    assert spec.search is not None
    rule = rounds_rule(spec)
    if rule is None:
        return list(spec.search.seeds)
    return seed_sequence(spec, min(max(rule.min_seeds, len(spec.search.seeds)), rule.seed_cap))


def with_seeds(spec_data: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """A spec dict whose ``search.seeds`` are ``seeds`` (what a fixed arm's task trains)."""
    return {**spec_data, "search": {**spec_data["search"], "seeds": list(seeds)}}


def primary_diffs(c: MlflowClient, ctx: TrackingContext, spec: Spec, primary: str) -> dict[str, list[float]]:
    """Each compared arm's primary paired differences (arm - baseline, in table units) over the seeds
    both finished, in seed order, on the split the summary judges on: arm -> differences."""
    from workers.summary import collect_summary

    assert spec.search is not None
    summary = collect_summary(
        c, ctx.experiment_id, ctx.parent_run_id, experiment=ctx.experiment, n_boot=1, history=False
    )
    tables = {CONFIRMATORY_ID: summary.confirmatory_comparison, **summary.arm_comparisons}
    out = {}
    for arm in spec.search.compared_arms():
        per_seed = tables.get(arm, {}).get(primary, {}).get("per_seed", {})
        out[arm] = [points_scale(primary) * float(per_seed[s]["diff"]) for s in sorted(per_seed)]
    return out


def run_rounds(
    spec: Spec,
    ctx: TrackingContext,
    seeds: list[int],
    train_round: Callable[[list[int]], dict[str, str | None]],
) -> RoundsOutcome:
    """Look after each round; train the next until the rule stops (the first round has run).

    Args:
        spec: the spec (its ``evidence`` section asks for rounds).
        ctx: the experiment's tracking context.
        seeds: the seeds the first round trained.
        train_round: trains the fixed arms on new seeds; returns arm -> failure reason or None.

    Returns:
        RoundsOutcome: the last decision (its reason also the parent run's ``ROUNDS_STOP_TAG``), every
        seed started, and the failure that ended the rounds early.
    """
    from workers.tracking import client

    rule = rounds_rule(spec)
    assert rule is not None and spec.evidence is not None
    c = client(ctx.tracking_uri)
    seeds = list(seeds)
    while True:
        by_arm = primary_diffs(c, ctx, spec, spec.evidence.primary)
        short = {arm: len(seeds) - len(d) for arm, d in by_arm.items() if len(d) < len(seeds)}
        if short:
            reason = "; ".join(
                f"{arm}: {n} seed(s) have no {spec.evidence.primary} in both arms" for arm, n in short.items()
            )
            c.set_tag(ctx.parent_run_id, ROUNDS_STOP_TAG, f"stopped: {reason}"[:4000])
            return RoundsOutcome(None, seeds, reason)
        decisions = {arm: should_stop(np.asarray(d), rule) for arm, d in by_arm.items()}
        # the widest arm decides: every interval must reach the target (or the cap stops them all)
        decision = max(decisions.values(), key=lambda d: (not d.stop, d.halfwidth))
        widest = max(decisions, key=lambda a: decisions[a].halfwidth)
        which = f" ({widest}, the widest of {len(decisions)} arms)" if len(decisions) > 1 else ""
        print(
            f"rounds: {len(seeds)} seeds, {spec.evidence.primary} half-width {decision.halfwidth:.3g}{which} "
            f"(target {rule.target_halfwidth:g}): {decision.reason}",
            flush=True,
        )
        if decision.stop:
            c.set_tag(ctx.parent_run_id, ROUNDS_STOP_TAG, decision.reason)
            return RoundsOutcome(decision, seeds)
        new = seed_sequence(spec, min(len(seeds) + rule.round_size, rule.seed_cap))[len(seeds) :]
        failed = _train_round(c, ctx, decision, seeds, new, train_round, SEEDS_RUN_TAG, ROUNDS_STOP_TAG)
        if failed is not None:
            return failed


def _train_round(
    c: MlflowClient,
    ctx: TrackingContext,
    decision: Decision,
    seeds: list[int],
    new: list[int],
    train_round: Callable[[list[int]], dict[str, str | None]],
    seeds_tag: str,
    stop_tag: str,
) -> RoundsOutcome | None:
    """Add ``new`` to ``seeds`` (listed in the parent run's ``seeds_tag`` before they start) and train
    them; a failure ends the rounds, its reason in ``stop_tag``."""
    seeds += new
    c.set_tag(ctx.parent_run_id, seeds_tag, json.dumps(seeds))
    failures = {arm: why for arm, why in train_round(new).items() if why}
    if not failures:
        return None
    reason = "; ".join(f"{arm}: {why}" for arm, why in failures.items())
    c.set_tag(ctx.parent_run_id, stop_tag, f"failed: {reason}"[:4000])
    return RoundsOutcome(decision, seeds, reason)


def confirmed_diffs(c: MlflowClient, ctx: TrackingContext, primary: str) -> list[float]:
    """The primary's paired differences of the confirmed best configuration against the baseline
    (table units), over the fresh seeds both finished, in seed order."""
    from workers.summary import collect_summary

    summary = collect_summary(
        c, ctx.experiment_id, ctx.parent_run_id, experiment=ctx.experiment, n_boot=1, history=False
    )
    confirmed = summary.best_confirmed
    if confirmed is None or confirmed.status != "completed":  # the comparison is not the confirmation's
        return []
    per_seed = summary.comparison.get(primary, {}).get("per_seed", {})
    return [points_scale(primary) * float(per_seed[s]["diff"]) for s in sorted(per_seed)]


def run_confirm_rounds(
    spec: Spec,
    ctx: TrackingContext,
    seeds: list[int],
    train_round: Callable[[list[int]], dict[str, str | None]],
) -> RoundsOutcome:
    """The confirmation of the best configuration in rounds: look after each round (the first, on
    ``seeds``, has run), train the next fresh seeds until :func:`confirm_rule` stops.

    Args:
        spec: the spec (its ``evidence`` section asks for rounds).
        ctx: the experiment's tracking context.
        seeds: the fresh seeds the first round trained (:func:`confirm_seeds`).
        train_round: trains the best configuration (and the baseline where it lacks them) on new
            fresh seeds; returns arm -> failure reason or None.

    Returns:
        RoundsOutcome: the last decision (its reason also the parent run's ``CONFIRM_STOP_TAG``), the
        fresh seeds, and the failure that ended the rounds early.
    """
    from workers.tracking import client

    rule = confirm_rule(spec)
    assert rule is not None and spec.evidence is not None and spec.search is not None
    c = client(ctx.tracking_uri)
    primary, searched = spec.evidence.primary, len(spec.search.seeds)
    seeds = list(seeds)
    while True:
        diffs = confirmed_diffs(c, ctx, primary)
        if len(diffs) < len(seeds):
            reason = f"{len(seeds) - len(diffs)} fresh seed(s) have no {primary} in both arms"
            c.set_tag(ctx.parent_run_id, CONFIRM_STOP_TAG, f"stopped: {reason}")
            return RoundsOutcome(None, seeds, reason)
        decision = should_stop(np.asarray(diffs), rule)
        print(
            f"confirm_best rounds: {len(seeds)} fresh seeds, {primary} half-width {decision.halfwidth:.3g} "
            f"(target {rule.target_halfwidth:g}): {decision.reason}",
            flush=True,
        )
        if decision.stop or decision.next_n is None:
            c.set_tag(ctx.parent_run_id, CONFIRM_STOP_TAG, decision.reason)
            return RoundsOutcome(decision, seeds)
        new = seed_sequence(spec, searched + decision.next_n)[searched + len(seeds) :]
        failed = _train_round(c, ctx, decision, seeds, new, train_round, CONFIRM_SEEDS_TAG, CONFIRM_STOP_TAG)
        if failed is not None:
            return failed
