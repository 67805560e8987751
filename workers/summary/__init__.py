"""A search's outcome (TrialRecord, SearchSummary), read back from MLflow and logged to it.
Importable without Ray (the REST service and ``hdet report`` use it); renderers live in workers.report.

* :mod:`workers.summary.records`: the dataclasses, their JSON form, the names of the metrics.
* :mod:`workers.summary.store`: :func:`collect_summary` (MLflow -> summary), :func:`log_summary`
  (summary -> the parent run).
"""

from workers.summary.records import (
    BASELINE_ID,
    BEST_CONFIRMED_ID,
    COMPARED_METRICS,
    CONFIRM_SEEDS_TAG,
    CONFIRM_STOP_TAG,
    CONFIRMATORY_ID,
    LISTED_ARM,
    MECHANISM_METRICS,
    NEAR_BEST,
    OBJECTIVE,
    PRIMARY_OUTCOME_TAG,
    REPORTED_METRICS,
    ROUNDS_STOP_TAG,
    SEEDS_RUN_TAG,
    SUMMARY_ARTIFACT,
    TEST_PREFIX,
    THRESH_SUFFIX,
    SearchSummary,
    TrialRecord,
    at_score_thresh,
    score_thresh_of,
    split_metrics,
)
from workers.summary.store import collect_summary, log_summary

__all__ = [
    "OBJECTIVE",
    "PRIMARY_OUTCOME_TAG",
    "ROUNDS_STOP_TAG",
    "SEEDS_RUN_TAG",
    "COMPARED_METRICS",
    "MECHANISM_METRICS",
    "REPORTED_METRICS",
    "TEST_PREFIX",
    "THRESH_SUFFIX",
    "at_score_thresh",
    "score_thresh_of",
    "NEAR_BEST",
    "BASELINE_ID",
    "CONFIRMATORY_ID",
    "BEST_CONFIRMED_ID",
    "LISTED_ARM",
    "CONFIRM_SEEDS_TAG",
    "CONFIRM_STOP_TAG",
    "SUMMARY_ARTIFACT",
    "TrialRecord",
    "split_metrics",
    "SearchSummary",
    "collect_summary",
    "log_summary",
]
