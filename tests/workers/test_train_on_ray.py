"""End to end on a real local Ray: 2 CPU workers (DDP over gloo) train configs/tiny.yaml, tracked in a
real MLflow sqlite store.

One training run is shared by most tests (it is the expensive part): rank 1 is killed once after
the first epoch's checkpoint, so the same run proves both the normal path (metrics, plots, a
checkpoint that loads into plain torchvision) and recovery (resumed from the checkpoint, one
child run, no epoch logged twice). The faults come through the training hooks (tests/faults.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faults
import pytest
import ray
import yaml
from hdet_run import start_test_ray
from mlflow import MlflowClient

from workers.run import main as run_main
from workers.spec import Spec
from workers.tracking import open_parent_run

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
PLOTS = {"ap_vs_iou.png", "score_iou_density.png", "training_consistency.png", "iou_histogram.png"}


@pytest.fixture(scope="module")
def home(
    request: pytest.FixtureRequest, scratch: Callable[[pytest.FixtureRequest, str], Path]
) -> Iterator[Path]:
    """HDET_HOME for the module (generated data, storage), restored afterwards."""
    path = scratch(request, "hdet_home")
    old = os.environ.get("HDET_HOME")
    os.environ["HDET_HOME"] = str(path)
    yield path
    if old is None:
        os.environ.pop("HDET_HOME", None)
    else:
        os.environ["HDET_HOME"] = old


@pytest.fixture(scope="module")
def plan(home: Path) -> Path:
    """The fault plan file of the module's Ray (:mod:`faults`): no file, no fault."""
    return home / "faults.json"


@pytest.fixture(scope="module")
def local_ray(home: Path, plan: Path) -> Iterator[None]:
    with faults.installed(plan):  # the workers inherit the fault hooks
        start_test_ray(2)
    yield
    ray.shutdown()


def _write_spec(path: Path, **overrides: Any) -> Path:
    data = yaml.safe_load(TINY.read_text())
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def tiny_run(local_ray: None, home: Path, plan: Path) -> dict[str, Any]:
    """configs/tiny.yaml through `hdet run`, with rank 1 killed once at the start of epoch 2, and
    RetinaNet's anchors at 3 strides (its checkpoint must keep them)."""
    marker = home / "crashed.marker"
    spec = _write_spec(home / "tiny.yaml", **{"detector.anchor_scale": 3.0})
    uri = f"sqlite:///{home / 'mlflow.db'}"
    with faults.planned(plan, crash_rank=1, crash_after_epoch=1, crash_marker=str(marker)):
        rc = run_main([str(spec), "--tracking-uri", uri, "--storage-path", str(home / "storage")])
    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name("tiny")
    assert exp is not None
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("hdet.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("hdet.role") == "child"]
    return {"rc": rc, "uri": uri, "client": c, "parents": parents, "children": children, "marker": marker}


def test_tiny_run_finishes_with_parent_and_child_runs(tiny_run: dict[str, Any]) -> None:
    assert tiny_run["rc"] == 0
    (parent,) = tiny_run["parents"]
    (child,) = tiny_run["children"]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.status == child.info.status == "FINISHED"
    for run in (parent, child):
        assert run.data.tags["loss"] == "harmonicdet"
        assert run.data.tags["arch"] == "retinanet"
        assert run.data.tags["git_commit"]
        assert run.data.tags["harmonicdet_version"]
    assert child.data.params["loss.gamma"] == "0.8"
    assert child.data.params["scaling.num_workers"] == "2"


def test_child_run_has_every_epoch_metric_once(tiny_run: dict[str, Any]) -> None:
    c: MlflowClient = tiny_run["client"]
    (child,) = tiny_run["children"]
    for key in ("AP", "AP50", "AP75", "AP90", "ap_iou_95", "loss", "loss_classification", "train_aic",
                "train_one_plus_beta_r", "train_one_plus_beta_c", "images_per_s"):  # fmt: skip
        steps = [m.step for m in c.get_metric_history(child.info.run_id, key)]
        assert sorted(steps) == [1, 2], (key, steps)
    for key in ("AP", "AP50", "AP90"):
        assert 0.0 <= child.data.metrics[key] <= 1.0
    assert child.data.metrics["train_one_plus_beta_r"] > 1.0
    # the mechanism behind a result: the share of positives the loss pushes down, per epoch
    for key in ("train_pushed_down_share", "train_mean_score"):
        values = [m.value for m in c.get_metric_history(child.info.run_id, key)]
        assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values), (key, values)
    # the held-out test split is evaluated once, with the final model, under the spec's protocol
    for key in ("test_AP", "test_AP50", "test_AP90"):
        steps = [m.step for m in c.get_metric_history(child.info.run_id, key)]
        assert steps == [2], (key, steps)
    assert child.data.params["eval.score_thresh"] == "0.05"
    assert child.data.params["eval.max_detections"] == "100"


def test_killed_worker_resumes_from_its_checkpoint(tiny_run: dict[str, Any]) -> None:
    assert tiny_run["marker"].read_text().startswith("rank 1 exited at epoch 2")
    (child,) = tiny_run["children"]  # one child run, not one per attempt
    assert child.data.tags["hdet.starts"] == "2"
    assert child.data.tags["hdet.resumed_from_epoch"] == "1"


def test_child_run_has_plots_spec_and_best_checkpoint(tiny_run: dict[str, Any]) -> None:
    c: MlflowClient = tiny_run["client"]
    (child,) = tiny_run["children"]
    run_id = child.info.run_id
    plots = {Path(a.path).name for a in c.list_artifacts(run_id, "plots")}
    assert PLOTS <= plots
    top = {a.path for a in c.list_artifacts(run_id)}
    assert {"spec.json", "checkpoint", "environment"} <= top
    info_path = c.download_artifacts(run_id, "checkpoint/model.json")
    info = json.loads(Path(info_path).read_text())
    assert (info["arch"], info["image_size"], info["anchor_scale"]) == ("retinanet", 96, 3.0)
    assert info["num_classes"] == len(info["categories"]) + 1 == 6  # 5 shapes + background


def test_predict_loads_the_run_checkpoint_into_plain_torchvision(
    tiny_run: dict[str, Any], home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """... and leaves no download behind: each call fetched the checkpoint into the temp folder
    and left it there (74 MB a call here, gigabytes over a day of predictions)."""
    import tempfile

    from workers.predict import main as predict_main

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (child,) = tiny_run["children"]
    image = next((Path(Spec.from_file(TINY).dataset.resolved_root()) / "val").glob("*.png"))
    out = home / "pred"
    rc = predict_main(
        ["--run", child.info.run_id, "--tracking-uri", tiny_run["uri"], "--out", str(out), "--score-thresh", "0",
         "--compare", child.info.run_id, str(image)]
    )  # fmt: skip
    assert rc == 0
    record = json.loads((out / f"{image.stem}.json").read_text())
    assert record["model"]["arch"] == "retinanet"
    assert isinstance(record["detections"], list) and isinstance(record["compare_detections"], list)
    assert (out / f"{image.stem}.png").stat().st_size > 0
    assert (out / f"{image.stem}.compare.png").stat().st_size > 0
    assert list(tmp_path.iterdir()) == []


def test_predict_takes_the_parent_run_and_draws_what_the_model_found(
    tiny_run: dict[str, Any], home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The parent run id hdet run prints is enough; with no flag the drawing holds the model's own
    best detections (never none when it detected something) on an image enlarged to be readable."""
    from torchvision.io import read_image

    from workers.predict import DRAW_SIZE, TOP_K
    from workers.predict import main as predict_main

    (parent,) = tiny_run["parents"]
    (child,) = tiny_run["children"]
    image = next((Path(Spec.from_file(TINY).dataset.resolved_root()) / "val").glob("*.png"))
    out = home / "pred-parent"
    rc = predict_main(
        ["--run", parent.info.run_id, "--tracking-uri", tiny_run["uri"], "--out", str(out), str(image)]
    )
    assert rc == 0
    assert child.info.run_id in capsys.readouterr().out  # the training run it chose is said
    record = json.loads((out / f"{image.stem}.json").read_text())
    assert record["model"]["run_id"] == child.info.run_id
    dets = record["detections"]
    everything = home / "pred-all"
    assert predict_main(
        ["--run", child.info.run_id, "--tracking-uri", tiny_run["uri"], "--out", str(everything), "--score-thresh", "0",
         str(image)]
    ) == 0  # fmt: skip
    found = json.loads((everything / f"{image.stem}.json").read_text())["detections"]
    assert (
        len(dets) == min(TOP_K, len([d for d in found if d["score"] >= 0.3 * found[0]["score"]]))
        if found
        else not dets
    )
    assert dets == found[: len(dets)]  # the best ones, best first
    drawn = read_image(str(out / f"{image.stem}.png"))
    assert max(drawn.shape[1:]) >= DRAW_SIZE > record["width"]


def test_report_of_a_single_run(tiny_run: dict[str, Any], home: Path) -> None:
    """hdet report works for a run without a search: final metrics, history, plots, checkpoint."""
    from workers.report import main as report_main

    (child,) = tiny_run["children"]
    out = home / "report-tiny"
    assert report_main(["tiny", "--tracking-uri", tiny_run["uri"], "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "## Final metrics" in text and "| AP |" in text and "| test_AP |" in text
    assert f"hdet predict --run {child.info.run_id}" in text
    assert "| 2 |" in text  # the second epoch's row
    assert any(out.glob("*.png"))
    # a store that does not exist is named, and not created
    missing = home / "nowhere" / "mlflow.db"
    assert report_main(["tiny", "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert not missing.exists()


def test_non_finite_loss_stops_at_once_naming_step_and_term(
    local_ray: None, home: Path, plan: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _write_spec(
        home / "nan.yaml", **{"name": "tiny-nan", "train.epochs": 1, "tracking.experiment": "nan"}
    )
    uri = f"sqlite:///{home / 'mlflow-nan.db'}"
    with faults.planned(plan, nonfinite_step=1):
        rc = run_main([str(spec), "--tracking-uri", uri, "--storage-path", str(home / "storage")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 1" in err
    assert "loss term 'bbox_regression'" in err
    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name("nan")
    assert exp is not None
    (child,) = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("hdet.role") == "child"]
    assert child.info.status == "FAILED"
    assert "non-finite loss at step 1" in child.data.tags["hdet.error"]
    assert child.data.tags["hdet.starts"] == "1"  # not retried although max_failures is 2


def test_broken_dataset_is_refused_before_training(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = home / "broken"
    (root / "annotations").mkdir(parents=True)
    (root / "train").mkdir()
    (root / "val").mkdir()
    ann = {
        "images": [{"id": 1, "file_name": "missing.png", "width": 32, "height": 32}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, -5, 4], "area": 1, "iscrowd": 0}
        ],
        "categories": [{"id": 1, "name": "a"}],
    }
    for split in ("train", "val"):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(ann))
    spec = _write_spec(
        home / "broken.yaml", dataset={"format": "coco", "root": str(root), "train": "train", "val": "val"}
    )
    uri = f"sqlite:///{home / 'mlflow-broken.db'}"
    assert run_main([str(spec), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "dataset refused" in err and "missing.png" in err
    assert not Path(uri.removeprefix("sqlite:///")).exists()  # nothing was started or created


def test_bad_spec_is_refused_before_anything_starts(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _write_spec(home / "bad.yaml", **{"loss.gamma": 1.5})
    assert run_main([str(spec), "--tracking-uri", f"sqlite:///{home / 'mlflow-bad.db'}"]) == 2
    assert "loss.gamma: 1.5 is outside [0, 1]" in capsys.readouterr().err


def test_open_parent_run_resume_reuses_the_parent(home: Path) -> None:
    uri = f"sqlite:///{home / 'mlflow-resume.db'}"
    spec = Spec.from_file(TINY)
    first = open_parent_run(spec, uri)
    again = open_parent_run(spec, uri, resume=True)
    fresh = open_parent_run(spec, uri)
    assert again.parent_run_id == first.parent_run_id
    assert fresh.parent_run_id != first.parent_run_id
