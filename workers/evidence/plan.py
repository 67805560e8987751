"""``hdet plan``: how many seeds, trainings and hours a comparison needs, before anything trains.

Given the SD of the paired differences of the primary metric (from ``--sd``, or measured in a
finished experiment with ``--from-run``) and the evidence rule (a spec's ``evidence`` section, or
the flags), it runs the rule on simulated experiments (:func:`workers.evidence.sequential.simulate`)
and prints what it measured there: the seeds (mean and 90th percentile), the trainings (2 arms x
seeds), the wall time in rounds of ``--parallel`` trainings, and the false-verdict rate and
coverage of the interval. With ``--effect`` the target half-width is chosen so that a true
difference of that size is found with about 80 % power, and the power is measured too.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.evidence.paired import points_scale
from workers.evidence.sequential import (
    POWER,
    Rule,
    SimResult,
    describe,
    halfwidth,
    minimum_detectable_effect,
    rule_method,
    simulate,
)

__all__ = ["Plan", "make_plan", "main", "sd_from_run"]


@dataclass
class Plan:
    """What :func:`make_plan` measured; times in minutes, differences in the primary's table units."""

    rule: Rule
    sd: float
    effect: float | None
    null: SimResult  # no true difference: false verdicts, coverage, seeds
    alternative: SimResult | None  # a true difference of ``effect``: power, seeds
    minutes_per_training: float | None
    parallel: int
    mde_at_cap: float

    def minutes(self, n: int) -> float:
        """Wall time of a comparison that stops at ``n`` seeds: its rounds one after the other, each
        round's trainings ``parallel`` at a time."""
        if self.minutes_per_training is None:
            return math.nan
        looks = [k for k in self.rule.looks() if k <= n] or [n]
        sizes = np.diff([0, *looks])
        waves = np.ceil(self.rule.arms * sizes / self.parallel)
        return float(waves.sum() * self.minutes_per_training)

    def lines(self) -> list[str]:
        r, null = self.rule, self.null
        out = [f"rule: {describe(r)}", f"paired-difference SD of the primary: {self.sd:g}"]
        if self.effect is not None:
            out.append(
                f"effect to detect: {self.effect:g} -> target half-width {r.target_halfwidth:.3g} (the "
                f"interval's at the first round where it is found with {POWER:.0%} power, else at the last)"
            )
        runs = [("no true difference", null)] + (
            [(f"true difference {self.effect:g}", self.alternative)] if self.alternative is not None else []
        )
        for label, sim in runs:
            assert sim is not None
            seeds = sim.seeds
            p90 = int(np.quantile(seeds, 0.9))
            line = (
                f"{label}: seeds {sim.mean_seeds:.1f} expected, {p90} at the 90th percentile (at most {r.final_n}); "
                f"trainings {r.arms * sim.mean_seeds:.0f} expected, {r.arms * p90} at the 90th percentile"
            )
            if self.minutes_per_training is not None:
                expected = float(np.mean([self.minutes(int(n)) for n in seeds]))
                line += (
                    f"; time {_hours(expected)} expected, {_hours(self.minutes(p90))} at the 90th percentile "
                    f"({self.parallel} at a time)"
                )
            out.append(line)
        out.append(
            f"measured over {null.n_experiments} simulated experiments: false-verdict rate "
            f"{null.false_verdict_rate:.2%} (alpha {r.alpha:g}), coverage {null.coverage:.2%} "
            f"(at least {1 - r.alpha:.0%} asked)"
        )
        if self.alternative is not None:
            alt = self.alternative
            out.append(
                f"with a true difference of {self.effect:g}: found (better) in {alt.outcomes['better']:.1%}, "
                f"false verdicts {alt.false_verdict_rate:.2%}, coverage {alt.coverage:.2%}"
            )
        out.append(
            f"smallest difference detectable with {POWER:.0%} power at {r.final_n} seeds: {self.mde_at_cap:.3g}"
        )
        if self.effect is not None and self.mde_at_cap > self.effect:
            out.append(
                f"warning: {self.effect:g} cannot be found with {POWER:.0%} power within {r.final_n} seeds; "
                "raise max_seeds or the budget, or accept a larger effect"
            )
        return out


def _hours(minutes: float) -> str:
    return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def make_plan(
    sd: float,
    rule: Rule,
    *,
    effect: float | None = None,
    minutes_per_training: float | None = None,
    parallel: int = 1,
    n_experiments: int = 4000,
    seed: int = 0,
) -> Plan:
    """Simulate ``rule`` at the expected SD (and at a true ``effect``, which then sets the target).

    Args:
        sd: expected SD of the paired differences (table units: AP points).
        rule: the evidence rule.
        effect: the smallest true difference worth finding; sets ``rule.target_halfwidth`` to the
            half-width at the first n where the difference is found with 80 % power.
        minutes_per_training: one training's wall time (None: no time estimate).
        parallel: trainings run at once.
        n_experiments: simulated experiments per scenario.
        seed: the simulation's random seed.

    Raises:
        ValueError: an input out of range (the message names it).
    """
    if not (math.isfinite(sd) and sd > 0):
        raise ValueError(f"--sd: must be > 0, got {sd}")
    if parallel < 1:
        raise ValueError(f"--parallel: must be >= 1, got {parallel}")
    if minutes_per_training is not None and not minutes_per_training > 0:
        raise ValueError(f"--minutes-per-training: must be > 0, got {minutes_per_training}")
    if effect is not None:
        if not effect > 0:
            raise ValueError(f"--effect: must be > 0, got {effect}")
        rule = _rule_for_effect(sd, effect, rule)
    rng = np.random.default_rng(seed)
    null = simulate(sd, 0.0, rule, n_experiments, rng)
    alternative = simulate(sd, effect, rule, n_experiments, rng) if effect is not None else None
    mde = minimum_detectable_effect(rule.final_n, sd, rule, rule_method(rule))
    return Plan(rule, sd, effect, null, alternative, minutes_per_training, parallel, mde)


def _rule_for_effect(sd: float, effect: float, rule: Rule) -> Rule:
    """The rule whose target half-width is the sequence's at the first look where ``effect`` is the
    minimum detectable effect (the seed cap's when no look gets there)."""
    sequential = (
        rule if rule.target_halfwidth is not None else dataclasses.replace(rule, target_halfwidth=math.inf)
    )
    looks = sequential.looks()
    n = next((k for k in looks if minimum_detectable_effect(k, sd, sequential) <= effect), looks[-1])
    h = float(halfwidth(n, (n - 1) * sd**2, rule.alpha, sequential.mixture_precision()))
    return dataclasses.replace(sequential, target_halfwidth=h)


def sd_from_run(run_id: str, tracking_uri: str | None = None) -> tuple[float, str]:
    """The SD of the primary's paired differences in a finished experiment (its parent run id), in
    table units, and where it came from (the confirmatory comparison, else the best one)."""
    from mlflow.exceptions import MlflowException

    from workers.summary import collect_summary
    from workers.tracking import client, resolve_tracking_uri

    c = client(resolve_tracking_uri(cli_uri=tracking_uri))
    try:
        run = c.get_run(run_id)
    except MlflowException as e:
        raise LookupError(f"--from-run: {e.message}") from None
    summary = collect_summary(c, run.info.experiment_id, run_id, n_boot=1, history=False)
    for name, table in (("confirmatory", summary.confirmatory_comparison), ("best", summary.comparison)):
        primary = next((m for m, comp in table.items() if comp.get("role") == "primary"), None)
        if primary is not None:
            comp = table[primary]
            sd = float(comp["std_diff"]) * points_scale(primary)
            if math.isfinite(sd):
                return (
                    sd,
                    f"{primary} of the {name} comparison of run {run_id} ({comp['n_pairs']} paired seeds)",
                )
    raise LookupError(f"run {run_id} has no comparison with two or more paired seeds to take an SD from")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hdet plan",
        description="How many seeds, trainings and hours a comparison needs, measured by simulation.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--sd", type=float, help="expected SD of the paired differences (AP points for AP)")
    src.add_argument("--from-run", metavar="PARENT_RUN_ID", help="take the SD from a finished experiment")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for --from-run (default: as hdet run)")
    p.add_argument("--spec", help="a spec file whose evidence section is the rule (flags override it)")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--target-halfwidth", type=float, help="stop when the interval is this narrow")
    goal.add_argument("--effect", type=float, help="the smallest true difference worth finding (80%% power)")
    p.add_argument("--alpha", type=float)
    p.add_argument("--min-seeds", type=int)
    p.add_argument("--max-seeds", type=int)
    p.add_argument("--round-size", type=int)
    p.add_argument("--max-trainings", type=int)
    p.add_argument("--equivalence-margin", type=float)
    p.add_argument("--minutes-per-training", type=float, help="one training's wall time")
    p.add_argument("--parallel", type=int, default=1, help="trainings at once (default 1)")
    p.add_argument("--experiments", type=int, default=4000, help="simulated experiments (default 4000)")
    p.add_argument("--seed", type=int, default=0, help="the simulation's seed")
    return p


def _rule(args: argparse.Namespace) -> Rule:
    """The evidence section of ``--spec`` (or the defaults) with the flags given, validated as a spec's."""
    from pydantic import ValidationError

    from workers.spec import EvidenceSpec, Spec, SpecError
    from workers.spec.base import _problems

    data: dict[str, Any] = {}
    k = 1  # the arms judged against the baseline (a spec's confirmatory arm and search.arms)
    if args.spec:
        spec = Spec.from_file(args.spec, check_paths=False)
        if spec.evidence is not None:
            data = spec.evidence.model_dump()
        if spec.search is not None:
            k = max(1, len(spec.search.compared_arms()))
    for name in (
        "alpha",
        "min_seeds",
        "max_seeds",
        "round_size",
        "max_trainings",
        "equivalence_margin",
        "target_halfwidth",
    ):
        value = getattr(args, name)
        if value is not None:
            data[name] = value
    if args.effect is not None:
        data["target_halfwidth"] = 1.0  # a placeholder: make_plan chooses it from the effect
    try:
        section = EvidenceSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError([(f"evidence.{path}", msg) for path, msg in _problems(e)], "plan") from None
    from workers.evidence.sequential import family_rule

    rule = family_rule(section.rule(), k)
    return dataclasses.replace(rule, target_halfwidth=None) if args.effect is not None else rule


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from workers.spec import SpecError

    try:
        rule = _rule(args)
        if args.sd is not None:
            sd, source = args.sd, "given"
        else:
            sd, source = sd_from_run(args.from_run, args.tracking_uri)
        plan = make_plan(
            sd,
            rule,
            effect=args.effect,
            minutes_per_training=args.minutes_per_training,
            parallel=args.parallel,
            n_experiments=args.experiments,
            seed=args.seed,
        )
    except (SpecError, ValueError, LookupError) as e:
        print(f"hdet plan: {e}", file=sys.stderr)
        return 2
    lines = plan.lines()
    lines[1] += f" ({source})"
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
