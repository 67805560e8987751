"""The Ray Tune search over the loss's hyperparameters, with seed-paired evidence against a baseline.
Re-exports what other modules use; the summary it produces lives in workers.summary.

* :mod:`workers.search.space`: the Tune objects of a spec's ``search`` section (space, searcher,
  scheduler, number of samples) and the CPUs a search needs.
* :mod:`workers.search.seeds`: one configuration trained on every seed at once
  (:class:`SeedGroup`, :func:`train_on_seeds`), reporting seed means.
* :mod:`workers.search.runner`: :func:`run_search`, the trials, the fixed arms (baseline,
  confirmatory) and the trials' outcomes.
"""

from workers.env import TRAIN_ENV_DEFAULTS
from workers.search.runner import FIXED_ARMS, TrialOutcome, run_search
from workers.search.seeds import SeedEvent, SeedGroup, TrialFailure, run_key, train_on_seeds
from workers.search.space import (
    TRIAL_CPUS,
    SearchSpaceError,
    least_cpus,
    make_scheduler,
    make_search_alg,
    num_trials,
    required_cpus,
    trial_cpus,
    tune_param_space,
)
from workers.summary import (
    BASELINE_ID,
    COMPARED_METRICS,
    CONFIRMATORY_ID,
    MECHANISM_METRICS,
    NEAR_BEST,
    OBJECTIVE,
    REPORTED_METRICS,
    SUMMARY_ARTIFACT,
    TEST_PREFIX,
    SearchSummary,
    TrialRecord,
    collect_summary,
    log_summary,
)

__all__ = [
    "OBJECTIVE",
    "COMPARED_METRICS",
    "MECHANISM_METRICS",
    "REPORTED_METRICS",
    "TEST_PREFIX",
    "NEAR_BEST",
    "BASELINE_ID",
    "CONFIRMATORY_ID",
    "SUMMARY_ARTIFACT",
    "FIXED_ARMS",
    "TRIAL_CPUS",
    "TRAIN_ENV_DEFAULTS",
    "SearchSpaceError",
    "SearchSummary",
    "TrialRecord",
    "TrialOutcome",
    "TrialFailure",
    "SeedEvent",
    "SeedGroup",
    "tune_param_space",
    "make_search_alg",
    "make_scheduler",
    "num_trials",
    "least_cpus",
    "required_cpus",
    "trial_cpus",
    "run_key",
    "train_on_seeds",
    "run_search",
    "collect_summary",
    "log_summary",
]
