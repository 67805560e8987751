"""scripts/finetune.py, the recipe probe behind docs/results.md's anchor table: a tiny spec's plain
training prints and writes one row per epoch, with the held-out split's AP."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import yaml
from hdet_run import tiny_spec_data

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "finetune.py"


def _script() -> object:
    spec = importlib.util.spec_from_file_location("finetune_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_epoch_gives_a_row_with_loss_ap_and_cpu_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec_data("probe", tmp_path, train={"epochs": 2})))
    out = tmp_path / "rows.json"
    assert _script().main([str(spec), "--seeds", "0", "--json", str(out)]) == 0  # type: ignore[attr-defined]
    rows = json.loads(out.read_text())
    assert [(r["seed"], r["epoch"]) for r in rows] == [(0, 1), (0, 2)]
    for r in rows:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert 0.0 <= r["AP75"] <= r["AP50"] <= 100.0 and 0.0 <= r["AP"] <= 100.0
    assert 0 < rows[0]["cpu_s"] < rows[1]["cpu_s"]  # CPU time of the training so far
    printed = capsys.readouterr().out
    assert "seed 0 epoch 2:" in printed and "final AP over seeds [0]" in printed


def test_an_unknown_option_is_refused() -> None:
    with pytest.raises(SystemExit) as e:
        _script().main(["spec.yaml", "--split", "train"])  # type: ignore[attr-defined]
    assert e.value.code == 2
