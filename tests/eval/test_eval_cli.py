"""``hdet eval`` from the command line router."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.eval import make_eval_set
from harmonic.eval_cli import main as eval_main
from workers.cli import main as hdet


def _write_set(tmp_path: Path) -> tuple[Path, Path]:
    gt, dets = make_eval_set(30, 15, seed=1, n_categories=4, unused_categories=1)
    gt_path, det_path = tmp_path / "gt.json", tmp_path / "dets.json"
    gt_path.write_text(json.dumps(gt))
    det_path.write_text(json.dumps(dets))
    return gt_path, det_path


def test_eval_json_has_every_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt_path, det_path = _write_set(tmp_path)
    rc = hdet(["eval", "--gt", str(gt_path), "--dets", str(det_path), "--json", "--voc", "--consistency"])
    assert rc == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert set(out) == {"stats", "per_class", "ap_vs_iou", "voc", "consistency"}
    assert list(out["stats"]) == "AP AP50 AP75 APs APm APl AR1 AR10 AR100 ARs ARm ARl".split()
    assert list(out["ap_vs_iou"]) == [f"{0.5 + 0.05 * i:.2f}" for i in range(10)]
    assert out["ap_vs_iou"]["0.50"] == pytest.approx(out["stats"]["AP50"])
    assert set(out["per_class"]) == {"class1", "class2", "class3", "class4"}
    assert list(out["voc"]) == ["AP", "AP50", "AP60", "AP70", "AP80", "AP90"]
    assert 0.0 <= out["consistency"]["aic"] <= 1.0
    assert 0.0 < out["stats"]["AP"] < 1.0


def test_eval_table_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt_path, det_path = _write_set(tmp_path)
    assert eval_main(["--gt", str(gt_path), "--dets", str(det_path)]) == 0
    table = capsys.readouterr().out
    assert "AP @ IoU 0.50:0.95" in table and "class1" in table
    assert eval_main(["--gt", str(tmp_path / "missing.json"), "--dets", str(det_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert eval_main(["--gt", str(gt_path), "--dets", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
