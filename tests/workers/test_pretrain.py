"""Backbone pretraining (``pretrain`` section, ``hdet pretrain``) and the starting weights of a training
(``detector.pretrained_backbone``, ``detector.init_from``): cached, tracked, checked before anything starts."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hdet_run import start_test_ray
from torch import nn

from harmonic.detectors import build_detector, build_torchvision_detector
from workers import pretrain as pretrain_mod
from workers.pretrain import BACKBONE_FILE, META_FILE, ensure_pretrained, pretrain_key, pretrained_dir
from workers.spec import Spec, SpecError
from workers.training.weights import fetch_run_artifact, load_detector_state, resolve_start_weights

TINY_PRETRAIN = {"images": 12, "val_images": 8, "epochs": 1, "batch_size": 6, "seed": 7}


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HDET_HOME", str(tmp_path / "home"))
    torch.set_num_threads(1)
    return tmp_path / "home"


def _spec(arch: str = "retinanet", backbone: str | None = "resnet18_fpn", **pretrain: Any) -> Spec:
    return Spec.parse(
        {
            "name": "pre",
            "dataset": {"format": "synthetic", "train": 4, "val": 2, "test": 0, "image_size": 64, "seed": 0},
            "detector": {"arch": arch, "backbone": backbone, "image_size": 64},
            "pretrain": {**TINY_PRETRAIN, **pretrain},
        }
    )


def _is_body_of(model: nn.Module, state: dict[str, torch.Tensor], body: nn.Module) -> None:
    own = body.state_dict()
    assert set(state) <= set(own)
    for k, v in state.items():
        assert torch.equal(own[k], v), k
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_pretraining_gives_a_file_the_detector_loads_into_its_body(_home: Path) -> None:
    spec = _spec()
    done = ensure_pretrained(spec, say=lambda _: None)
    assert not done.cached
    assert done.path == pretrained_dir() / pretrain_key(spec) / BACKBONE_FILE
    meta = done.meta
    assert meta["body"] == "resnet18" and meta["norm"] == "group" and meta["image_size"] == 64
    assert meta["data"]["seed"] == 7 and meta["epochs"] == 1 and "val_map" in meta["final"]
    assert len(meta["sha256"]) == 64

    state = torch.load(done.path, weights_only=True)
    assert not any(k.startswith("fc.") for k in state)
    torch.manual_seed(3)
    model = build_detector(
        "retinanet", 6, backbone="resnet18_fpn", image_size=64, pretrained_backbone=done.path
    )
    _is_body_of(model, state, model.backbone.body)
    assert isinstance(model.backbone.body.bn1, nn.GroupNorm)
    assert all(p.requires_grad for p in model.parameters())  # GroupNorm pretraining: every layer trains
    # fresh heads: the same as a detector built from scratch with the same seed
    torch.manual_seed(3)
    scratch = build_detector("retinanet", 6, backbone="resnet18_fpn", image_size=64)
    for (k, v), (k2, v2) in zip(model.head.state_dict().items(), scratch.head.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert not torch.equal(model.backbone.body.conv1.weight, scratch.backbone.body.conv1.weight)


def test_loader_processes_assemble_the_same_batches() -> None:
    """``data_workers`` only moves the batch assembly: same order, labels and maps; with the
    training transforms' random flips off, the same images too."""
    from harmonic.data import build_dataset
    from harmonic.pretrain import _batches

    spec = _spec()
    assert spec.pretrain is not None
    ds = build_dataset(spec.pretrain.dataset_spec(64).build_config(), "train", with_masks=True)
    order = [5, 2, 9, 0, 11, 3, 7]
    serial = list(_batches(ds, order, 3, 48, ds.num_classes))
    loaded = list(_batches(ds, order, 3, 48, ds.num_classes, workers=2, seed=1))
    assert [b[0].shape for b in loaded] == [(3, 3, 48, 48), (3, 3, 48, 48), (1, 3, 48, 48)]
    for a, b in zip(serial, loaded, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    assert int(serial[0][2].max()) > 0  # the maps hold objects


def test_pretraining_with_loader_processes_is_recorded(_home: Path) -> None:
    done = ensure_pretrained(_spec(seed=8), say=lambda _: None, data_workers=2)
    assert done.meta["device"] == "cpu" and done.meta["final"]["train_loss"] > 0


def test_ssdlite_body_is_pretrained_with_its_reduced_tail() -> None:
    done = ensure_pretrained(_spec("ssdlite", None), say=lambda _: None)
    assert done.meta["body"] == "mobilenet_v3_large_reduced"
    state = torch.load(done.path, weights_only=True)
    model = build_torchvision_detector("ssdlite", 6, image_size=64, pretrained_backbone=done.path)
    first, second = model.backbone.features
    # the SSDlite extractor regroups the MobileNet blocks: compare a block on each side of the split
    assert torch.equal(first[0][0].weight, state["features.0.0.weight"])
    assert torch.equal(second[-1][0].weight, state["features.16.0.weight"])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_second_call_is_a_cache_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec()
    first = ensure_pretrained(spec, say=lambda _: None)

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cache was not used")

    monkeypatch.setattr("harmonic.pretrain.pretrain_body", no_training)
    t0 = time.perf_counter()
    again = ensure_pretrained(spec, say=lambda _: None)
    assert time.perf_counter() - t0 < 1.0
    assert again.cached and again.path == first.path
    assert again.meta["sha256"] == first.meta["sha256"]


@pytest.mark.parametrize(
    "change",
    [
        {"epochs": 2},
        {"lr": 0.001},
        {"seed": 8},
        {"images": 13},
        {"synth": {"clutter": 0}},
        {"task": "classify"},
    ],
)
def test_key_changes_with_what_defines_the_result(change: dict[str, Any]) -> None:
    assert pretrain_key(_spec(**change)) != pretrain_key(_spec())


def test_key_changes_with_backbone_and_image_size_not_with_root(tmp_path: Path) -> None:
    base = _spec()
    assert pretrain_key(_spec(backbone="resnet34_fpn")) != pretrain_key(base)
    assert pretrain_key(base.with_overrides({"detector.image_size": 96})) != pretrain_key(base)
    # the body of RetinaNet, FCOS and Faster R-CNN with one backbone is the same: one file serves all
    assert pretrain_key(_spec("fcos")) == pretrain_key(base)
    assert pretrain_key(_spec(root=str(tmp_path / "elsewhere"))) == pretrain_key(base)


def test_an_interrupted_pretraining_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("harmonic.pretrain.pretrain_body", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_pretrained(_spec(), say=lambda _: None)
    left = [p for p in pretrained_dir().iterdir() if not p.name.endswith(".lock")]
    assert left == []


def test_pretraining_is_an_mlflow_run_that_runs_uri_names(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = _spec(epochs=2)
    done = ensure_pretrained(spec, tracking_uri=uri, say=lambda _: None)
    run_id = done.meta["mlflow_run_id"]
    c = MlflowClient(uri)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["hdet.role"] == "pretrain"
    assert run.data.tags["hdet.pretrain_key"] == pretrain_key(spec)
    assert run.data.params["pretrain.epochs"] == "2"
    assert [m.step for m in c.get_metric_history(run_id, "val_map")] == [1, 2]
    got = fetch_run_artifact(f"runs:/{run_id}", "pretrained/backbone.pt", uri, "detector.pretrained_backbone")
    assert got.read_bytes() == done.path.read_bytes()

    # runs:/ as detector.pretrained_backbone: downloaded, checked, written into the spec as a file
    plain = Spec.parse({**spec.to_dict(), "pretrain": None, "detector": {**spec.to_dict()["detector"],
                                                                        "pretrained_backbone": f"runs:/{run_id}"}})  # fmt: skip
    resolved = resolve_start_weights(plain, uri, say=lambda _: None)
    assert Path(str(resolved.detector.pretrained_backbone)).read_bytes() == done.path.read_bytes()


def test_hdet_run_resolves_the_pretraining_for_every_training(tmp_path: Path) -> None:
    spec = _spec()
    resolved = resolve_start_weights(spec, f"sqlite:///{tmp_path / 'm.db'}", say=lambda _: None)
    assert resolved.detector.pretrained_backbone == str(pretrained_dir() / pretrain_key(spec) / BACKBONE_FILE)
    # what trainings and trials receive still validates (the file is the pretraining's own output)
    again = Spec.parse(resolved.to_dict(), check_paths=False)
    assert again.detector.pretrained_backbone == resolved.detector.pretrained_backbone
    assert (pretrained_dir() / pretrain_key(spec) / META_FILE).is_file()


def test_init_from_loads_a_whole_detector_strictly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_detector("ssdlite", 6, image_size=64)
    path = tmp_path / "model.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    target = build_detector("ssdlite", 6, image_size=64)
    load_detector_state(target, path)
    for (k, v), v2 in zip(target.state_dict().items(), source.state_dict().values()):
        assert torch.equal(v, v2), k


def test_init_from_refuses_a_detector_that_does_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(build_detector("ssdlite", 4, image_size=64).state_dict(), path)
    with pytest.raises(ValueError, match=r"detector\.init_from: .*model\.pt.*does not fit.*shape mismatch"):
        load_detector_state(build_detector("ssdlite", 6, image_size=64), path)
    torch.save({"not": "tensors"}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match=r"detector\.init_from: .*junk\.pt.*does not hold a state_dict"):
        load_detector_state(build_detector("ssdlite", 6, image_size=64), tmp_path / "junk.pt")


def _plain(**detector: Any) -> Spec:
    return Spec.parse(
        {
            "name": "w",
            "dataset": {"format": "synthetic", "train": 4, "val": 2, "test": 0, "image_size": 64, "seed": 0},
            "detector": {"arch": "retinanet", "backbone": "resnet18_fpn", "image_size": 64, **detector},
        }
    )


def test_bad_starting_weights_are_named_before_anything_starts(tmp_path: Path) -> None:
    from torchvision.models import resnet34

    junk = tmp_path / "junk.pt"
    junk.write_text("not a torch file")
    other = tmp_path / "resnet34.pt"
    torch.save(resnet34(weights=None).state_dict(), other)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cases = [
        (_plain(pretrained_backbone=str(junk)), "detector.pretrained_backbone", "cannot read"),
        (_plain(pretrained_backbone=str(other)), "detector.pretrained_backbone", "does not fit"),
        (_plain(init_from="runs:/0123456789abcdef0123456789abcdef"), "detector.init_from", "no MLflow run"),
        (_plain(init_from=str(junk)), "detector.init_from", "cannot read"),
    ]
    for spec, field, words in cases:
        with pytest.raises(SpecError) as info:
            resolve_start_weights(spec, uri, say=lambda _: None)
        (path, msg), *_ = info.value.problems
        assert path == field and words in msg, (path, msg)


def test_hdet_run_exits_2_on_bad_weights_and_creates_no_run(tmp_path: Path) -> None:
    import yaml
    from mlflow import MlflowClient

    from workers.run import main

    junk = tmp_path / "junk.pt"
    junk.write_text("not a torch file")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(_plain(pretrained_backbone=str(junk)).to_dict()))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main([str(spec_file), "--tracking-uri", uri]) == 2
    assert MlflowClient(uri).search_experiments()[0].name == "Default"  # no experiment, no parent run


@pytest.mark.parametrize(
    "pretrain, dataset, detector, path, words",
    [
        ({"seed": 0}, {}, {}, "pretrain.seed", "benchmark dataset's seed"),
        ({"seed": 5}, {"seed": 5}, {}, "pretrain.seed", "benchmark dataset's seed"),
        ({"root": "/tmp/hdet-bench-root"}, {"root": "/tmp/hdet-bench-root"}, {}, "pretrain.root", "root"),
        ({"synth": {"colour": 1}}, {}, {}, "pretrain.synth", "unknown parameter"),
        ({"task": "detect"}, {}, {}, "pretrain.task", "segment"),
        ({"epochs": 0}, {}, {}, "pretrain.epochs", "greater than or equal to 1"),
        ({"extra": 1}, {}, {}, "pretrain.extra", "unknown key"),
        ({}, {}, {"pretrained_backbone": "/"}, "detector.pretrained_backbone", "remove one"),
        (None, {}, {"init_from": "runs:/"}, "detector.init_from", "run reference"),
        (None, {}, {"pretrained_backbone": "runs:/a b"}, "detector.pretrained_backbone", "run reference"),
    ],
)
def test_bad_pretrain_fields_are_named(
    pretrain: dict[str, Any] | None, dataset: dict[str, Any], detector: dict[str, Any], path: str, words: str
) -> None:
    data: dict[str, Any] = {
        "name": "p",
        "dataset": {"format": "synthetic", **dataset},
        "detector": {"arch": "retinanet", "backbone": "resnet18_fpn", **detector},
    }
    if pretrain is not None:
        data["pretrain"] = {"seed": 1000, **pretrain}
    with pytest.raises(SpecError) as info:
        Spec.parse(data)
    (got, msg), *_ = info.value.problems
    assert got == path and words in msg, (got, msg)


def test_the_search_cannot_change_what_the_pretraining_was_made_for() -> None:
    with pytest.raises(SpecError) as info:
        Spec.parse(
            {
                "name": "p",
                "dataset": {"format": "synthetic"},
                "pretrain": {},
                "search": {
                    "space": {"pretrain.lr": {"choice": [0.1]}, "detector.image_size": {"choice": [64]}}
                },
            }
        )
    (path, msg), *_ = info.value.problems
    assert path == "search.space" and "pretrain.lr" in msg and "detector.image_size" in msg


def test_pretrain_cli_trains_then_hits_the_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(_spec().to_dict()))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert pretrain_mod.main([str(spec_file), "--tracking-uri", uri]) == 0
    assert "trained in" in capsys.readouterr().out
    assert pretrain_mod.main([str(spec_file), "--tracking-uri", uri]) == 0
    assert "cached" in capsys.readouterr().out


def test_init_from_a_training_run_is_downloaded_and_checked(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    c = MlflowClient(uri)
    run_id = c.create_run(c.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())).info.run_id
    # a training run's best checkpoint: checkpoint/model.pt, 5 synthetic classes + background
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save(
        build_detector("retinanet", 6, backbone="resnet18_fpn", image_size=64).state_dict(), ckpt / "model.pt"
    )
    c.log_artifacts(run_id, str(ckpt), artifact_path="checkpoint")
    resolved = resolve_start_weights(_plain(init_from=f"runs:/{run_id}"), uri, say=lambda _: None)
    local = Path(str(resolved.detector.init_from))
    assert local.is_file() and local.read_bytes() == (ckpt / "model.pt").read_bytes()


def test_flip_augmentation_replaces_ssds_pipeline() -> None:
    from harmonic.data.transforms import build_transforms

    def kinds(arch: str, augment: str) -> list[str]:
        return [type(t).__name__ for t in build_transforms(arch, 64, True, augment=augment).transforms]

    assert "RandomZoomOut" in kinds("ssdlite", "detector")
    assert kinds("ssdlite", "flip") == kinds("retinanet", "detector") == kinds("retinanet", "flip")
    with pytest.raises(ValueError, match="augment"):
        build_transforms("ssdlite", 64, True, augment="mosaic")


# --------------------------------------------------------------------------- as a Ray task


@pytest.fixture(scope="module")
def fake_gpu_ray() -> Any:
    """A local Ray whose node declares one GPU torch cannot use (a CPU machine's fake resource)."""
    import ray

    if torch.cuda.is_available():
        pytest.skip("the fake GPU must be one torch cannot use")
    start_test_ray(2, num_gpus=1)
    yield
    ray.shutdown()


def test_pretraining_runs_in_a_ray_task_then_hits_the_cache(
    fake_gpu_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from workers.resources import NODE_TYPES_ENV

    # auto on a node with a GPU, but the declared node types have none: the task reserves the CPU
    monkeypatch.setenv(NODE_TYPES_ENV, '[{"CPU": 4}]')
    spec = _spec(seed=9).with_overrides({"scaling.use_gpu": "auto"})
    done = pretrain_mod.pretrain_on_ray(spec, say=lambda _: None)
    assert not done.cached
    assert done.path == pretrained_dir() / pretrain_key(spec) / BACKBONE_FILE
    assert done.meta["pid"] != os.getpid() and done.meta["device"] == "cpu"
    assert done.path.is_file() and len(done.meta["sha256"]) == 64

    def no_task(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cached pretraining started a task")

    monkeypatch.setattr(pretrain_mod, "_pretrain_task", no_task)
    again = pretrain_mod.pretrain_on_ray(spec, say=lambda _: None)
    assert again.cached and again.path == done.path and again.meta["sha256"] == done.meta["sha256"]


def test_a_driver_that_cannot_see_the_tasks_file_stores_the_copy_it_returns(
    fake_gpu_ray: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, _home: Path
) -> None:
    from workers.resources import NODE_TYPES_ENV

    monkeypatch.setenv(NODE_TYPES_ENV, '[{"CPU": 4}]')
    spec = _spec(seed=12)
    key = pretrain_key(spec)
    # the driver's cache elsewhere than the task's, as on a node whose $HDET_HOME is not shared
    driver_cache = tmp_path / "driver-cache"
    monkeypatch.setattr(pretrain_mod, "pretrained_dir", lambda: driver_cache)
    done = pretrain_mod.pretrain_on_ray(spec, say=lambda _: None)
    tasks_file = _home / "pretrained" / key / BACKBONE_FILE
    assert done.path == driver_cache / key / BACKBONE_FILE != tasks_file
    assert done.path.read_bytes() == tasks_file.read_bytes()
    assert json.loads((driver_cache / key / META_FILE).read_text())["sha256"] == done.meta["sha256"]


def test_the_pretraining_task_reserves_the_gpu_auto_resolves_to(
    fake_gpu_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.resources import NODE_TYPES_ENV
    from workers.training.errors import DeviceMismatchError

    monkeypatch.delenv(NODE_TYPES_ENV, raising=False)
    spec = _spec(seed=10).with_overrides({"scaling.use_gpu": "auto"})
    # Ray gave the task the node's GPU, which torch cannot use here: refused, raised as itself
    with pytest.raises(DeviceMismatchError, match="assigned this worker GPU 0, but torch sees no CUDA"):
        pretrain_mod.pretrain_on_ray(spec, say=lambda _: None)
    assert pretrain_mod.cached_pretraining(spec) is None


def test_hdet_run_pretrains_in_a_ray_task_before_training(
    fake_gpu_ray: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    import yaml

    from workers.run import main

    spec = _spec(seed=11).with_overrides(
        {"scaling.use_gpu": False, "train.epochs": 1, "train.batch_size": 2, "tracking.experiment": "pre"}
    )
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec.to_dict()))
    argv = [
        str(spec_file),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'm.db'}",
        "--storage-path",
        str(tmp_path / "s"),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "a Ray task with 1 CPU, 0 GPU" in out
    assert "pretrain: cached" not in out  # trained just now: not reported as found in the cache
    meta = json.loads((pretrained_dir() / pretrain_key(spec) / META_FILE).read_text())
    assert meta["pid"] != os.getpid() and meta["device"] == "cpu"
