"""`hdet plan` through its main function: seeds, trainings and hours, and the false-verdict rate and
coverage it measured; the SD given, or taken from a finished experiment in a real MLflow store."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from workers.cli import main as hdet
from workers.evidence.plan import main
from workers.evidence.sequential import Rule, simulate
from workers.tracking import Tag


def _percent(pattern: str, out: str) -> float:
    m = re.search(pattern + r" ([0-9.]+)%", out)
    assert m, out
    return float(m.group(1)) / 100


def test_a_target_half_width_plans_seeds_trainings_and_hours_with_measured_validity(capsys):
    assert main(["--sd", "2.4", "--target-halfwidth", "1.5", "--minutes-per-training", "20", "--parallel", "4",
                 "--experiments", "3000"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    sim = simulate(2.4, 0.0, Rule(target_halfwidth=1.5), 3000, np.random.default_rng(0))
    m = re.search(r"no true difference: seeds ([0-9.]+) expected, (\d+) at the 90th percentile", out)
    assert m, out
    assert float(m.group(1)) == pytest.approx(sim.mean_seeds, abs=0.05)
    assert int(m.group(2)) == int(np.quantile(sim.seeds, 0.9))
    assert f"trainings {2 * sim.mean_seeds:.0f} expected, {2 * int(m.group(2))} at the 90th" in out
    # rounds of 2 seeds = 4 trainings = one wave of 4 at a time: 20 min per round after the first
    # (10 trainings: 3 waves, 60 min)
    p90 = int(m.group(2))
    assert f"{(60 + 20 * (p90 - 5) / 2) / 60:.1f} h at the 90th percentile" in out
    false_rate, coverage = _percent("false-verdict rate", out), _percent("coverage", out)
    mc = 3 * math.sqrt(0.05 * 0.95 / 3000)
    assert false_rate <= 0.05 + mc and coverage >= 0.95 - mc
    assert "t-mixture confidence sequence (Lai 1976; Wang & Ramdas 2023)" in out


def test_an_effect_sets_the_target_and_its_power_is_measured(capsys):
    assert main(["--sd", "2.4", "--effect", "2", "--experiments", "2000"]) == 0
    out = capsys.readouterr().out
    assert "effect to detect: 2 -> target half-width" in out
    assert _percent(r"with a true difference of 2: found \(better\) in", out) >= 0.75
    assert "warning" not in out
    assert main(["--sd", "2.4", "--effect", "1", "--max-trainings", "40", "--experiments", "500"]) == 0
    out = capsys.readouterr().out
    assert "at most 20)" in out and "warning: 1 cannot be found with 80% power within 20 seeds" in out


def test_the_spec_evidence_section_is_the_rule_and_flags_override_it(tmp_path: Path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "plan", "dataset": {"format": "synthetic"},
        "search": {"space": {}, "baseline": True, "confirmatory": True},
        "evidence": {"target_halfwidth": 2.0, "min_seeds": 6, "round_size": 3, "max_seeds": 30},
    }))  # fmt: skip
    assert main(["--sd", "2.4", "--spec", str(spec), "--experiments", "500"]) == 0
    out = capsys.readouterr().out
    assert "6 seeds, then 3 per round until the half-width is <= 2 or 30 seeds" in out
    assert (
        hdet(["plan", "--sd", "2.4", "--spec", str(spec), "--max-seeds", "12", "--experiments", "500"]) == 0
    )
    assert "or 12 seeds" in capsys.readouterr().out


def test_bad_plans_name_the_field(capsys):
    assert main(["--sd", "2.4", "--min-seeds", "9", "--max-seeds", "5"]) == 2
    assert "evidence.min_seeds: 9 must be <= max_seeds (5)" in capsys.readouterr().err
    assert main(["--sd", "-1"]) == 2
    assert "--sd: must be > 0" in capsys.readouterr().err
    assert main(["--sd", "2.4", "--max-trainings", "20"]) == 2
    assert "evidence.max_trainings: needs target_halfwidth" in capsys.readouterr().err


def test_the_sd_can_come_from_a_finished_experiment(tmp_path: Path, capsys):
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("planned")
    parent = c.create_run(exp, tags={Tag.SPEC_NAME: "done"}).info.run_id
    c.log_param(parent, "search.seeds", "[0, 1, 2, 3, 4, 5]")
    c.log_param(parent, "train.epochs", "1")
    c.log_param(parent, "evidence.primary", "AP50")  # the primary named in the spec
    rng = np.random.default_rng(14)
    diffs = rng.normal(0.01, 0.03, size=6)
    for arm in ("baseline", "confirmatory"):
        for seed in range(6):
            run = c.create_run(exp, tags={MLFLOW_PARENT_RUN_ID: parent, Tag.TRIAL_ID: arm, Tag.ARM: arm,
                                          Tag.SEED: str(seed), Tag.TRIAL_STATUS: "completed"}).info.run_id  # fmt: skip
            ap50 = 0.5 + 0.01 * seed + (diffs[seed] if arm == "confirmatory" else 0.0)
            for key, value in (("AP", 0.3), ("AP50", ap50), ("epoch", 1.0)):
                c.log_metric(run, key, value, step=1)
            c.set_terminated(run)
    c.set_terminated(parent)
    assert (
        main(["--from-run", parent, "--tracking-uri", uri, "--target-halfwidth", "2", "--experiments", "500"])
        == 0
    )
    out = capsys.readouterr().out
    sd = 100 * float(np.std(diffs, ddof=1))
    assert f"paired-difference SD of the primary: {sd:g} (AP50 of the confirmatory comparison" in out
    assert "6 paired seeds" in out
    assert main(["--from-run", "0" * 32, "--tracking-uri", uri]) == 2
