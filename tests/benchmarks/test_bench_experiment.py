"""hdet bench experiment: its specs are the demo's comparison, and a training's time is read from
a real MLflow store as the sum of its epochs' times."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks.experiment import DEMO_SPEC, comparison_spec, main, training_times
from workers.pretrain import pretrain_key
from workers.spec import Spec


def _args(**kw: object) -> argparse.Namespace:
    base = {"images": 64, "epochs": 1, "image_size": None, "cpus_per_training": 1.0}
    return argparse.Namespace(**{**base, **kw})


def test_the_comparison_is_the_demos_without_its_search(tmp_path: Path) -> None:
    spec = Spec.parse(comparison_spec(_args(), tmp_path, "b", [0, 1, 2], ("baseline", "confirmatory")))
    demo = Spec.from_file(DEMO_SPEC, check_paths=False)
    assert spec.search is not None and spec.search.space == {} and spec.search.seeds == [0, 1, 2]
    assert spec.search.baseline and spec.search.confirmatory
    assert pretrain_key(spec) == pretrain_key(demo)  # the demo's cached body serves the bench
    assert spec.loss == demo.loss and spec.eval == demo.eval and spec.detector == demo.detector
    assert spec.dataset.train == 64 and spec.train.epochs == 1


@pytest.mark.parametrize("arm", ["baseline", "confirmatory"])
def test_an_arm_alone_trains_that_arm_only(tmp_path: Path, arm: str) -> None:
    spec = Spec.parse(comparison_spec(_args(), tmp_path, "b", [0], (arm,)))
    full = Spec.parse(comparison_spec(_args(), tmp_path, "b", [0], ("baseline", "confirmatory")))
    assert spec.search is not None and not spec.search.baseline and spec.search.confirmatory
    # the one arm trained is the baseline's training (the standard loss) or the confirmatory arm's
    assert spec.loss.kind == ("standard" if arm == "baseline" else full.loss.kind)
    assert spec.loss.kind != "standard" or arm == "baseline"


def test_training_times_sum_each_childs_epoch_times(tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from workers.tracking import Tag

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("e")
    parent = c.create_run(exp).info.run_id
    other = c.create_run(exp).info.run_id
    for arm, times in (("baseline", [1.5, 2.0]), ("confirmatory", [3.0, 4.0, 0.5])):
        run = c.create_run(exp, tags={MLFLOW_PARENT_RUN_ID: parent, Tag.ARM: arm}).info.run_id
        for step, value in enumerate(times, 1):
            c.log_metric(run, "epoch_time_s", value, step=step)
    stray = c.create_run(exp, tags={MLFLOW_PARENT_RUN_ID: other, Tag.ARM: "baseline"}).info.run_id
    c.log_metric(stray, "epoch_time_s", 99.0, step=1)
    assert training_times(uri, parent) == {"baseline": [3.5], "confirmatory": [7.5]}


def test_bad_arguments_are_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--seeds", "0"])
    assert e.value.code == 2
    assert "--seeds" in capsys.readouterr().err
