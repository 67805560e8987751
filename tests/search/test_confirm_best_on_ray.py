"""A search whose best configuration is confirmed on fresh seeds, through `hdet run` on a real local
Ray and MLflow: after the search the best configuration and the baseline train again on seeds the
search never used, and best vs baseline is judged on those; the same-seed table stays, exploratory."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hdet_run import TINY, run_spec
from mlflow import MlflowClient

from workers.search.rounds import confirm_seeds
from workers.spec import Spec
from workers.summary import CONFIRM_SEEDS_TAG, CONFIRM_STOP_TAG

SPEC: dict[str, Any] = {
    **TINY,
    "name": "confirm",
    # one configuration on one seed: the confirmation adds it and the baseline on seed 1
    "search": {"space": {"alpha": {"grid": [1.0]}}, "algorithm": "grid", "seeds": [0], "baseline": True},
    "tracking": {"experiment": "confirm-test"},
}


def _parent_and_children(home: Path, experiment: str) -> tuple[MlflowClient, Any, list[Any]]:
    """The MLflow client of ``home``'s store, the experiment's one parent run and its child runs."""
    c = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None
    runs = c.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("hdet.role") == "parent"]
    return c, parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def test_the_fresh_seeds_follow_search_seeds_and_are_as_many():
    assert confirm_seeds(Spec.parse(SPEC, check_paths=False)) == [1]
    wide = Spec.parse({**SPEC, "search": {**SPEC["search"], "seeds": [3, 9, 4]}}, check_paths=False)
    assert confirm_seeds(wide) == [10, 11, 12]
    assert Spec.parse(SPEC, check_paths=False).search.confirm_best is True  # type: ignore[union-attr]


@pytest.mark.e2e
def test_the_best_configuration_is_judged_on_fresh_seeds(tmp_path: Path) -> None:
    spec = tmp_path / "confirm.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    done = run_spec(tmp_path, spec)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "confirm_best: trial" in out and "fresh seeds [1]" in out

    c, parent, children = _parent_and_children(tmp_path, "confirm-test")
    arms = sorted((r.data.tags["hdet.arm"], r.data.tags["hdet.seed"], r.info.status) for r in children)
    assert arms == [
        ("baseline", "0", "FINISHED"),
        ("baseline", "1", "FINISHED"),
        ("best_confirmed", "1", "FINISHED"),
        ("search", "0", "FINISHED"),
    ]
    assert json.loads(parent.data.tags[CONFIRM_SEEDS_TAG]) == [1]

    summary = json.loads(Path(c.download_artifacts(parent.info.run_id, "evidence/summary.json")).read_text())
    assert summary["judged_on"] == "test" and summary["confirm_seeds"] == [1]
    best = next(t for t in summary["trials"] if t["trial_id"] == summary["best_trial_id"])
    confirmed, base = summary["best_confirmed"], summary["baseline"]["per_seed"]
    assert confirmed["status"] == "completed" and confirmed["params"] == best["params"] == {"loss.alpha": 1.0}
    # the verdict: fresh seed 1 only; the exploratory table: seed 0, where the best was selected
    verdict, exploratory = summary["comparison"]["AP"], summary["exploratory_comparison"]["AP"]
    assert list(verdict["per_seed"]) == ["1"] and list(exploratory["per_seed"]) == ["0"]
    assert verdict["mean_diff"] == pytest.approx(confirmed["per_seed"]["1"]["test_AP"] - base["1"]["test_AP"])
    assert exploratory["mean_diff"] == pytest.approx(best["per_seed"]["0"]["test_AP"] - base["0"]["test_AP"])
    metrics = parent.data.metrics
    assert metrics["diff_AP"] == pytest.approx(verdict["mean_diff"])
    assert metrics["exploratory_diff_AP"] == pytest.approx(exploratory["mean_diff"])
    assert (
        "best configuration, confirmed on fresh seeds [1] vs baseline (standard loss) on the test split"
        in out
    )
    assert "best configuration, exploratory (the same trainings that selected it) vs baseline" in out
    assert "convergence: baseline: convergence unknown (1 epoch: no earlier epoch to compare with)" in out


ROUNDS: dict[str, Any] = {
    **SPEC,
    "name": "confirm-rounds",
    # 1 fresh seed never gives a finite interval: the confirmation goes on to 2, the cap
    "evidence": {"target_halfwidth": 0.001, "min_seeds": 2, "max_seeds": 2, "round_size": 1},
    "tracking": {"experiment": "confirm-rounds-test"},
}


@pytest.mark.e2e
def test_with_a_target_the_confirmation_goes_on_in_rounds_on_fresh_seeds(tmp_path: Path) -> None:
    spec = tmp_path / "confirm-rounds.yaml"
    spec.write_text(yaml.safe_dump(ROUNDS))
    done = run_spec(tmp_path, spec)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    # AP may be 0 on every seed of so tiny a training: then the interval is 0 wide at 2 seeds
    for n, why in ((1, "continue"), (2, "(max seeds|target reached)")):
        assert re.search(
            rf"confirm_best rounds: {n} fresh seeds, AP half-width \S+ \(target 0.001\): {why}\n", out
        )
    assert "fresh seeds [2]" in out and "fresh seeds [3]" not in out

    c, parent, children = _parent_and_children(tmp_path, "confirm-rounds-test")
    arms = sorted((r.data.tags["hdet.arm"], r.data.tags["hdet.seed"]) for r in children)
    # no confirmatory arm: the baseline trains the search's seed, then each fresh seed once
    assert arms == [
        ("baseline", "0"), ("baseline", "1"), ("baseline", "2"),
        ("best_confirmed", "1"), ("best_confirmed", "2"), ("search", "0"),
    ]  # fmt: skip
    assert json.loads(parent.data.tags[CONFIRM_SEEDS_TAG]) == [1, 2]
    assert parent.data.tags[CONFIRM_STOP_TAG] in ("max seeds", "target reached")
    summary = json.loads(Path(c.download_artifacts(parent.info.run_id, "evidence/summary.json")).read_text())
    verdict = summary["comparison"]["AP"]
    # stopped by looking at the data: the anytime-valid interval, on the fresh seeds only
    assert list(verdict["per_seed"]) == ["1", "2"] and verdict["ci_method"] == "t-mixture-cs"
    assert list(summary["exploratory_comparison"]["AP"]["per_seed"]) == ["0"]
