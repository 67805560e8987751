"""What a search's outcome is made of: TrialRecord, SearchSummary and the names of their metrics.
Plain dataclasses with a JSON form; no MLflow, no Ray (reading and writing them: workers.summary.store).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "OBJECTIVE",
    "COMPARED_METRICS",
    "MECHANISM_METRICS",
    "REPORTED_METRICS",
    "TEST_PREFIX",
    "THRESH_SUFFIX",
    "at_score_thresh",
    "score_thresh_of",
    "split_metrics",
    "NEAR_BEST",
    "BASELINE_ID",
    "CONFIRMATORY_ID",
    "BEST_CONFIRMED_ID",
    "LISTED_ARM",
    "CONFIRM_SEEDS_TAG",
    "CONFIRM_STOP_TAG",
    "SUMMARY_ARTIFACT",
    "PRIMARY_OUTCOME_TAG",
    "ROUNDS_STOP_TAG",
    "SEEDS_RUN_TAG",
    "TrialRecord",
    "SearchSummary",
]

#: the searched objective: COCO AP@[.5:.95] of the last epoch, mean over seeds (in [0, 1]).
OBJECTIVE = "AP"
#: metrics compared between an arm and the baseline (one table; Holm-corrected together).
COMPARED_METRICS = ("AP", "AP50", "AP75", "AP90", "aic")
#: the training-time mechanism: what the loss does to the positives' scores (Eq. 7).
MECHANISM_METRICS = (
    "train_aic",
    "train_mean_score",
    "train_pushed_down_share",
    "train_pushed_down_mean_score",
)
#: the per-epoch metrics a trial averages over its seeds and reports to Tune.
REPORTED_METRICS = (
    *COMPARED_METRICS,
    "spearman",
    *MECHANISM_METRICS,
    "loss",
    "images_per_s",
    *(f"ap_iou_{t}" for t in range(50, 100, 5)),
)
#: prefix of the held-out test split's metrics (the trainer's name for them: workers.training.epoch_metrics).
TEST_PREFIX = "test_"
#: what names a test metric at one of ``eval.extra_score_thresholds`` (MLflow's names allow no ``@``).
THRESH_SUFFIX = "_thr"


def at_score_thresh(metric: str, thresh: float) -> str:
    """The name of ``metric`` at an extra score threshold: ``test_AP`` at 0.001 is ``test_AP_thr0.001``."""
    return f"{metric}{THRESH_SUFFIX}{float(thresh)!r}"


def score_thresh_of(name: str) -> tuple[str, float | None]:
    """``(metric, threshold)`` of a name made by :func:`at_score_thresh`; ``(name, None)`` for any other."""
    base, sep, text = name.rpartition(THRESH_SUFFIX)
    if not sep or not base:
        return name, None
    try:
        return base, float(text)
    except ValueError:
        return name, None


def split_metrics(per_seed: Mapping[int, Mapping[str, float]], prefix: str) -> dict[int, dict[str, float]]:
    """Per-seed metrics of one split: ``test_AP`` -> ``AP`` with ``prefix="test_"``; the split's
    metrics only (never the other split's value under the same name)."""
    if not prefix:
        return {s: {k: v for k, v in m.items() if not k.startswith(TEST_PREFIX)} for s, m in per_seed.items()}
    return {
        s: {k[len(prefix) :]: v for k, v in m.items() if k.startswith(prefix)} for s, m in per_seed.items()
    }


#: "within 0.5 AP of the best", on the [0, 1] scale the trainer reports AP in.
NEAR_BEST = 0.005

#: trial ids (and arms) of the two configurations trained outside the searcher.
BASELINE_ID = "baseline"
CONFIRMATORY_ID = "confirmatory"
#: the arm tag of each arm of ``search.arms`` (its trial id is its name).
LISTED_ARM = "arm"
#: trial id (and arm) of the searched best configuration trained again on fresh seeds.
BEST_CONFIRMED_ID = "best_confirmed"
#: parent-run tag: the fresh seeds the best configuration was confirmed on (JSON list).
CONFIRM_SEEDS_TAG = "hdet.confirm_seeds"
SUMMARY_ARTIFACT = "evidence/summary.json"
#: parent-run tag (``<tag>.diff``, ``<tag>.confirmatory_diff``) holding a comparison's primary outcome.
PRIMARY_OUTCOME_TAG = "hdet.primary_outcome"
#: parent-run tag: the seeds the fixed arms were started on, when seeds ran in rounds (JSON list).
SEEDS_RUN_TAG = "hdet.seeds_run"
#: parent-run tag: why the rounds stopped (target reached, max seeds, budget, or a failure).
ROUNDS_STOP_TAG = "hdet.rounds_stop"
#: parent-run tag: why the searched best's confirmation in rounds stopped (as ``ROUNDS_STOP_TAG``).
CONFIRM_STOP_TAG = "hdet.confirm_stop"


@dataclass
class TrialRecord:
    """One configuration of a search (or a fixed arm), as MLflow holds it.

    Attributes:
        trial_id: the Tune trial id, ``baseline``, ``confirmatory`` or ``best_confirmed``.
        arm: ``search``, ``baseline``, ``confirmatory`` or ``best_confirmed`` (the best configuration
            trained again on fresh seeds).
        params: the configuration (dotted spec path -> value).
        status: ``completed``, ``stopped`` (early, by ASHA), ``failed`` or ``incomplete``.
        error: the failure's reason.
        epochs: the last epoch every seed reached.
        objective: mean over seeds of the last epoch's AP (in [0, 1]); None without all seeds.
        objective_std: standard deviation of it over seeds.
        per_seed: seed -> the last epoch's metrics.
        child_runs: seed -> MLflow run id.
        wall_s, cpu_s, gpu_s: the trial's wall time and allocated CPU/GPU-seconds (each training
            from its first step: waiting for CPUs counts nothing).
        first_step_s: wall time from the trial's start to its first training step.
        epochs_run: epochs trained over all seeds.
    """

    trial_id: str
    arm: str
    params: dict[str, Any]
    status: str
    error: str | None = None
    epochs: int = 0
    objective: float | None = None
    objective_std: float | None = None
    per_seed: dict[int, dict[str, float]] = field(default_factory=dict)
    child_runs: dict[int, str] = field(default_factory=dict)
    wall_s: float = float("nan")
    cpu_s: float = float("nan")
    gpu_s: float = float("nan")
    first_step_s: float = float("nan")
    epochs_run: int = 0

    def seed_mean(self, metric: str) -> float:
        vals = [m[metric] for m in self.per_seed.values() if metric in m]
        return sum(vals) / len(vals) if vals else float("nan")


@dataclass
class SearchSummary:
    """The outcome of a search, as logged to the parent run (``evidence/summary.json``).

    Attributes:
        experiment, parent_run_id: where it is in MLflow.
        objective: the searched metric (``AP``).
        seeds, algorithm, scheduler, epochs: what was run.
        trials: every configuration of the search.
        baseline: the baseline arm, if the spec asked for it.
        confirmatory: the confirmatory arm (the spec's own loss section), if asked for.
        best_trial_id: the best configuration (on ``val``) that trained the full schedule.
        best_confirmed: that configuration trained again on ``confirm_seeds`` (``search.confirm_best``).
        confirm_seeds: fresh seeds, none of ``search.seeds``: no part in picking the best.
        comparison: metric -> :func:`workers.evidence.compare_metrics` entry of best vs baseline,
            on the split ``judged_on``: on ``confirm_seeds`` when the best was confirmed, else on
            the seeds that also selected it.
        exploratory_comparison: with a confirmation, best vs baseline on the search's own seeds
            (the same trainings that won on ``val``).
        confirmatory_comparison: the same for the confirmatory arm vs the baseline.
        judged_on: ``test`` (the held-out split) or ``val`` (no test split: the best
            configuration's comparison then carries the winner's curse).
        mechanism: arm label -> training-time metric (:data:`MECHANISM_METRICS`) -> {epoch: mean
            over seeds}: what the loss did to the positives' scores, epoch by epoch.
        convergence: arm (``baseline``, ``confirmatory``, ``best``, ``best_confirmed``) ->
            :func:`workers.evidence.plateau` of its validation AP over epochs: whether it had
            stopped improving when judged.
        sensitivity: :func:`workers.evidence.sensitivity` over the completed configurations.
        ap_vs_iou: arm label -> {IoU threshold: AP, mean over seeds}.
        score_thresh: the detector's score threshold the tables above are at (``eval.score_thresh``).
        at_score_thresholds: each of ``eval.extra_score_thresholds`` (its text, e.g. ``"0.001"``) ->
            table (``comparison``, ``exploratory_comparison``, ``confirmatory_comparison``) -> the
            primary's :func:`workers.evidence.compare_metrics` entry on the test split at that
            threshold: a secondary result, not part of the primary's verdict.
        arms: the arms of ``search.arms`` (trial id: the arm's name), in the order of their names.
        arm_comparisons: arm name -> its table against the baseline (as ``confirmatory_comparison``).
        family: the arms judged against the baseline as one family (``confirmatory`` and ``arms``):
            ``arms`` (their names), ``k``, ``alpha`` (the family's level) and ``method``
            (``bonferroni``: each arm's tables are at ``alpha / k``); empty without a fixed arm.
        ranking: with ``arms``, every arm and the baseline ranked on the primary
            (:func:`workers.evidence.arms.rank_arms`: best first, with the best set).
        complete: False when the search was interrupted (resume it with ``--resume``).
        wall_s: wall time of the whole search (this session).
    """

    experiment: str
    parent_run_id: str
    objective: str
    seeds: list[int]
    algorithm: str
    scheduler: str
    epochs: int
    trials: list[TrialRecord]
    baseline: TrialRecord | None = None
    confirmatory: TrialRecord | None = None
    best_trial_id: str | None = None
    best_confirmed: TrialRecord | None = None
    confirm_seeds: list[int] = field(default_factory=list)
    comparison: dict[str, dict[str, Any]] = field(default_factory=dict)
    exploratory_comparison: dict[str, dict[str, Any]] = field(default_factory=dict)
    confirmatory_comparison: dict[str, dict[str, Any]] = field(default_factory=dict)
    judged_on: str = "val"
    mechanism: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    convergence: dict[str, dict[str, Any]] = field(default_factory=dict)
    sensitivity: dict[str, Any] = field(default_factory=dict)
    ap_vs_iou: dict[str, dict[float, float]] = field(default_factory=dict)
    score_thresh: float | None = None
    at_score_thresholds: dict[str, dict[str, dict[str, dict[str, Any]]]] = field(default_factory=dict)
    arms: list[TrialRecord] = field(default_factory=list)
    arm_comparisons: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    family: dict[str, Any] = field(default_factory=dict)
    ranking: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = True
    wall_s: float = float("nan")

    @property
    def best(self) -> TrialRecord | None:
        return next((t for t in self.trials if t.trial_id == self.best_trial_id), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (seeds and IoU thresholds become string keys)."""
        d = asdict(self)
        return json.loads(json.dumps(d, default=str, allow_nan=True))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SearchSummary:
        def rec(r: Mapping[str, Any] | None) -> TrialRecord | None:
            if r is None:
                return None
            r = dict(r)
            r["per_seed"] = {int(k): v for k, v in r.get("per_seed", {}).items()}
            r["child_runs"] = {int(k): v for k, v in r.get("child_runs", {}).items()}
            return TrialRecord(**r)

        data = dict(d)
        data["trials"] = [rec(t) for t in data.get("trials", [])]
        data["arms"] = [rec(t) for t in data.get("arms", [])]
        data["baseline"] = rec(data.get("baseline"))
        data["confirmatory"] = rec(data.get("confirmatory"))
        data["best_confirmed"] = rec(data.get("best_confirmed"))
        data["ap_vs_iou"] = {
            k: {float(t): v for t, v in c.items()} for k, c in data.get("ap_vs_iou", {}).items()
        }
        data["mechanism"] = {
            arm: {m: {int(e): v for e, v in by_epoch.items()} for m, by_epoch in metrics.items()}
            for arm, metrics in data.get("mechanism", {}).items()
        }
        tables = [
            data.get(t, {}) for t in ("comparison", "confirmatory_comparison", "exploratory_comparison")
        ]
        tables += [t for by_table in data.get("at_score_thresholds", {}).values() for t in by_table.values()]
        tables += list(data.get("arm_comparisons", {}).values())
        for table in tables:
            for comp in table.values():
                comp["per_seed"] = {
                    int(k) if str(k).lstrip("-").isdigit() else k: v for k, v in comp["per_seed"].items()
                }
        return cls(**data)

    def format_table(self) -> str:
        """The comparison table printed at the end of a search: :func:`workers.report.format_table`."""
        from workers.report import format_table  # (the renderer imports this module, not the reverse)

        return format_table(self)
