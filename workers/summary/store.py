"""A search's summary in MLflow: collect_summary reads it back from the runs, log_summary writes it.
One child run per trial and seed, tagged (workers.tracking.Tag) under the search's parent run.

:func:`collect_summary` rebuilds a :class:`SearchSummary` from those runs alone, so a summary can
be made for a search that ran on any cluster, or was interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.evidence import aggregate_seeds, compare_metrics, plateau, sensitivity
from workers.evidence.arms import FAMILY_METHOD, family_adjust, rank_arms
from workers.evidence.sequential import Rule, family_rule
from workers.summary.records import (
    BASELINE_ID,
    BEST_CONFIRMED_ID,
    COMPARED_METRICS,
    CONFIRM_SEEDS_TAG,
    CONFIRMATORY_ID,
    LISTED_ARM,
    MECHANISM_METRICS,
    NEAR_BEST,
    OBJECTIVE,
    PRIMARY_OUTCOME_TAG,
    REPORTED_METRICS,
    SEEDS_RUN_TAG,
    SUMMARY_ARTIFACT,
    TEST_PREFIX,
    SearchSummary,
    TrialRecord,
    at_score_thresh,
    score_thresh_of,
    split_metrics,
)
from workers.tracking import Tag

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = ["collect_summary", "log_summary", "epoch_history", "evidence_plan", "family_names", "arm_label"]


def collect_summary(
    c: MlflowClient,
    experiment_id: str,
    parent_run_id: str,
    *,
    experiment: str = "",
    n_boot: int = 10000,
    history: bool = True,
) -> SearchSummary:
    """Rebuild a search's summary from MLflow alone: the parent run and its child runs.

    Args:
        c: an MLflow client of the tracking server.
        experiment_id: the MLflow experiment.
        parent_run_id: the search's parent run.
        experiment: the experiment's name (for display).
        n_boot: bootstrap resamples of the paired comparison.
        history: read the per-epoch history of the compared arms (the mechanism curves and whether
            each arm converged: one MLflow call per child run and metric); False leaves them empty.

    Returns:
        SearchSummary: every trial found (grouped by the ``Tag.TRIAL_ID`` tag of the child
        runs), the best completed configuration, the paired comparisons with the baseline, the
        sensitivity, the AP-vs-IoU curves, the training-time mechanism, whether each compared
        arm's validation AP had plateaued, and the primary's comparisons on the test split at each of
        ``eval.extra_score_thresholds``.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    parent = c.get_run(parent_run_id)
    p = parent.data.params
    epochs = int(p.get("train.epochs", "0") or 0)
    seeds = json.loads(p.get("search.seeds", "[]") or "[]")
    # seeds in rounds extend the fixed arms beyond search.seeds; the searched configurations keep them
    fixed_seeds = json.loads(parent.data.tags.get(SEEDS_RUN_TAG, "null") or "null") or seeds
    children: list[Any] = []
    token = None
    while True:
        page = c.search_runs(
            [experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'",
            max_results=1000, page_token=token,
        )  # fmt: skip
        children.extend(page)
        token = page.token
        if not token:
            break
    groups: dict[str, list[Any]] = {}
    for run in children:
        tid = run.data.tags.get(Tag.TRIAL_ID)
        if tid:
            groups.setdefault(tid, []).append(run)
    # the best configuration trained again on fresh seeds (search.confirm_best)
    confirm_seeds = [
        int(x) for x in json.loads(parent.data.tags.get(CONFIRM_SEEDS_TAG, "null") or "null") or []
    ]
    seeds_of = {BASELINE_ID: fixed_seeds, CONFIRMATORY_ID: fixed_seeds, BEST_CONFIRMED_ID: confirm_seeds,
                LISTED_ARM: fixed_seeds}  # fmt: skip
    records: list[TrialRecord] = []
    listed: list[TrialRecord] = []
    fixed: dict[str, TrialRecord] = {}
    for tid, runs in groups.items():
        arm = runs[0].data.tags.get(Tag.ARM)
        rec = _record(tid, runs, seeds_of.get(str(arm), seeds), epochs)
        if rec.arm == LISTED_ARM:
            listed.append(rec)
        elif rec.arm in seeds_of:
            fixed[rec.arm] = rec
        else:
            records.append(rec)
    records.sort(key=lambda r: r.trial_id)
    listed.sort(key=lambda r: r.trial_id)
    baseline, confirmatory = fixed.get(BASELINE_ID), fixed.get(CONFIRMATORY_ID)
    best_confirmed = fixed.get(BEST_CONFIRMED_ID)
    # a confirmation that did not complete leaves the verdict to the seeds that selected the best
    confirmed = (
        best_confirmed if best_confirmed is not None and best_confirmed.status == "completed" else None
    )

    completed = [r for r in records if r.status == "completed" and r.objective is not None]
    best = max(completed, key=lambda r: r.objective or -1.0, default=None)
    # Judge on the held-out test split when every arm compared has it on every seed.
    judged = [
        (a, seeds_of.get(a.arm, seeds))
        for a in (best, confirmatory, baseline, confirmed, *(r for r in listed if r.status == "completed"))
        if a is not None
    ]
    if baseline is not None and confirmed is not None:
        judged.append((baseline, confirm_seeds))
    on_test = bool(judged) and all(_has_test(a, arm_seeds) for a, arm_seeds in judged)
    prefix = TEST_PREFIX if on_test else ""
    comparison: dict[str, dict[str, Any]] = {}
    exploratory_comparison: dict[str, dict[str, Any]] = {}
    confirmatory_comparison: dict[str, dict[str, Any]] = {}
    primary, rule = evidence_plan(p)
    # the arms judged against the baseline are one family: each at alpha / k (Bonferroni)
    family = family_names(p)
    arm_rule = family_rule(rule, len(family))
    arm_comparisons: dict[str, dict[str, dict[str, Any]]] = {}
    # the best configuration ran on fixed seeds: its primary gets the fixed-n interval
    fixed_n = dataclasses.replace(rule, target_halfwidth=None, margin=rule.equivalence_margin)
    # its confirmation on fresh seeds went on in rounds when the spec asks for them: anytime-valid
    confirm_rule = rule if rule.target_halfwidth is not None else fixed_n
    # table -> (treatment, the seeds it is paired with the baseline on, the rule of its primary)
    pairings: dict[str, tuple[TrialRecord, list[int], Rule]] = {}
    if baseline is not None and baseline.per_seed:
        base_metrics = _split_metrics(baseline, prefix)

        def base_on(keep: list[int]) -> dict[int, dict[str, float]]:
            return {s: m for s, m in base_metrics.items() if s in keep}

        if best is not None:
            comparison = compare_metrics(
                _split_metrics(best, prefix), base_on(seeds), COMPARED_METRICS, n_boot=n_boot, primary=primary,
                rule=fixed_n,
            )  # fmt: skip
            pairings["comparison"] = (best, seeds, fixed_n)
        if confirmed is not None:
            exploratory_comparison = comparison
            comparison = compare_metrics(
                _split_metrics(confirmed, prefix), base_on(confirm_seeds), COMPARED_METRICS, n_boot=n_boot,
                primary=primary, rule=confirm_rule,
            )  # fmt: skip
            if "comparison" in pairings:
                pairings["exploratory_comparison"] = pairings.pop("comparison")
            pairings["comparison"] = (confirmed, confirm_seeds, confirm_rule)
        if confirmatory is not None and confirmatory.per_seed:
            confirmatory_comparison = compare_metrics(
                _split_metrics(confirmatory, prefix), base_on(fixed_seeds), COMPARED_METRICS, n_boot=n_boot,
                primary=primary, rule=arm_rule,
            )  # fmt: skip
            family_adjust(confirmatory_comparison, len(family), rule.alpha)
            pairings["confirmatory_comparison"] = (confirmatory, fixed_seeds, arm_rule)
        for rec in listed:
            if not rec.per_seed:
                continue
            table = compare_metrics(
                _split_metrics(rec, prefix), base_on(fixed_seeds), COMPARED_METRICS, n_boot=n_boot,
                primary=primary, rule=arm_rule, treatment_label=rec.trial_id,
            )  # fmt: skip
            if table:
                family_adjust(table, len(family), rule.alpha)
                arm_comparisons[rec.trial_id] = table
                pairings[f"{LISTED_ARM}:{rec.trial_id}"] = (rec, fixed_seeds, arm_rule)
    ranking: list[dict[str, Any]] = []
    if baseline is not None and baseline.per_seed and arm_comparisons:
        ranked = {BASELINE_ID: baseline, CONFIRMATORY_ID: confirmatory, **{r.trial_id: r for r in listed}}
        ranking = rank_arms(
            {a: {s: m for s, m in _split_metrics(r, prefix).items() if s in fixed_seeds}
             for a, r in ranked.items() if r is not None},
            {CONFIRMATORY_ID: confirmatory_comparison, **arm_comparisons}, primary=primary, alpha=rule.alpha,
        )  # fmt: skip
    at_thresholds: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    if on_test and baseline is not None:
        for thresh in _extra_score_thresholds(p):
            at_thresholds[repr(thresh)] = _at_score_thresh(baseline, pairings, primary, thresh, n_boot)
    sens = sensitivity(
        [{"params": r.params, "objective": r.objective} for r in completed],
        params=_searched_params(records),
        tolerance=NEAR_BEST,
    )
    curves: dict[str, dict[float, float]] = {}
    labelled: tuple[tuple[str, TrialRecord | None], ...] = (
        ("confirmatory (harmonic)", confirmatory),
        ("best (harmonic)", best),
        *((f"{r.trial_id} ({arm_label(r.params)})", r) for r in listed),
        ("baseline (standard)", baseline),
    )
    for label, arm in labelled:
        if arm is None:
            continue
        curve = {}
        for t in range(50, 100, 5):
            v = arm.seed_mean(f"{prefix}ap_iou_{t}")
            if math.isfinite(v):
                curve[t / 100] = v
        if curve:
            curves[label] = curve
    mechanism: dict[str, dict[str, dict[int, float]]] = {}
    convergence: dict[str, dict[str, Any]] = {}
    if history:
        mechanism = {
            label: _epoch_means(c, arm) for label, arm in labelled if arm is not None and arm.child_runs
        }
        compared = {BASELINE_ID: baseline if comparison or confirmatory_comparison else None,
                    CONFIRMATORY_ID: confirmatory if confirmatory_comparison else None,
                    "best": best if comparison else None,
                    BEST_CONFIRMED_ID: confirmed if comparison else None,
                    **{r.trial_id: r for r in listed if r.trial_id in arm_comparisons}}  # fmt: skip
        convergence = {arm: plateau(_history_of(c, rec, OBJECTIVE), OBJECTIVE)
                       for arm, rec in compared.items() if rec is not None and rec.child_runs}  # fmt: skip
    return SearchSummary(
        experiment=experiment or parent.data.tags.get(Tag.SPEC_NAME, ""),
        parent_run_id=parent_run_id,
        objective=OBJECTIVE,
        seeds=[int(s) for s in fixed_seeds],
        algorithm=p.get("search.algorithm", ""),
        scheduler=p.get("search.scheduler", ""),
        epochs=epochs,
        trials=records,
        baseline=baseline,
        confirmatory=confirmatory,
        best_trial_id=best.trial_id if best else None,
        best_confirmed=best_confirmed,
        confirm_seeds=confirm_seeds if best_confirmed is not None else [],
        comparison=comparison,
        exploratory_comparison=exploratory_comparison,
        confirmatory_comparison=confirmatory_comparison,
        judged_on="test" if on_test else "val",
        mechanism={k: v for k, v in mechanism.items() if v},
        convergence=convergence,
        sensitivity=sens,
        ap_vs_iou=curves,
        score_thresh=_score_thresh(p),
        at_score_thresholds={t: tables for t, tables in at_thresholds.items() if tables},
        arms=listed,
        arm_comparisons=arm_comparisons,
        family=(
            {"arms": family, "k": len(family), "alpha": rule.alpha, "method": FAMILY_METHOD} if family else {}
        ),
        ranking=ranking,
        complete=parent.data.tags.get(Tag.SEARCH_COMPLETE, "true") == "true",
    )


def _score_thresh(params: Mapping[str, str]) -> float | None:
    try:
        return float(params["eval.score_thresh"])
    except (KeyError, ValueError):
        return None


def _extra_score_thresholds(params: Mapping[str, str]) -> list[float]:
    """``eval.extra_score_thresholds`` of a run's params (a JSON list); none for a run without it."""
    try:
        values = json.loads(params.get("eval.extra_score_thresholds", "[]") or "[]")
    except ValueError:
        return []
    return [float(v) for v in values] if isinstance(values, list) else []


def _at_score_thresh(
    baseline: TrialRecord,
    pairings: Mapping[str, tuple[TrialRecord, list[int], Rule]],
    primary: str,
    thresh: float,
    n_boot: int,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Each table's primary on the test split at the extra score threshold ``thresh``: the same arms,
    seeds and rule as the table itself, on ``test_<primary>_thr<thresh>``."""
    key = at_score_thresh(f"{TEST_PREFIX}{primary}", thresh)

    def at_t(rec: TrialRecord, keep: list[int] | None = None) -> dict[int, dict[str, float]]:
        return {
            s: {primary: m[key]} for s, m in rec.per_seed.items() if key in m and (keep is None or s in keep)
        }

    out = {}
    for table, (treatment, keep, rule) in pairings.items():
        comp = compare_metrics(at_t(treatment), at_t(baseline, keep), (primary,), n_boot=n_boot, primary=primary,
                               rule=rule)  # fmt: skip
        if comp:
            out[table] = comp
    return out


def family_names(params: Mapping[str, str]) -> list[str]:
    """The arms a run judges against the baseline, from its parent run's params: ``confirmatory``
    (``search.confirmatory``), then the names of ``search.arms`` (each arm's ``kind`` is a param)."""
    names = ["confirmatory"] if params.get("search.confirmatory") == "true" else []
    prefix = "search.arms."
    names += sorted(
        {k[len(prefix) :].split(".")[0] for k in params if k.startswith(prefix) and k.endswith(".kind")}
    )
    return names


def arm_label(params: Mapping[str, Any]) -> str:
    """The loss of an arm's configuration in short (``pisa+box=giou``), from its ``loss.*`` overrides."""
    from harmonic.config import LossConfig, LossConfigError

    loss = {k.removeprefix("loss."): v for k, v in params.items() if k.startswith("loss.")}
    try:
        return LossConfig.from_any(loss).label
    except (LossConfigError, TypeError, ValueError):
        return str(loss.get("kind", "?"))


def evidence_plan(params: Mapping[str, str]) -> tuple[str, Rule]:
    """The primary metric and the evidence rule of a run, from its parent run's params (the flattened
    spec, ``evidence.*``); a spec without an ``evidence`` section: AP, at alpha 0.05, fixed seeds."""
    from workers.spec import EvidenceSpec

    raw: dict[str, Any] = {}
    prefix = "evidence."
    for key, value in params.items():
        if key.startswith(prefix):
            try:
                raw[key[len(prefix) :]] = json.loads(value)
            except ValueError:
                raw[key[len(prefix) :]] = value
    section = EvidenceSpec.model_validate(raw)
    return section.primary, section.rule()


def _epoch_means(c: MlflowClient, rec: TrialRecord) -> dict[str, dict[int, float]]:
    """Mean over an arm's seeds of each :data:`MECHANISM_METRICS` metric, per epoch."""
    out: dict[str, dict[int, float]] = {}
    for key in MECHANISM_METRICS:
        values: dict[int, list[float]] = {}
        for run_id in rec.child_runs.values():
            for m in c.get_metric_history(run_id, key):
                if math.isfinite(m.value):
                    values.setdefault(int(m.step), []).append(float(m.value))
        if values:
            out[key] = {e: sum(v) / len(v) for e, v in sorted(values.items())}
    return out


def _history_of(c: MlflowClient, rec: TrialRecord, metric: str) -> dict[int, dict[int, float]]:
    """seed -> epoch -> ``metric`` of an arm's child runs (one MLflow call per child run)."""
    return {
        seed: {int(m.step): float(m.value) for m in c.get_metric_history(run_id, metric)}
        for seed, run_id in rec.child_runs.items()
    }


def epoch_history(c: MlflowClient, run_id: str) -> dict[int, dict[str, float]]:
    """Per-epoch metrics (:data:`REPORTED_METRICS`, ``epoch``, ``epoch_time_s``) of a child run:
    epoch -> metrics (a search replays a seed that finished before an interruption from them)."""
    history: dict[int, dict[str, float]] = {}
    for key in ("epoch", "epoch_time_s", *REPORTED_METRICS):
        for m in c.get_metric_history(run_id, key):
            history.setdefault(int(m.step), {})[key] = float(m.value)
    return {e: h for e, h in history.items() if "epoch" in h}


def _has_test(rec: TrialRecord, seeds: list[int]) -> bool:
    return bool(seeds) and all(f"{TEST_PREFIX}{OBJECTIVE}" in rec.per_seed.get(s, {}) for s in seeds)


def _split_metrics(rec: TrialRecord, prefix: str) -> dict[int, dict[str, float]]:
    return split_metrics(rec.per_seed, prefix)


def _searched_params(records: list[TrialRecord]) -> list[str]:
    names: list[str] = []
    for r in records:
        for k, v in r.params.items():
            if k not in names and isinstance(v, int | float) and not isinstance(v, bool):
                names.append(k)
    return names


#: the last-epoch metrics a TrialRecord keeps of each seed.
_RECORDED = frozenset(
    {
        *REPORTED_METRICS,
        "epoch",
        "AR100",
        "inconsistent_share",
        "nms_rate",
        "trainer_wall_s",
        *(f"{TEST_PREFIX}{m}" for m in (*COMPARED_METRICS, "spearman", "AR100", "inconsistent_share")),
        *(f"{TEST_PREFIX}ap_iou_{t}" for t in range(50, 100, 5)),
    }
)
_COMPUTE = ("trial_wall_s", "trial_cpu_s", "trial_gpu_s", "trial_first_step_s", "trial_epochs_run")


def _recorded(name: str) -> bool:
    """Whether a TrialRecord keeps the metric ``name``: one of :data:`_RECORDED`, or a test metric of
    it at an extra score threshold."""
    base, thresh = score_thresh_of(name)
    return name in _RECORDED or (thresh is not None and base.startswith(TEST_PREFIX) and base in _RECORDED)


def _record(trial_id: str, runs: list[Any], seeds: list[int], epochs: int) -> TrialRecord:
    """One configuration from its seeds' child runs."""
    tags = runs[0].data.tags
    params = json.loads(tags.get(Tag.CONFIG, "{}") or "{}")
    per_seed: dict[int, dict[str, float]] = {}
    child_runs: dict[int, str] = {}
    statuses, errors, reached = [], [], []
    compute: dict[str, float] = {}
    for run in runs:
        seed = int(run.data.tags.get(Tag.SEED, "-1"))
        child_runs[seed] = run.info.run_id
        m = dict(run.data.metrics)
        per_seed[seed] = {k: v for k, v in m.items() if _recorded(k)}
        reached.append(int(m.get("epoch", 0)))
        statuses.append(run.data.tags.get(Tag.TRIAL_STATUS) or _status_of(run, epochs))
        if run.data.tags.get(Tag.ERROR):
            errors.append(f"seed {seed}: {run.data.tags[Tag.ERROR]}")
        for k in _COMPUTE:
            if k in m:
                compute[k] = max(compute.get(k, float("-inf")), m[k])
    if "failed" in statuses:
        status = "failed"
    elif "stopped" in statuses:
        status = "stopped"
    elif all(s == "completed" for s in statuses) and (not seeds or set(per_seed) >= set(seeds)):
        status = "completed"
    else:
        status = "incomplete"
    have_all = bool(seeds) and set(seeds) <= set(per_seed) and all(OBJECTIVE in per_seed[s] for s in seeds)
    agg = aggregate_seeds(
        {s: {OBJECTIVE: per_seed[s][OBJECTIVE]} for s in seeds if s in per_seed and OBJECTIVE in per_seed[s]}
    )
    return TrialRecord(
        trial_id=trial_id,
        arm=tags.get(Tag.ARM, "search"),
        params=params,
        status=status,
        error="; ".join(errors)[:2000] or None,
        epochs=min(reached) if reached else 0,
        objective=agg[OBJECTIVE]["mean"] if have_all else None,
        objective_std=agg[OBJECTIVE]["std"] if have_all else None,
        per_seed=per_seed,
        child_runs=child_runs,
        wall_s=compute.get("trial_wall_s", float("nan")),
        cpu_s=compute.get("trial_cpu_s", float("nan")),
        gpu_s=compute.get("trial_gpu_s", float("nan")),
        first_step_s=compute.get("trial_first_step_s", float("nan")),
        epochs_run=int(compute.get("trial_epochs_run", sum(reached))),
    )


def _status_of(run: Any, epochs: int) -> str:
    """A seed's outcome when its run has no ``Tag.TRIAL_STATUS``, from the run's own status."""
    if run.info.status == "FAILED":
        return "failed"
    if run.info.status == "FINISHED" and int(run.data.metrics.get("epoch", 0)) >= epochs:
        return "completed"
    return "incomplete"


# --------------------------------------------------------------------------- writing

#: a summary's comparison tables and the prefix of their metrics in the parent run.
_DIFF_LABELS = {"comparison": "diff", "confirmatory_comparison": "confirmatory_diff",
                "exploratory_comparison": "exploratory_diff"}  # fmt: skip


def _diff_label(table: str) -> str:
    """The prefix of a comparison table's metrics in the parent run (``arm:giou`` -> ``arm_giou_diff``)."""
    if table in _DIFF_LABELS:
        return _DIFF_LABELS[table]
    return f"{table.replace(':', '_')}_diff"


def log_summary(
    c: MlflowClient,
    parent_run_id: str,
    summary: SearchSummary,
    render: Callable[[SearchSummary, Path], Any] | None = None,
) -> None:
    """Log a summary's evidence to the parent run: metrics, the best configuration, tags, artifacts.

    Metrics (step 0), for each arm label ``best``, ``baseline``, ``confirmatory``, ``best_confirmed``
    and ``arm_<name>`` (``search.arms``): ``<arm>_<m>`` (seed means) and ``<arm>_<m>_seed<s>``; for
    each comparison (``diff``: best vs baseline, on the fresh seeds when the best was confirmed;
    ``confirmatory_diff``; ``arm_<name>_diff``; ``exploratory_diff``: with a confirmation, best vs
    baseline on the seeds that selected it):
    ``<c>_<m>``, ``<c>_<m>_ci95_low``/``_high``, ``<c>_<m>_p``, ``<c>_<m>_p_adjusted``, what the
    pairing bought (``<c>_<m>_sd_treatment``, ``_sd_baseline``, ``_sd_diff``, ``_correlation``), and of
    the primary metric ``<c>_primary_n``, ``_halfwidth`` and ``_mde`` (its outcome: the tag
    ``PRIMARY_OUTCOME_TAG.<c>``, e.g. ``AP: undecided``); at each extra score threshold, the
    primary's ``<c>_<m>_thr<t>`` with ``_ci95_low``/``_high`` and ``_p``; then
    ``rank_<arm>`` and ``best_set_<arm>`` (1 or 0) of the ranked arms, ``share_within_0.5AP``, ``n_trials_<status>``, ``search_cpu_s``, ``search_wall_s``; for each
    compared arm whose convergence is known, ``<arm>_AP_gain_last``, ``<arm>_AP_seed_sd_last`` and
    ``<arm>_plateaued`` (1 or 0, :func:`workers.evidence.plateau`). Params:
    ``best.<path>`` and ``best.trial_id`` (a tag when a resumed search finds another best). Tags:
    ``Tag.JUDGED_ON``, ``Tag.BEST_TRIAL_ID``, ``Tag.BEST_CONFIG``, ``Tag.SEARCH_COMPLETE``.
    Artifacts under ``evidence/``: ``summary.json``, and whatever ``render(summary, folder)``
    writes into the folder (:func:`workers.report.write_evidence`: the report, table and plots).
    """
    from workers.tracking import log_metrics, log_params

    metrics: dict[str, float] = {}
    arms = (
        ("best", summary.best),
        ("baseline", summary.baseline),
        ("confirmatory", summary.confirmatory),
        (BEST_CONFIRMED_ID, summary.best_confirmed),
        *((f"{LISTED_ARM}_{r.trial_id}", r) for r in summary.arms),
    )
    for label, rec in arms:
        if rec is None:
            continue
        for m in (*COMPARED_METRICS, *MECHANISM_METRICS, *(f"{TEST_PREFIX}{m}" for m in COMPARED_METRICS)):
            mean = rec.seed_mean(m)
            if math.isfinite(mean):
                metrics[f"{label}_{m}"] = mean
            for seed, vals in rec.per_seed.items():
                if m in vals:
                    metrics[f"{label}_{m}_seed{seed}"] = vals[m]
    tables = {**{_DIFF_LABELS[t]: getattr(summary, t) for t in _DIFF_LABELS},
              **{_diff_label(f"{LISTED_ARM}:{a}"): t for a, t in summary.arm_comparisons.items()}}  # fmt: skip
    for label, table in tables.items():
        for m, comp in table.items():
            metrics[f"{label}_{m}"] = comp["mean_diff"]
            metrics[f"{label}_{m}_ci95_low"] = comp["ci95_low"]
            metrics[f"{label}_{m}_ci95_high"] = comp["ci95_high"]
            metrics[f"{label}_{m}_p"] = comp["p_value"]
            if "p_adjusted" in comp:
                metrics[f"{label}_{m}_p_adjusted"] = comp["p_adjusted"]
            for key in ("sd_treatment", "sd_baseline", "sd_diff", "correlation"):
                if comp.get(key) is not None:
                    metrics[f"{label}_{m}_{key}"] = comp[key]
            if comp.get("role") == "primary":
                metrics[f"{label}_primary_n"] = float(comp["n_pairs"])
                metrics[f"{label}_primary_halfwidth"] = (comp["ci_high"] - comp["ci_low"]) / 2
                metrics[f"{label}_primary_mde"] = comp["mde"]
                c.set_tag(parent_run_id, f"{PRIMARY_OUTCOME_TAG}.{label}", f"{m}: {comp['outcome']}")
    for thresh, tables in summary.at_score_thresholds.items():
        for table_name, by_metric in tables.items():
            for m, comp in by_metric.items():
                name = at_score_thresh(f"{_diff_label(table_name)}_{m}", float(thresh))
                metrics[name] = comp["mean_diff"]
                metrics[f"{name}_ci95_low"] = comp["ci95_low"]
                metrics[f"{name}_ci95_high"] = comp["ci95_high"]
                metrics[f"{name}_p"] = comp["p_value"]
    for row in summary.ranking:
        metrics[f"rank_{row['arm']}"] = float(row["rank"])
        metrics[f"best_set_{row['arm']}"] = 1.0 if row["in_best_set"] else 0.0
    for arm, conv in summary.convergence.items():
        if conv.get("plateaued") is not None:
            metrics[f"{arm}_{conv['metric']}_gain_last"] = conv["gain"]
            metrics[f"{arm}_{conv['metric']}_seed_sd_last"] = conv["seed_sd"]
            metrics[f"{arm}_plateaued"] = 1.0 if conv["plateaued"] else 0.0
    c.set_tag(parent_run_id, Tag.JUDGED_ON, summary.judged_on)
    if summary.sensitivity.get("n_configs"):
        metrics["share_within_0.5AP"] = summary.sensitivity["share_within"]
    for status in ("completed", "stopped", "failed", "incomplete"):
        metrics[f"n_trials_{status}"] = float(sum(t.status == status for t in summary.trials))
    metrics["search_cpu_s"] = sum(t.cpu_s for t in summary.trials if math.isfinite(t.cpu_s))
    if math.isfinite(summary.wall_s):
        metrics["search_wall_s"] = summary.wall_s
    log_metrics(c, parent_run_id, metrics, step=0)
    best = summary.best
    if best is not None:
        existing = c.get_run(parent_run_id).data.params
        params = {f"best.{k}": str(v) for k, v in best.params.items()}
        params["best.trial_id"] = best.trial_id
        # MLflow params are immutable: a resumed search that finds another best logs it as a tag.
        fresh = {k: v for k, v in params.items() if k not in existing}
        if fresh:
            log_params(c, parent_run_id, fresh)
        c.set_tag(parent_run_id, Tag.BEST_TRIAL_ID, best.trial_id)
        c.set_tag(parent_run_id, Tag.BEST_CONFIG, json.dumps(best.params, sort_keys=True)[:5000])
    c.set_tag(parent_run_id, Tag.SEARCH_COMPLETE, "true" if summary.complete else "false")
    folder = Path(SUMMARY_ARTIFACT).parent.name
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / Path(SUMMARY_ARTIFACT).name).write_text(json.dumps(summary.to_dict(), indent=2))
        if render is not None:
            render(summary, out)
        c.log_artifacts(parent_run_id, tmp, artifact_path=folder)
