"""``python -m workers.run``'s options for a submitter (the REST service): ``--spec-json`` instead of
a spec file, ``--tag KEY=VALUE`` on the MLflow parent run. No Ray: a bad spec exits 2 before Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from workers.run import _parser, main
from workers.spec import Spec
from workers.tracking import Tag, open_parent_run

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def test_spec_json_and_tags_are_parsed() -> None:
    args = _parser().parse_args(
        ["--spec-json", '{"name": "x"}', "--tag", f"{Tag.EXPERIMENT_ID}=exp-1", "--tag", "team=a=b"]
    )
    assert args.spec is None and args.spec_json == '{"name": "x"}'
    assert dict(args.tag) == {Tag.EXPERIMENT_ID: "exp-1", "team": "a=b"}


def test_a_spec_file_and_spec_json_together_are_refused() -> None:
    with pytest.raises(SystemExit) as e:
        _parser().parse_args([str(TINY), "--spec-json", "{}"])
    assert e.value.code == 2


def test_neither_a_spec_file_nor_spec_json_is_refused() -> None:
    with pytest.raises(SystemExit) as e:
        _parser().parse_args([])
    assert e.value.code == 2


@pytest.mark.parametrize("bad", ["novalue", "=value"])
def test_a_tag_without_key_and_value_is_refused(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["--spec-json", "{}", "--tag", bad])
    assert e.value.code == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_bad_spec_json_exits_2_naming_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    data = yaml.safe_load(TINY.read_text())
    data["loss"]["gamma"] = 1.5
    assert main(["--spec-json", json.dumps(data)]) == 2
    err = capsys.readouterr().err
    assert "loss.gamma" in err and "--spec-json" in err


def test_unparseable_spec_json_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--spec-json", "{not json"]) == 2
    assert "cannot parse" in capsys.readouterr().err


def test_extra_tags_land_on_the_parent_run_and_cannot_replace_its_own(tmp_path: Path) -> None:
    spec = Spec.parse(yaml.safe_load(TINY.read_text()), check_paths=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx = open_parent_run(spec, uri, extra_tags={Tag.EXPERIMENT_ID: "exp-0123456789abcdef", Tag.ROLE: "x"})
    tags = MlflowClient(tracking_uri=uri).get_run(ctx.parent_run_id).data.tags
    assert tags[Tag.EXPERIMENT_ID] == "exp-0123456789abcdef"
    assert tags[Tag.ROLE] == "parent"
