"""collect_summary and log_summary against a real sqlite MLflow store: what the pairing bought,
whether each compared arm had converged, and a best configuration confirmed on fresh seeds, read from
the child runs and logged on the parent run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from workers.report import render_markdown
from workers.summary import BEST_CONFIRMED_ID, CONFIRM_SEEDS_TAG, collect_summary, log_summary
from workers.tracking import Tag

#: validation AP per epoch of each arm and seed: the baseline still climbs 3 points in its last
#: epoch (seed SD 1 point), the confirmatory arm gains 0.5 point (seed SD 1 point)
HISTORY = {
    "baseline": {s: [0.20 + 0.01 * s, 0.23 + 0.01 * s, 0.26 + 0.01 * s] for s in (0, 1, 2)},
    "confirmatory": {s: [0.25 + 0.01 * s, 0.28 + 0.01 * s, 0.285 + 0.01 * s] for s in (0, 1, 2)},
}
#: the test split of the last epoch: the confirmatory arm 2 to 2.5 points above the baseline
TEST_AP = {"baseline": {0: 0.21, 1: 0.24, 2: 0.22}, "confirmatory": {0: 0.23, 1: 0.265, 2: 0.24}}
ARMS = {arm: np.array([TEST_AP[arm][s] for s in (0, 1, 2)]) for arm in TEST_AP}


class CountingClient(MlflowClient):
    """The real client, counting the metric-history calls a summary makes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.history_calls = 0

    def get_metric_history(self, run_id: str, key: str) -> Any:
        self.history_calls += 1
        return super().get_metric_history(run_id, key)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[CountingClient, str, str]:
    home = tmp_path_factory.mktemp("store")
    c = CountingClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = c.create_experiment("summary-store", artifact_location=(home / "artifacts").as_uri())
    parent = c.create_run(exp, tags={Tag.SPEC_NAME: "compare"}).info.run_id
    for key, value in (("search.seeds", "[0, 1, 2]"), ("train.epochs", "3"), ("search.baseline", "true")):
        c.log_param(parent, key, value)
    for arm, seeds in HISTORY.items():
        for seed, aps in seeds.items():
            tags = {MLFLOW_PARENT_RUN_ID: parent, Tag.TRIAL_ID: arm, Tag.ARM: arm, Tag.SEED: str(seed),
                    Tag.TRIAL_STATUS: "completed"}  # fmt: skip
            run = c.create_run(exp, tags=tags).info.run_id
            for epoch, ap in enumerate(aps, start=1):
                c.log_metric(run, "AP", ap, step=epoch)
                c.log_metric(run, "epoch", float(epoch), step=epoch)
            c.log_metric(run, "test_AP", TEST_AP[arm][seed], step=3)
            c.set_terminated(run)
    c.set_terminated(parent)
    return c, exp, parent


def test_the_summary_says_what_the_pairing_bought_and_which_arm_had_converged(store):
    c, exp, parent = store
    c.history_calls = 0
    s = collect_summary(c, exp, parent, n_boot=1)
    # 6 child runs: one AP history each for the convergence, four mechanism metrics each
    assert c.history_calls == 6 * (1 + 4)
    assert s.judged_on == "test"
    comp = s.confirmatory_comparison["AP"]
    t, b = ARMS["confirmatory"], ARMS["baseline"]
    assert comp["sd_diff"] == pytest.approx(np.std(t - b, ddof=1))
    assert comp["correlation"] == pytest.approx(np.corrcoef(t, b)[0, 1]) and comp["correlation"] > 0.99
    assert (comp["sd_treatment"], comp["sd_baseline"]) == pytest.approx(
        (np.std(t, ddof=1), np.std(b, ddof=1))
    )
    base, conf = s.convergence["baseline"], s.convergence["confirmatory"]
    assert (base["last_epoch"], base["back"]) == (3, 1)
    assert base["gain"] == pytest.approx(0.03) and base["seed_sd"] == pytest.approx(0.01)
    assert base["plateaued"] is False
    assert conf["gain"] == pytest.approx(0.005) and conf["plateaued"] is True
    table = s.format_table()
    assert "convergence: baseline still improving: +3.0 AP over the last 1 of 3 epochs" in table
    assert "convergence: HarmonicDet (confirmatory) plateaued: +0.5 AP" in table

    c.history_calls = 0
    assert collect_summary(c, exp, parent, n_boot=1, history=False).convergence == {}
    assert c.history_calls == 0


def test_the_parent_run_gets_the_pairing_and_the_convergence(store):
    c, exp, parent = store
    log_summary(c, parent, collect_summary(c, exp, parent, n_boot=1))
    m = c.get_run(parent).data.metrics
    t, b = ARMS["confirmatory"], ARMS["baseline"]
    assert m["confirmatory_diff_AP_correlation"] == pytest.approx(np.corrcoef(t, b)[0, 1])
    assert m["confirmatory_diff_AP_sd_diff"] == pytest.approx(np.std(t - b, ddof=1))
    assert m["confirmatory_diff_AP_sd_baseline"] == pytest.approx(np.std(b, ddof=1))
    assert m["baseline_plateaued"] == 0.0 and m["confirmatory_plateaued"] == 1.0
    assert m["baseline_AP_gain_last"] == pytest.approx(0.03)
    assert m["baseline_AP_seed_sd_last"] == pytest.approx(0.01)


def _searched_store(tmp_path: Path, confirmed_status: str = "completed") -> tuple[MlflowClient, str, str]:
    """A search of one configuration on seeds 0, 1 whose best was trained again on fresh seeds 2, 3,
    with the baseline on all four; test AP: the best +4 and +4.5 points on 0, 1, +1 and +1.5 on 2, 3."""
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.create_experiment("confirmed", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = c.create_run(exp, tags={Tag.SPEC_NAME: "search", CONFIRM_SEEDS_TAG: "[2, 3]"}).info.run_id
    for key, value in (("search.seeds", "[0, 1]"), ("train.epochs", "1")):
        c.log_param(parent, key, value)
    base = {0: 0.20, 1: 0.22, 2: 0.21, 3: 0.25}
    arms = {
        ("t0", "search"): {0: 0.24, 1: 0.265},
        (BEST_CONFIRMED_ID, BEST_CONFIRMED_ID): {2: 0.22, 3: 0.265},
        ("baseline", "baseline"): base,
    }
    for (tid, arm), test_ap in arms.items():
        for seed, ap in test_ap.items():
            status = confirmed_status if arm == BEST_CONFIRMED_ID else "completed"
            tags = {MLFLOW_PARENT_RUN_ID: parent, Tag.TRIAL_ID: tid, Tag.ARM: arm, Tag.SEED: str(seed),
                    Tag.TRIAL_STATUS: status, Tag.CONFIG: '{"loss.alpha": 1.0}'}  # fmt: skip
            run = c.create_run(exp, tags=tags).info.run_id
            for key, value in (("AP", ap + 0.1), ("epoch", 1.0), ("test_AP", ap)):
                c.log_metric(run, key, value, step=1)
            c.set_terminated(run)
    return c, exp, parent


def test_a_confirmed_best_is_judged_on_the_fresh_seeds_and_the_selecting_seeds_are_exploratory(
    tmp_path: Path,
):
    c, exp, parent = _searched_store(tmp_path)
    s = collect_summary(c, exp, parent, n_boot=1)
    assert s.best_trial_id == "t0" and s.confirm_seeds == [2, 3] and s.judged_on == "test"
    assert s.best_confirmed is not None and s.best_confirmed.status == "completed"
    assert sorted(s.comparison["AP"]["per_seed"]) == [2, 3]
    assert s.comparison["AP"]["mean_diff"] == pytest.approx(0.0125)
    assert sorted(s.exploratory_comparison["AP"]["per_seed"]) == [0, 1]
    assert s.exploratory_comparison["AP"]["mean_diff"] == pytest.approx(0.0425)
    assert s.comparison["AP"]["role"] == "primary" and s.comparison["AP"]["ci_method"] == "t"
    table = s.format_table()
    assert (
        "best configuration, confirmed on fresh seeds [2, 3] vs baseline (standard loss) on the test split"
        in table
    )
    assert "best configuration, exploratory (the same trainings that selected it) vs baseline" in table
    assert "winner's curse" not in table
    assert (
        "undecided: no detectable difference between HarmonicDet (best, confirmed on fresh seeds) and"
        in table
    )
    assert "HarmonicDet (best, exploratory) is better than the standard-loss baseline" in table
    md = render_markdown(s)
    assert "## Best configuration, confirmed on fresh seeds [2, 3] vs the standard loss" in md
    assert f"| {BEST_CONFIRMED_ID} | completed |" in md
    log_summary(c, parent, s)
    m = c.get_run(parent).data.metrics
    assert m["diff_AP"] == pytest.approx(0.0125) and m["exploratory_diff_AP"] == pytest.approx(0.0425)
    assert m[f"{BEST_CONFIRMED_ID}_test_AP"] == pytest.approx(0.2425)


def test_a_confirmation_that_failed_leaves_the_verdict_to_the_selecting_seeds_and_says_so(tmp_path: Path):
    c, exp, parent = _searched_store(tmp_path, confirmed_status="failed")
    s = collect_summary(c, exp, parent, n_boot=1)
    assert s.best_confirmed is not None and s.best_confirmed.status == "failed"
    assert s.exploratory_comparison == {} and sorted(s.comparison["AP"]["per_seed"]) == [0, 1]
    assert (
        "did not complete (failed); best vs baseline is judged on the seeds that selected it"
        in s.format_table()
    )
