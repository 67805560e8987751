"""Several arms against one baseline (``search.arms``): the spec's rules, the family-wise error
across the arms shown by simulation, the ranking and its best set, and a summary read back from a
real sqlite MLflow store and logged on its parent run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from workers.evidence.arms import rank_arms, simulate_family
from workers.evidence.sequential import Rule
from workers.report import render_markdown
from workers.search.runner import fixed_arm_overrides
from workers.spec import Spec, SpecError
from workers.summary import LISTED_ARM, SearchSummary, collect_summary, log_summary
from workers.tracking import Tag, flatten_params

pytestmark = pytest.mark.unit

BASE: dict[str, Any] = {
    "name": "arms",
    "dataset": {"format": "synthetic", "train": 8, "val": 4, "test": 4, "image_size": 64},
    "detector": {"arch": "retinanet", "backbone": "resnet18_fpn", "image_size": 64},
    "loss": {"kind": "harmonicdet"},
}
ARMS = {
    "giou": {"kind": "standard", "box": "giou"},
    "qfl": {"kind": "standard", "cls": "quality_focal"},
    "pisa": {"kind": "pisa"},
}


def _spec(**search: Any) -> Spec:
    return Spec.parse(
        {**BASE, "search": {"space": {}, "seeds": [0, 1], "baseline": True, **search}}, check_paths=False
    )


def _problems(**search: Any) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as e:
        _spec(**search)
    return e.value.problems


# --------------------------------------------------------------------------- the spec


def test_arms_are_loss_sections_judged_with_the_confirmatory_arm_as_one_family():
    spec = _spec(confirmatory=True, arms=ARMS)
    assert spec.search is not None
    assert spec.search.compared_arms() == ["confirmatory", "giou", "qfl", "pisa"]
    rule = spec.evidence_rule()
    assert rule.alpha == pytest.approx(0.05 / 4) and rule.arms == 5
    # an arm replaces the whole loss section: the spec's harmonicdet does not leak into it
    over = fixed_arm_overrides(spec, "giou")
    assert over["loss.kind"] == "standard" and over["loss.box"] == "giou" and over["loss.cls"] is None
    seed_spec = spec.model_copy(update={"search": None}).with_overrides(over, check_paths=False)
    assert seed_spec.loss.to_config().label == "standard+box=giou"
    # a comparison of arms alone needs no confirmatory arm and no search space
    only = _spec(arms={"giou": ARMS["giou"]}).search
    assert only is not None and only.compared_arms() == ["giou"]


@pytest.mark.parametrize(
    ("search", "path", "words"),
    [
        ({"arms": {"Giou": {"kind": "standard"}}}, "search.arms", "lower-case letters"),
        ({"arms": {"baseline": {"kind": "standard"}}}, "search.arms", "names another arm"),
        ({"arms": {"giou": {"box": "giou"}}}, "search.arms.giou.kind", "an arm names its kind"),
        ({"arms": {"giou": {"kind": "standard"}}, "baseline": False}, "search", "set baseline: true"),
        ({"arms": {"giou": {"kind": "standard", "box": "gio"}}}, "search.arms.giou.box", ""),
        ({"arms": {"giou": {"kind": "standard", "nope": 1}}}, "search.arms.giou.nope", "unknown key"),
    ],
)
def test_a_bad_arm_is_refused_naming_its_field(search: dict[str, Any], path: str, words: str):
    problems = _problems(**search)
    assert any(p.startswith(path) and words in m for p, m in problems), problems


def test_an_arm_the_head_cannot_take_is_refused_naming_the_arm():
    data = {**BASE, "detector": {"arch": "ssdlite", "image_size": 64}, "loss": {"kind": "standard"}}
    with pytest.raises(SpecError) as e:
        Spec.parse(
            {
                **data,
                "search": {
                    "space": {},
                    "seeds": [0],
                    "baseline": True,
                    "arms": {"q": {"kind": "standard", "cls": "quality_focal"}},
                },
            },
            check_paths=False,
        )
    ((path, message),) = e.value.problems
    assert path == "search.arms.q.cls" and "softmax" in message


def test_rounds_must_pay_for_every_arm_of_the_first_round():
    evidence = {"target_halfwidth": 1.0, "min_seeds": 4, "max_trainings": 12}
    with pytest.raises(SpecError) as e:
        Spec.parse(
            {
                **BASE,
                "evidence": evidence,
                "search": {"space": {}, "seeds": [0], "baseline": True, "arms": ARMS},
            },
            check_paths=False,
        )
    assert any(
        p == "evidence.max_trainings" and "4 arms x min_seeds = 16" in m for p, m in e.value.problems
    ), e.value.problems


# --------------------------------------------------------------------------- the statistics


def test_bonferroni_keeps_the_familywise_error_of_3_null_arms_at_alpha_and_without_it_does_not():
    """3 arms, no true difference, the baseline shared: any false verdict counts. 40,000 simulated
    comparisons each; the rates' Monte-Carlo SE is about 0.0011 (0.0017 at 0.13)."""
    fixed = Rule(alpha=0.05, min_seeds=6)
    corrected = simulate_family([0.0, 0.0, 0.0], fixed, 40_000, np.random.default_rng(0))
    plain = simulate_family([0.0, 0.0, 0.0], fixed, 40_000, np.random.default_rng(0), correct=False)
    assert corrected.familywise_false_rate <= 0.05 + 3 * corrected.mc_error(0.05)
    assert corrected.simultaneous_coverage >= 0.95 - 3 * corrected.mc_error(0.05)
    assert plain.familywise_false_rate > 0.10  # each arm at 0.05: the family is wrong 2-3 times as often
    # seeds in rounds, stopped when every arm's interval is narrow enough: still valid
    rounds = Rule(alpha=0.05, target_halfwidth=1.5, min_seeds=4, max_seeds=30, round_size=2)
    seq = simulate_family([0.0, 0.0, 0.0], rounds, 40_000, np.random.default_rng(1))
    assert seq.familywise_false_rate <= 0.05 + 3 * seq.mc_error(0.05)
    assert 4 < seq.mean_seeds < 30  # the rounds stopped before the cap on most runs
    # the best set keeps the truly best arm (one arm 1 SD ahead, another half a SD)
    ahead = simulate_family([1.0, 0.5, 0.0], fixed, 40_000, np.random.default_rng(2))
    assert ahead.best_left_out_rate <= 0.05 + 3 * ahead.mc_error(0.05)


def _per_seed(values: dict[str, list[float]]) -> dict[str, dict[int, dict[str, float]]]:
    return {a: {s: {"AP": v, "aic": 0.3} for s, v in enumerate(vals)} for a, vals in values.items()}


def test_the_ranking_orders_the_arms_and_its_best_set_leaves_out_only_arms_found_worse():
    noise = [0.001, -0.002, 0.0015, -0.001, 0.002, -0.0005, 0.0, 0.001]
    base = [0.20 + 0.01 * (s % 3) for s in range(8)]
    values = {
        "baseline": base,
        "strong": [b + 0.05 + n for b, n in zip(base, noise, strict=True)],
        "twin": [b + 0.05 - n for b, n in zip(base, noise, strict=True)],  # as strong: indistinguishable
        "weak": [b + n for b, n in zip(base, noise, strict=True)],
    }
    rows = rank_arms(_per_seed(values), {}, primary="AP", alpha=0.05)
    assert [r["arm"] for r in rows[:2]] == sorted(["strong", "twin"], key=lambda a: -np.mean(values[a]))
    by = {r["arm"]: r for r in rows}
    assert by["strong"]["in_best_set"] and by["twin"]["in_best_set"]
    assert not by["weak"]["in_best_set"] and set(by["weak"]["beaten_by"]) == {"strong", "twin"}
    assert not by["baseline"]["in_best_set"]
    assert by["strong"]["pairs"] == 6 and [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert by["weak"]["mean"] == pytest.approx(np.mean(values["weak"]))


# --------------------------------------------------------------------------- a summary in MLflow

SEEDS = list(range(8))
NOISE = [0.002, -0.003, 0.001, 0.004, -0.002, 0.003, -0.001, 0.0]
BASE_AP = {s: 0.20 + 0.01 * (s % 3) for s in SEEDS}
#: test AP per arm: giou 5 points above the baseline on every seed; the others within noise of it
TEST_AP = {
    "baseline": BASE_AP,
    "confirmatory": {s: BASE_AP[s] + NOISE[s] for s in SEEDS},
    "giou": {s: BASE_AP[s] + 0.05 + NOISE[s] / 2 for s in SEEDS},
    "pisa": {s: BASE_AP[s] - NOISE[s] for s in SEEDS},
}


@pytest.fixture(scope="module")
def arms_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[MlflowClient, str, str]:
    home = tmp_path_factory.mktemp("arms")
    c = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = c.create_experiment("arms", artifact_location=(home / "artifacts").as_uri())
    parent = c.create_run(exp, tags={Tag.SPEC_NAME: "arms"}).info.run_id
    spec = _spec(confirmatory=True, arms={"giou": ARMS["giou"], "pisa": ARMS["pisa"]}, seeds=SEEDS)
    for key, value in flatten_params(spec.to_dict()).items():
        c.log_param(parent, key, value)
    for arm, test_ap in TEST_AP.items():
        listed = arm in ("giou", "pisa")
        config = fixed_arm_overrides(spec, arm) if listed else {}
        for seed, ap in test_ap.items():
            tags = {MLFLOW_PARENT_RUN_ID: parent, Tag.TRIAL_ID: arm, Tag.ARM: LISTED_ARM if listed else arm,
                    Tag.SEED: str(seed), Tag.TRIAL_STATUS: "completed", Tag.CONFIG: json.dumps(config)}  # fmt: skip
            run = c.create_run(exp, tags=tags).info.run_id
            for key, value in (
                ("AP", ap + 0.1),
                ("epoch", 1.0),
                ("test_AP", ap),
                ("test_aic", 0.3 - ap / 10),
            ):
                c.log_metric(run, key, value, step=1)
            c.set_terminated(run)
    return c, exp, parent


def test_each_arm_is_judged_at_alpha_over_k_and_the_arms_are_ranked(arms_store):
    c, exp, parent = arms_store
    s = collect_summary(c, exp, parent, n_boot=1, history=False)
    assert s.family == {
        "arms": ["confirmatory", "giou", "pisa"],
        "k": 3,
        "alpha": 0.05,
        "method": "bonferroni",
    }
    assert [a.trial_id for a in s.arms] == ["giou", "pisa"] and s.judged_on == "test"
    giou = s.arm_comparisons["giou"]["AP"]
    # 8 seeds: the exact Wilcoxon test, all 8 differences positive: p = 2 / 2^8, below 0.05 / 3
    assert giou["test"] == "wilcoxon" and giou["p_value"] == pytest.approx(2 / 256)
    assert giou["p_adjusted"] == pytest.approx(3 * 2 / 256) and giou["alpha"] == pytest.approx(0.05 / 3)
    assert giou["outcome"] == "better" and giou["family_k"] == 3
    assert giou["ci_confidence"] >= 1 - 0.05 / 3 - 1e-9  # the exact interval's achieved level
    conf = s.confirmatory_comparison["AP"]
    assert conf["alpha"] == pytest.approx(0.05 / 3) and conf["outcome"] == "undecided"
    assert conf["p_adjusted"] == pytest.approx(min(1.0, 3 * conf["p_value"]))
    ranked = [r["arm"] for r in s.ranking]
    assert ranked[0] == "giou" and set(ranked) == {"giou", "confirmatory", "pisa", "baseline"}
    assert [r["arm"] for r in s.ranking if r["in_best_set"]] == ["giou"]
    # the summary's JSON form comes back whole
    again = SearchSummary.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again.arm_comparisons["giou"]["AP"]["per_seed"][0]["diff"] == pytest.approx(0.05 + NOISE[0] / 2)
    assert [a.trial_id for a in again.arms] == ["giou", "pisa"]
    assert json.dumps(again.ranking) == json.dumps(s.ranking)


def test_the_parent_run_and_the_report_carry_the_ranked_arms(arms_store):
    c, exp, parent = arms_store
    s = collect_summary(c, exp, parent, n_boot=1, history=False)
    log_summary(c, parent, s)
    m = c.get_run(parent).data.metrics
    assert m["arm_giou_diff_AP"] == pytest.approx(np.mean([0.05 + n / 2 for n in NOISE]))
    assert m["arm_giou_diff_AP_p_adjusted"] == pytest.approx(3 * 2 / 256)
    assert m["rank_giou"] == 1.0 and m["best_set_giou"] == 1.0 and m["best_set_baseline"] == 0.0
    assert m["arm_pisa_test_AP"] == pytest.approx(np.mean(list(TEST_AP["pisa"].values())))
    assert c.get_run(parent).data.tags["hdet.primary_outcome.arm_giou_diff"] == "AP: better"
    report = render_markdown(s)
    assert "## Arms ranked against the standard loss, on the test split" in report
    assert "| 1 | giou | standard+box=giou | 8 |" in report
    assert "Bonferroni over the 3 arms, each at alpha 0.05/3 = 0.0167" in report
    assert "## Arm giou (standard+box=giou) vs the standard loss" in report
    assert "tested at alpha 0.05/3 = 0.0167: Bonferroni over the 3 arms" in report
    table = s.format_table()
    assert "arms ranked (4, the baseline included):" in table and "loss pisa" in table


def test_collect_summary_of_a_comparison_without_arms_keeps_alpha(tmp_path: Path):
    """One arm judged against the baseline is a family of one: nothing changes for it."""
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.create_experiment("one", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = c.create_run(exp).info.run_id
    for key, value in flatten_params(_spec(confirmatory=True, seeds=[0, 1, 2]).to_dict()).items():
        c.log_param(parent, key, value)
    for arm in ("baseline", "confirmatory"):
        for seed in (0, 1, 2):
            tags = {MLFLOW_PARENT_RUN_ID: parent, Tag.TRIAL_ID: arm, Tag.ARM: arm, Tag.SEED: str(seed),
                    Tag.TRIAL_STATUS: "completed"}  # fmt: skip
            run = c.create_run(exp, tags=tags).info.run_id
            c.log_metric(run, "AP", 0.2 + 0.01 * seed + (0.02 if arm == "confirmatory" else 0), step=1)
            c.log_metric(run, "epoch", 1.0, step=1)
            c.set_terminated(run)
    s = collect_summary(c, exp, parent, n_boot=1, history=False)
    comp = s.confirmatory_comparison["AP"]
    assert comp["alpha"] == 0.05 and comp["family_k"] == 1 and comp["p_adjusted"] == comp["p_value"]
    assert s.ranking == [] and s.arms == [] and s.family["k"] == 1


def test_a_design_that_cannot_decide_is_warned_of_before_it_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
):
    """4 arms at 0.05/4: the exact Wilcoxon test on 6 or 7 seeds never reaches 0.0125 (2/64, 2/128)."""
    arms = {**ARMS, "balanced": {"kind": "standard", "box": "balanced_l1"}}
    for seeds, warned in (
        ([0, 1, 2, 3, 4], False),
        (list(range(6)), True),
        (list(range(7)), True),
        (list(range(8)), False),
    ):
        got = _spec(arms=arms, seeds=seeds).design_warnings()
        assert bool(got) == warned, (seeds, got)
    (warning,) = _spec(arms=arms, seeds=list(range(6))).design_warnings()
    assert (
        "cannot give p below 0.0312" in warning and "0.05/4 = 0.0125" in warning and "at least 8" in warning
    )
    assert _spec(confirmatory=True, seeds=list(range(6))).design_warnings() == []  # one arm: 0.0312 < 0.05
    from workers.spec import check_main

    path = tmp_path / "arms.yaml"
    path.write_text(
        json.dumps({**BASE, "search": {"space": {}, "seeds": list(range(6)), "baseline": True, "arms": arms}})
    )
    assert check_main(["--no-paths", str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        "comparison of 4 arms against the baseline" in out
        and "warning: search.seeds: with 6 fixed seeds" in out
    )


def test_an_arm_that_failed_leaves_the_others_judged_on_the_test_split(tmp_path: Path):
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.create_experiment("failed-arm", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = c.create_run(exp).info.run_id
    spec = _spec(arms={"giou": ARMS["giou"], "pisa": ARMS["pisa"]}, seeds=[0, 1, 2])
    for key, value in flatten_params(spec.to_dict()).items():
        c.log_param(parent, key, value)
    for arm, status in (("baseline", "completed"), ("giou", "completed"), ("pisa", "failed")):
        for seed in (0, 1, 2):
            tags = {MLFLOW_PARENT_RUN_ID: parent, Tag.TRIAL_ID: arm, Tag.ARM: arm if arm == "baseline" else LISTED_ARM,
                    Tag.SEED: str(seed), Tag.TRIAL_STATUS: status}  # fmt: skip
            run = c.create_run(exp, tags=tags).info.run_id
            c.log_metric(run, "AP", 0.2 + 0.01 * seed, step=1)
            c.log_metric(run, "epoch", 1.0, step=1)
            if status == "completed":  # the failed arm never reached its test evaluation
                c.log_metric(run, "test_AP", 0.2 + 0.01 * seed + (0.02 if arm == "giou" else 0), step=1)
            c.set_terminated(run, status="FINISHED" if status == "completed" else "FAILED")
    s = collect_summary(c, exp, parent, n_boot=1, history=False)
    assert s.judged_on == "test" and s.family["k"] == 2  # the family was planned with both arms
    assert set(s.arm_comparisons) == {"giou"} and s.arm_comparisons["giou"]["AP"]["alpha"] == pytest.approx(
        0.025
    )
    assert {r["arm"] for r in s.ranking} == {"baseline", "giou"}
    assert [a.status for a in s.arms] == ["completed", "failed"]
