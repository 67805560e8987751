"""The spec's evidence section: defaults, errors that name the field, and the rule a finished run's
parent params give back."""

from __future__ import annotations

from typing import Any

import pytest

from workers.evidence.sequential import Rule
from workers.spec import Spec, SpecError
from workers.summary.store import evidence_plan
from workers.tracking import flatten_params

BASE: dict[str, Any] = {
    "name": "ev",
    "dataset": {"format": "synthetic"},
    "search": {"space": {}, "seeds": [0, 1], "baseline": True, "confirmatory": True},
}


def _problems(evidence: dict[str, Any], **extra: Any) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as e:
        Spec.parse({**BASE, **extra, "evidence": evidence}, check_paths=False)
    return e.value.problems


def test_a_spec_without_the_section_judges_ap_on_its_fixed_seeds():
    spec = Spec.parse(BASE, check_paths=False)
    assert spec.evidence is None and spec.to_dict()["evidence"] is None
    assert evidence_plan(flatten_params(spec.to_dict())) == ("AP", Rule())


def test_the_section_defaults_and_its_rule():
    spec = Spec.parse({**BASE, "evidence": {"target_halfwidth": 1.5}}, check_paths=False)
    ev = spec.evidence
    assert ev is not None
    assert (ev.primary, ev.alpha, ev.min_seeds, ev.max_seeds, ev.round_size) == ("AP", 0.05, 5, 64, 2)
    assert ev.max_trainings is None and ev.equivalence_margin is None
    rule = ev.rule()
    assert (
        rule.target_halfwidth == 1.5 and rule.equivalence_margin == 1.5
    )  # the margin defaults to the target
    assert rule.looks()[:3] == [5, 7, 9] and rule.looks()[-1] == 64


def test_the_parent_runs_params_give_the_same_rule_back():
    data = {**BASE, "evidence": {"primary": "AP75", "target_halfwidth": 1.0, "max_trainings": 50,
                                 "equivalence_margin": 2.0, "alpha": 0.1}}  # fmt: skip
    spec = Spec.parse(data, check_paths=False)
    assert spec.evidence is not None
    assert evidence_plan(flatten_params(spec.to_dict())) == ("AP75", spec.evidence.rule())
    assert spec.evidence.rule().seed_cap == 25


@pytest.mark.parametrize(
    ("evidence", "path", "words"),
    [
        ({"min_seeds": 9, "max_seeds": 5}, "evidence.min_seeds", "must be <= max_seeds (5)"),
        (
            {"target_halfwidth": 1.0, "max_trainings": 8},
            "evidence.max_trainings",
            "cannot pay for the first round",
        ),
        ({"max_trainings": 40}, "evidence.max_trainings", "needs target_halfwidth"),
        ({"primary": "AR100"}, "evidence.primary", "'AP', 'AP50'"),
        ({"alpha": 0.5}, "evidence.alpha", "less than 0.5"),
        ({"target_halfwidth": 0}, "evidence.target_halfwidth", "greater than 0"),
        ({"round_size": 0}, "evidence.round_size", "greater than or equal to 1"),
        ({"min_seeds": 1}, "evidence.min_seeds", "greater than or equal to 2"),
        ({"seeds": 3}, "evidence.seeds", "unknown key"),
    ],
)
def test_bad_sections_name_the_field(evidence: dict[str, Any], path: str, words: str):
    problems = _problems(evidence)
    assert any(p == path and words in m for p, m in problems), problems


def test_rounds_need_both_arms_of_the_comparison():
    search = {
        **BASE["search"], "space": {"alpha": {"uniform": [0.5, 2.5]}}, "confirmatory": False, "confirm_best": False,
    }  # fmt: skip
    problems = _problems({"target_halfwidth": 1.0}, search=search)
    assert problems == [
        (
            "evidence.target_halfwidth",
            "seeds in rounds compare the confirmatory arm (or search.arms, or a search's best configuration "
            "with confirm_best) with the baseline; set search.baseline and search.confirmatory to true, or "
            "list arms",
        )
    ]
    # a search whose best is confirmed on fresh seeds: the confirmation goes on in rounds
    confirming = {**search, "confirm_best": True}
    assert Spec.parse(
        {**BASE, "search": confirming, "evidence": {"target_halfwidth": 1.0}}, check_paths=False
    )
    # fixed seeds judge any comparison: the section alone is fine
    assert Spec.parse({**BASE, "search": search, "evidence": {"primary": "AP50"}}, check_paths=False)
