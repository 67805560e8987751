"""``eval.extra_score_thresholds``: the test split judged at more score thresholds from one inference.

The score cut of a run at a low threshold is what the detector gives when run at the higher one (real
torchvision detectors, tiny sizes); the option is validated; the metrics are named apart from the main
threshold's; the summary pairs each table's primary at each threshold and the report shows it as a
secondary result (against a real sqlite MLflow store).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from harmonic.analysis.suite import detection_metrics, score_cut
from workers.report import render_markdown
from workers.spec import Spec, SpecError
from workers.summary import (
    BEST_CONFIRMED_ID,
    CONFIRM_SEEDS_TAG,
    SearchSummary,
    at_score_thresh,
    collect_summary,
    log_summary,
    score_thresh_of,
)
from workers.tracking import Tag, flatten_params
from workers.training import recipe
from workers.training.epoch_metrics import evaluate_shard, held_out_metrics

BASE: dict[str, Any] = {"name": "t", "dataset": {"format": "synthetic"}}


# --------------------------------------------------------------------------- the option


@pytest.mark.parametrize(
    "extra, path, words",
    [
        ([0.05], "eval.extra_score_thresholds", "0.05 is score_thresh already"),
        ([0.001, 0.2, 0.001], "eval.extra_score_thresholds", "[0.001] given more than once"),
        ([1.0], "eval.extra_score_thresholds.0", "less than 1"),
        ([0.01, -0.1], "eval.extra_score_thresholds.1", "greater than or equal to 0"),
        (0.001, "eval.extra_score_thresholds", "valid list"),
    ],
)
def test_extra_score_thresholds_are_refused_naming_the_field(extra: Any, path: str, words: str) -> None:
    with pytest.raises(SpecError) as info:
        Spec.parse({**BASE, "eval": {"extra_score_thresholds": extra}})
    assert any(p == path and words in m for p, m in info.value.problems), info.value.problems


def test_extra_score_thresholds_default_to_none_and_stay_off_the_detector() -> None:
    plain = Spec.parse(BASE).eval
    assert plain.extra_score_thresholds == [] and plain.test_inference_thresh() is None
    ev = Spec.parse({**BASE, "eval": {"extra_score_thresholds": [0.2, 0.001]}}).eval
    assert ev.to_protocol() == plain.to_protocol()  # the detector's settings are the main threshold's
    assert ev.test_inference_thresh() == 0.001  # the one test inference runs at the lowest
    above = Spec.parse({**BASE, "eval": {"extra_score_thresholds": [0.3]}}).eval
    assert above.test_inference_thresh() is None  # none lower: the detector's own threshold
    assert flatten_params({"eval": ev.model_dump()})["eval.extra_score_thresholds"] == "[0.2, 0.001]"


def test_metric_names_at_a_threshold_read_back() -> None:
    assert at_score_thresh("test_AP", 0.001) == "test_AP_thr0.001"
    assert at_score_thresh("test_AP50", 1e-05) == "test_AP50_thr1e-05"
    assert score_thresh_of("test_ap_iou_50_thr0.2") == ("test_ap_iou_50", 0.2)
    assert score_thresh_of("test_AP") == ("test_AP", None)
    assert score_thresh_of("_thr0.1") == ("_thr0.1", None)


# --------------------------------------------------------------------------- one inference, several cuts


def _spread_scores(model: torch.nn.Module) -> None:
    """Random classification layers, so that an untrained detector's scores spread over (0, 1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("classification_head", "cls_logits", "cls_score")):
                p.normal_(0.0, 0.01 if p.dim() > 1 else 1.0)


def _same(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


@pytest.mark.parametrize("max_detections", [20, 300])
@pytest.mark.parametrize("arch", ["ssdlite", "retinanet", "faster_rcnn", "fcos"])
def test_the_score_cut_of_one_low_threshold_run_is_the_detector_run_at_the_higher_threshold(
    arch: str, max_detections: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HDET_HOME", str(tmp_path))
    torch.manual_seed(0)
    data_section = {"format": "synthetic", "train": 2, "val": 2, "test": 6, "image_size": 64, "seed": 0}
    spec = Spec.parse(
        {**BASE, "dataset": data_section, "detector": {"arch": arch, "image_size": 64},
         "eval": {"max_detections": max_detections}}
    )  # fmt: skip
    data = recipe.build_datasets(spec)
    assert data.test is not None
    model = recipe.build_model(spec, data.num_classes)
    _spread_scores(model)
    loader = recipe.eval_loader(data.test, batch_size=3)
    cats, cpu = data.test.label_to_cat_id, torch.device("cpu")

    low = evaluate_shard(model, loader, cpu, cats, with_pre_nms=False, score_thresh=0.001).dets
    holder = getattr(model, "roi_heads", model)
    assert holder.score_thresh == 0.05  # the detector's own threshold is back
    # the higher threshold: a detection's own score (the cut is strict), with detections on both sides
    scores = sorted(d["score"] for d in low)
    lowest = {i: min(d["score"] for d in low if d["image_id"] == i) for i in {d["image_id"] for d in low}}
    capped = max(lowest, key=lambda i: lowest[i])
    if max_detections == 20:
        # just below the image whose capped detections score highest: the cap binds there at both cuts
        high = max(x for x in scores if x < lowest[capped])
    else:
        high = scores[len(scores) // 2]
    direct = evaluate_shard(model, loader, cpu, cats, with_pre_nms=False, score_thresh=high).dets
    assert 0 < len(direct) < len(low)
    if max_detections == 20:  # that image's capped detections (less any background ones) all pass
        n_low, n_direct = (sum(d["image_id"] == capped for d in dets) for dets in (low, direct))
        assert n_direct == n_low >= max_detections - 3

    assert score_cut(low, high) == direct  # the same boxes, scores and order

    # the worker's metrics: the main threshold's from the cut, the extra's from the run itself
    m = held_out_metrics(data.test, low, False, high, [0.001])
    main = {k: v for k, v in m.items() if score_thresh_of(k)[1] is None}
    assert _same(main, detection_metrics(data.test, direct, False, prefix="test_"))
    extra = {score_thresh_of(k)[0]: v for k, v in m.items() if score_thresh_of(k)[1] == 0.001}
    assert _same(extra, detection_metrics(data.test, low, False, prefix="test_"))
    assert m["test_AR100"] != m["test_AR100_thr0.001"] or m["test_AR100"] == 0.0


def test_without_extra_thresholds_the_test_metrics_are_the_suite_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HDET_HOME", str(tmp_path))
    dets = [{"image_id": 1, "category_id": 1, "bbox": [1.0, 1.0, 10.0, 10.0], "score": 0.5}]
    spec = Spec.parse({**BASE, "dataset": {"format": "synthetic", "train": 2, "val": 2, "test": 2}})
    test = recipe.build_datasets(spec).test
    assert _same(
        held_out_metrics(test, dets, False, 0.05), detection_metrics(test, dets, False, prefix="test_")
    )


def test_a_score_cut_compares_in_float32_as_the_detectors_do() -> None:
    exactly = float(np.float32(0.05))  # a float32 score equal to the threshold is not above it
    dets = [{"score": exactly}, {"score": float(np.nextafter(np.float32(0.05), np.float32(1)))}]
    assert exactly > 0.05 and score_cut(dets, 0.05) == dets[1:]


# --------------------------------------------------------------------------- summary and report


def _store(tmp_path: Path, extra: str | None = "[0.001]") -> tuple[MlflowClient, str, str]:
    """A search of one configuration on seeds 0, 1, its best confirmed on fresh seeds 2, 3, the baseline
    on all four, with eval.extra_score_thresholds [0.001]: at 0.001 the best is 1 point below the
    baseline on the selecting seeds and 2 to 3 points above it on the fresh seeds."""
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.create_experiment("thresholds", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = c.create_run(exp, tags={Tag.SPEC_NAME: "search", CONFIRM_SEEDS_TAG: "[2, 3]"}).info.run_id
    params = {"search.seeds": "[0, 1]", "train.epochs": "1", "eval.score_thresh": "0.05"}
    if extra is not None:
        params["eval.extra_score_thresholds"] = extra
    for key, value in params.items():
        c.log_param(parent, key, value)
    base = {0: 0.20, 1: 0.22, 2: 0.21, 3: 0.25}
    arms = {
        ("t0", "search"): ({0: 0.24, 1: 0.265}, {0: 0.19, 1: 0.21}),
        (BEST_CONFIRMED_ID, BEST_CONFIRMED_ID): ({2: 0.22, 3: 0.265}, {2: 0.23, 3: 0.28}),
        ("baseline", "baseline"): (base, base),
    }
    for (tid, arm), (test_ap, at_001) in arms.items():
        for seed, ap in test_ap.items():
            tags = {MLFLOW_PARENT_RUN_ID: parent, Tag.TRIAL_ID: tid, Tag.ARM: arm, Tag.SEED: str(seed),
                    Tag.TRIAL_STATUS: "completed", Tag.CONFIG: '{"loss.alpha": 1.0}'}  # fmt: skip
            run = c.create_run(exp, tags=tags).info.run_id
            values = {"AP": ap + 0.1, "epoch": 1.0, "test_AP": ap, "test_AP_thr0.001": at_001[seed],
                      "test_APs_thr0.001": 0.5}  # fmt: skip
            for key, value in values.items():
                c.log_metric(run, key, value, step=1)
            c.set_terminated(run)
    return c, exp, parent


def test_the_summary_judges_each_tables_primary_at_each_extra_threshold(tmp_path: Path) -> None:
    c, exp, parent = _store(tmp_path)
    s = collect_summary(c, exp, parent, n_boot=1, history=False)
    assert s.judged_on == "test" and s.score_thresh == 0.05
    assert s.best_confirmed is not None and s.best_confirmed.per_seed[2]["test_AP_thr0.001"] == 0.23
    assert "test_APs_thr0.001" not in s.best_confirmed.per_seed[2]  # kept only as test_APs is
    tables = s.at_score_thresholds["0.001"]
    assert set(tables) == {"comparison", "exploratory_comparison"}
    fresh, selecting = tables["comparison"]["AP"], tables["exploratory_comparison"]["AP"]
    assert sorted(fresh["per_seed"]) == [2, 3] and fresh["mean_diff"] == pytest.approx(0.025)
    assert sorted(selecting["per_seed"]) == [0, 1] and selecting["mean_diff"] == pytest.approx(-0.01)
    # the main tables are those of the main threshold
    assert s.comparison["AP"]["mean_diff"] == pytest.approx(0.0125)
    back = SearchSummary.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back.at_score_thresholds["0.001"]["comparison"]["AP"]["per_seed"][3] == fresh["per_seed"][3]

    table = s.format_table()
    line = next(x for x in table.splitlines() if x.startswith("verdict at score threshold 0.001"))
    assert "AP (secondary: not part of the primary's verdict, which is at score threshold 0.05)" in line
    assert "mean difference +2.50 points, 95% t-interval [" in line and "on 2 paired seeds" in line
    assert table.count("verdict at score threshold 0.001") == 2  # one per table
    assert back.format_table() == table
    report = render_markdown(s)
    assert report.count("### Verdict at score threshold 0.001 (secondary)") == 2

    log_summary(c, parent, s)
    m = c.get_run(parent).data.metrics
    assert m["diff_AP_thr0.001"] == pytest.approx(0.025)
    assert m["exploratory_diff_AP_thr0.001"] == pytest.approx(-0.01)
    assert m["diff_AP_thr0.001_ci95_low"] < m["diff_AP_thr0.001"] < m["diff_AP_thr0.001_ci95_high"]
    assert m["diff_AP"] == pytest.approx(0.0125)


@pytest.mark.parametrize("extra", [None, "[]"])
def test_without_the_option_the_summary_has_no_threshold_section(tmp_path: Path, extra: str | None) -> None:
    c, exp, parent = _store(tmp_path, extra)
    s = collect_summary(c, exp, parent, n_boot=1, history=False)
    assert s.at_score_thresholds == {}
    assert "score threshold" not in s.format_table() and "score threshold" not in render_markdown(s)
    log_summary(c, parent, s)
    assert not [k for k in c.get_run(parent).data.metrics if "_thr" in k]
