"""Seeds in rounds through `hdet run` on a real local Ray and MLflow: the baseline and the
confirmatory arm start on min_seeds seeds and get more, a round at a time, until the rule stops;
the parent run records the seeds reached, why the rounds stopped, and the primary's verdict."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import yaml
from hdet_run import TINY, run_spec, start_spec
from mlflow import MlflowClient

from workers.search.rounds import first_round, seed_sequence
from workers.spec import Spec
from workers.summary import PRIMARY_OUTCOME_TAG, ROUNDS_STOP_TAG, SEEDS_RUN_TAG

BASE: dict[str, Any] = {**TINY, "tracking": {"experiment": "rounds-test"}}
ROUNDS: dict[str, Any] = {
    **BASE,
    "name": "rounds",
    "search": {"space": {}, "seeds": [0, 1], "baseline": True, "confirmatory": True},
    # 2 seeds never give a finite interval: a second round of one seed must follow, up to the cap of 3
    "evidence": {"target_halfwidth": 0.001, "min_seeds": 2, "max_seeds": 3, "round_size": 1},
}


def test_the_seeds_of_the_rounds_follow_search_seeds():
    spec = Spec.parse({**ROUNDS, "evidence": {"target_halfwidth": 1.0, "min_seeds": 5}}, check_paths=False)
    assert first_round(spec) == [0, 1, 2, 3, 4]
    assert seed_sequence(spec, 7) == [0, 1, 2, 3, 4, 5, 6]
    wide = Spec.parse({**ROUNDS, "search": {**ROUNDS["search"], "seeds": [3, 9, 4]}}, check_paths=False)
    assert first_round(wide) == [3, 9, 4]  # search.seeds beyond min_seeds are all kept
    assert seed_sequence(wide, 5) == [3, 9, 4, 10, 11]
    fixed = Spec.parse({**ROUNDS, "evidence": {"min_seeds": 5}}, check_paths=False)
    assert first_round(fixed) == [0, 1]  # no target: the fixed seeds, as without the section


def test_a_comparison_runs_seeds_in_rounds_until_the_rule_stops_resumed_after_a_stop(tmp_path: Path) -> None:
    """Stopped (SIGINT) once the first round is judged, then ``--resume``: the same parent run goes on
    with the next round's seed, and every arm has one child run per seed."""
    spec = tmp_path / "rounds.yaml"
    spec.write_text(yaml.safe_dump(ROUNDS))
    first = start_spec(tmp_path, spec)
    assert first.stdout is not None
    seen = []
    for line in first.stdout:
        seen.append(line)
        if line.startswith("rounds: 2 seeds"):
            first.send_signal(signal.SIGINT)
            break
    seen.append(first.communicate(timeout=300)[0])
    assert first.returncode == 128 + signal.SIGINT, "".join(seen)[-4000:]
    assert "continue with --resume" in "".join(seen)

    done = run_spec(tmp_path, spec, "--resume")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "rounds: 3 seeds" in out

    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.get_experiment_by_name("rounds-test")
    assert exp is not None
    runs = c.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("hdet.role") == "parent"]
    arms = sorted(
        (r.data.tags["hdet.arm"], r.data.tags["hdet.seed"], r.info.status)
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    )
    assert arms == [(arm, str(s), "FINISHED") for arm in ("baseline", "confirmatory") for s in range(3)]
    tags, metrics = parent.data.tags, parent.data.metrics
    assert json.loads(tags[SEEDS_RUN_TAG]) == [0, 1, 2]
    # 3 seeds: the cap, unless every difference was 0 (an interval of width 0 meets any target)
    assert tags[ROUNDS_STOP_TAG] in {"max seeds", "target reached"}
    assert metrics["confirmatory_diff_primary_n"] == 3
    summary = json.loads(Path(c.download_artifacts(parent.info.run_id, "evidence/summary.json")).read_text())
    comp = summary["confirmatory_comparison"]["AP"]
    assert comp["role"] == "primary" and comp["ci_method"] == "t-mixture-cs" and comp["n_pairs"] == 3
    assert tags[f"{PRIMARY_OUTCOME_TAG}.confirmatory_diff"] == f"AP: {comp['outcome']}"
    assert summary["seeds"] == [0, 1, 2] and summary["confirmatory"]["status"] == "completed"
    assert "verdict: On AP (the primary metric, tested alone at alpha 0.05)" in out
