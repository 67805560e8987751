"""A search's outcome (TrialRecord, SearchSummary), read back from MLflow and logged to it.
Importable without Ray (the REST service and ``hdet report`` use it); renderers live in workers.report.

* :mod:`workers.summary.records`: the dataclasses, their JSON form, the names of the metrics.
* :mod:`workers.summary.store`: :func:`collect_summary` (MLflow -> summary), :func:`log_summary`
  (summary -> the parent run).
"""

from workers.summary.records import (
    BASELINE_ID,
    COMPARED_METRICS,
    CONFIRMATORY_ID,
    MECHANISM_METRICS,
    NEAR_BEST,
    OBJECTIVE,
    PRIMARY_OUTCOME_TAG,
    REPORTED_METRICS,
    ROUNDS_STOP_TAG,
    SEEDS_RUN_TAG,
    SUMMARY_ARTIFACT,
    TEST_PREFIX,
    SearchSummary,
    TrialRecord,
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
    "NEAR_BEST",
    "BASELINE_ID",
    "CONFIRMATORY_ID",
    "SUMMARY_ARTIFACT",
    "TrialRecord",
    "split_metrics",
    "SearchSummary",
    "collect_summary",
    "log_summary",
]
