"""The experiment spec: bad input is refused with a message naming the field, before anything starts."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from harmonic.config import LossConfig
from workers.spec import LossSpec, Spec, SpecError, resolve_param_path
from workers.tracking import flatten_params

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BASE: dict[str, Any] = {"name": "t", "dataset": {"format": "synthetic"}}


def _with(**sections: Any) -> dict[str, Any]:
    return {**BASE, **sections}


def _error(data: dict[str, Any]) -> SpecError:
    with pytest.raises(SpecError) as info:
        Spec.parse(data)
    return info.value


@pytest.mark.parametrize(
    "data, path, words",
    [
        (_with(colour="red"), "colour", "unknown key"),
        (_with(loss={"gamma": 1.5}), "loss.gamma", "[0, 1]"),
        (_with(loss={"margin": -0.1}), "loss.margin", ">= 0"),
        (_with(loss={"alpha": 1.0, "temperature": 2}), "loss.temperature", "unknown key"),
        (_with(scaling={"num_workers": 0}), "scaling.num_workers", "greater than or equal to 1"),
        (_with(dataset={"format": "coco", "root": "/does/not/exist"}), "dataset.root", "does not exist"),
        (_with(train={"epochs": 2, "lr_steps": [3]}), "train.lr_steps", "outside"),
        (
            _with(search={"space": {"alpha": {"uniform": [2.0, 1.0]}}}),
            "search.space.alpha.uniform",
            "lo must be < hi",
        ),
        (_with(search={"space": {"colour": {"choice": [1]}}}), "search.space.colour", "not a field"),
        (_with(search={"space": {"lr": {"loguniform": [0.0, 1.0]}}}), "search.space.lr.loguniform", "> 0"),
        (
            _with(search={"space": {"alpha": {"uniform": [0.5, 2]}}, "algorithm": "grid"}),
            "search.space.alpha",
            "algorithm grid cannot sample a uniform range",
        ),
        (_with(eval={"score_thresh": 1.2}), "eval.score_thresh", "less than 1"),
        (_with(eval={"max_detections": 0}), "eval.max_detections", "greater than or equal to 1"),
        (_with(eval={"nms": 0.5}), "eval.nms", "unknown key"),
        (_with(dataset={"format": "synthetic", "test": -1}), "dataset.test", "number of images"),
        (_with(loss={"coupling": "p"}), "loss.coupling", "score"),
        (_with(loss={"fcos_loc": "l2"}), "loss.fcos_loc", "smooth_l1"),
    ],
)
def test_bad_spec_names_the_field(data: dict[str, Any], path: str, words: str) -> None:
    err = _error(data)
    paths = [p for p, _ in err.problems]
    assert path in paths, err
    msg = dict(err.problems)[path]
    assert words in msg, err
    assert f"{path}: " in str(err)


def test_missing_dataset_path_of_a_split_is_named(tmp_path: Path) -> None:
    err = _error(_with(dataset={"format": "coco", "root": str(tmp_path), "train": "train2017"}))
    assert "instances_train2017.json" in dict(err.problems)["dataset.train"]
    assert "does not exist" in dict(err.problems)["dataset.train"]
    err = _error(
        _with(dataset={"format": "coco", "root": str(tmp_path), "val": {"images": ".", "ann": "v.json"}})
    )
    assert "v.json" in dict(err.problems)["dataset.val"]


@pytest.mark.parametrize(
    "dataset, path",
    [
        ({"format": "synthetic", "train": "train2017"}, "dataset.train"),
        ({"format": "synthetic", "synth": {"wobble": 1}}, "dataset.synth"),
        ({"format": "synthetic", "synth": {"occlusion": 2.0}}, "dataset.synth"),
        ({"format": "coco", "root": "/", "image_size": 64}, "dataset.image_size"),
    ],
)
def test_synthetic_options_are_checked(dataset: dict[str, Any], path: str) -> None:
    assert path in dict(_error(_with(dataset=dataset)).problems)


def test_paths_can_be_left_unchecked_for_a_remote_cluster() -> None:
    spec = Spec.parse(_with(dataset={"format": "coco", "root": "/cluster/coco"}), check_paths=False)
    assert spec.dataset.root == "/cluster/coco"


def test_loss_section_mirrors_loss_config() -> None:
    assert set(LossSpec.model_fields) == {f.name for f in fields(LossConfig)}
    spec = Spec.parse(_with(loss={"kind": "harmonic", "alpha": 0.7, "tc": False}))
    cfg = spec.loss_config()
    assert (cfg.kind, cfg.alpha, cfg.tc, cfg.gamma) == ("harmonic", 0.7, False, LossConfig().gamma)


def test_overrides_take_dotted_and_bare_names_and_revalidate() -> None:
    spec = Spec.parse(BASE)
    trial = spec.with_overrides({"alpha": 1.2, "loss.margin": 0.3, "lr": 0.05, "train.seed": 4})
    assert (trial.loss.alpha, trial.loss.margin, trial.train.lr, trial.train.seed) == (1.2, 0.3, 0.05, 4)
    assert spec.loss.alpha == LossConfig().alpha  # the original is untouched
    with pytest.raises(SpecError, match=r"loss\.gamma"):
        spec.with_overrides({"gamma": 2.0})
    assert resolve_param_path("gamma") == "loss.gamma"
    assert resolve_param_path("train.warmup.iters") == "train.warmup.iters"
    with pytest.raises(KeyError):
        resolve_param_path("train.nothing")


def test_yaml_and_json_files_load_the_same(tmp_path: Path) -> None:
    data = _with(loss={"alpha": 1.1}, train={"epochs": 3})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "s.json").write_text(json.dumps(data))
    assert Spec.from_file(tmp_path / "s.yaml") == Spec.from_file(tmp_path / "s.json")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="cannot parse"):
        Spec.from_file(tmp_path / "bad.yaml")


def test_schema_exports_every_section() -> None:
    schema = Spec.model_json_schema()
    assert set(schema["properties"]) == {
        "name",
        "dataset",
        "detector",
        "loss",
        "eval",
        "train",
        "scaling",
        "search",
        "evidence",
        "tracking",
        "pretrain",
    }
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("name", ["tiny.yaml", "cpu-demo.yaml"])
def test_shipped_configs_are_valid(name: str) -> None:
    spec = Spec.from_file(CONFIGS / name)
    assert spec.search is None


def test_flatten_params_keeps_what_the_spec_said() -> None:
    params = flatten_params(Spec.parse(_with(train={"lr_steps": [1, 2], "epochs": 3})).to_dict())
    assert params["loss.alpha"] == "1.5"
    assert params["train.lr_steps"] == "[1, 2]"
    assert params["train.warmup.iters"] == "100"
    assert params["search"] == "null"


def test_spec_check_cli_reports_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from workers.spec import check_main

    (tmp_path / "s.yaml").write_text(yaml.safe_dump(_with(loss={"gamma": 1.5})))
    assert check_main([str(tmp_path / "s.yaml")]) == 2  # as hdet run: 2 = bad spec
    assert "loss.gamma:" in capsys.readouterr().err


def test_eval_protocol_and_test_split_defaults() -> None:
    spec = Spec.parse({**BASE, "dataset": {"format": "synthetic", "val": 12}})
    assert spec.eval.to_protocol().to_dict() == {
        "score_thresh": 0.05,
        "max_detections": 100,
        "nms_thresh": 0.5,
    }
    # a synthetic set holds out a test split as large as val unless told otherwise
    assert spec.dataset.synth_params()["test"] == 12 and spec.dataset.has_test()
    assert not Spec.parse({**BASE, "dataset": {"format": "synthetic", "test": 0}}).dataset.has_test()
    # the protocol is logged with the run, as every spec field is
    assert flatten_params(spec.to_dict())["eval.score_thresh"] == "0.05"


def test_coco_test_split_must_exist(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        (tmp_path / "annotations" / f"instances_{split}.json").write_text("{}")
    ok = {"format": "coco", "root": str(tmp_path), "train": "train", "val": "val"}
    assert not Spec.parse({**BASE, "dataset": ok}).dataset.has_test()
    err = _error({**BASE, "dataset": {**ok, "test": "test"}})
    assert any(p == "dataset.test" and "does not exist" in m for p, m in err.problems), err


def test_a_suite_file_validates_every_document_at_once(tmp_path: Path) -> None:
    one = {
        **BASE,
        "name": "a",
        "search": {"space": {}, "seeds": [0, 1], "baseline": True, "confirmatory": True},
    }
    two = {**BASE, "name": "b", "loss": {"gamma": 1.5}}
    three = {**BASE, "name": "a", "eval": {"score_thresh": 2}}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump_all([one, two, three]))
    with pytest.raises(SpecError) as info:
        Spec.suite_from_file(path)
    paths = [p for p, _ in info.value.problems]
    assert "#2: loss.gamma" in paths and "#3: eval.score_thresh" in paths and "name" in paths
    with pytest.raises(SpecError, match="holds 3 experiments"):
        Spec.from_file(path)
    path.write_text(yaml.safe_dump_all([one, {**BASE, "name": "b"}]))
    suite = Spec.suite_from_file(path)
    assert [s.name for s in suite] == ["a", "b"]
    assert suite[0].search is not None and suite[0].search.space == {}


def test_an_empty_space_needs_the_confirmatory_arm() -> None:
    err = _error(_with(search={"space": {}, "baseline": True}))
    assert any(p == "search.space" and "confirmatory" in m for p, m in err.problems), err


# --------------------------------------------------------------------------- complete, light, once

SPEC_DOC = Path(__file__).resolve().parents[2] / "docs" / "spec.md"


def _readme_invalid_spaces() -> list[tuple[str, str]]:
    """(space entry, field path) of every line of docs/spec.md's list of refused search spaces."""
    text = SPEC_DOC.read_text()
    block = text.split("<!-- invalid-search-spaces")[1].split("```text\n")[1].split("```")[0]
    out = []
    for line in block.strip().splitlines():
        entry, comment = line.split("#", 1)
        out.append((entry.strip(), comment.strip().split(":")[0]))
    return out


@pytest.mark.parametrize(("entry", "field"), _readme_invalid_spaces())
def test_every_refused_search_space_of_the_readme_is_refused_by_spec_check(
    tmp_path: Path, entry: str, field: str
) -> None:
    import subprocess
    import sys

    spec = {
        "name": "s",
        "dataset": {"format": "synthetic", "train": 8, "val": 4, "image_size": 64},
        "train": {"epochs": 3},
        "search": {"space": yaml.safe_load(entry)},
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    hdet = Path(sys.executable).parent / "hdet"
    done = subprocess.run([str(hdet), "spec", "check", str(path)], capture_output=True, text=True)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"  {field}:" in done.stderr, done.stderr


def test_a_spec_is_parsed_without_the_heavy_stack() -> None:
    """Parsing a spec (with a synthetic dataset, a pretraining and a search, as the REST API will)
    imports none of torch, scipy, pycocotools, PIL, ray, mlflow."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from workers.spec import Spec\n"
        f"Spec.suite_from_file({str(CONFIGS / 'demo.yaml')!r})\n"
        f"Spec.suite_from_file({str(CONFIGS / 'evidence-cpu.yaml')!r})\n"
        "heavy = [m for m in ('torch', 'scipy', 'pycocotools', 'PIL', 'ray', 'mlflow') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", f"parsing a spec imported {done.stdout.strip()}"


def test_every_problem_is_reported_at_once() -> None:
    """An unknown key does not hide a range error; a bad detector, the names of a search space and
    the loss are reported together."""
    data = {
        "name": "t",
        "dataset": {"format": "synthetic"},
        "detector": {"arch": "retinanet", "backbone": "resnet999"},
        "loss": {"foo": 1, "gamma": 1.5},
        "search": {"space": {"alpha": {"choice": [1.0]}, "loss.alpha": {"choice": [2.0]}}},
    }
    paths = {p for p, _ in _error(data).problems}
    assert {"detector.backbone", "loss.foo", "loss.gamma", "search.space.loss.alpha"} <= paths


@pytest.mark.parametrize(
    ("detector", "words"),
    [
        ({"arch": "retinanet", "backbone": "resnet999"}, "known backbones"),
        ({"arch": "ssd", "image_size": 64}, "needs image_size >= 268"),
        ({"arch": "ssdlite", "backbone": "resnet18_fpn"}, "cannot be used with ssdlite"),
        ({"arch": "faster_rcnn", "anchor_scale": 3}, "only retinanet takes it"),
        ({"arch": "retinanet", "anchor_scale": 0.5}, "must be a number in [1, 16]"),
    ],
)
def test_a_detector_that_cannot_be_built_is_refused_by_the_spec(detector: dict[str, Any], words: str) -> None:
    e = _error(_with(detector=detector))
    assert any(p.startswith("detector.") and words in m for p, m in e.problems), e.problems


def test_the_readme_option_table_is_the_generated_one() -> None:
    from workers.spec.cli import options_markdown

    text = SPEC_DOC.read_text()
    table = text.split("<!-- spec-options:begin -->\n")[1].split("<!-- spec-options:end -->")[0]
    assert table == options_markdown(), (
        "docs/spec.md option table is stale: paste `hdet spec options` into it"
    )


def test_the_option_table_covers_every_schema_field() -> None:
    from workers.spec.cli import option_rows

    paths = {row[0] for row in option_rows()}
    assert set(Spec.model_fields) <= paths
    assert {"loss.coupling", "search.confirmatory", "train.warmup.iters", "pretrain.lr"} <= paths
    assert all(meaning for _, _, _, meaning in option_rows())


# configs/paper/results/ holds the paper's reported numbers beside the specs, not specs.
@pytest.mark.parametrize(
    "path",
    sorted(
        p.relative_to(CONFIGS).as_posix()
        for p in CONFIGS.rglob("*.yaml")
        if "results" not in p.relative_to(CONFIGS).parts
    ),
)
def test_every_shipped_config_passes_spec_check(path: str) -> None:
    from workers.spec import check_main

    assert check_main(["--no-paths", str(CONFIGS / path)]) == 0


# --------------------------------------------------------------------------- precision and GPUs


@pytest.mark.parametrize("amp", ["auto", "off", "fp16", "bf16", True, False])
def test_every_amp_setting_is_accepted_as_given(amp: Any) -> None:
    assert Spec.parse(_with(train={"amp": amp})).train.amp == amp


@pytest.mark.parametrize("amp", ["fp32", "half", "on", 1])
def test_an_unknown_amp_setting_is_refused_naming_the_choices(amp: Any) -> None:
    msg = dict(_error(_with(train={"amp": amp})).problems)["train.amp"]
    assert "auto, off, fp16, bf16" in msg and repr(amp) in msg


@pytest.mark.parametrize(
    ("scaling", "words"),
    [
        ({"gpus_per_worker": 0}, "greater than 0"),
        ({"gpus_per_worker": -1}, "greater than 0"),
        ({"gpus_per_worker": 1.5}, "neither a whole number"),
        ({"gpus_per_worker": 0.5, "num_workers": 2}, "single-worker trainings"),
    ],
)
def test_a_gpu_share_that_ray_cannot_honour_is_refused(scaling: dict[str, Any], words: str) -> None:
    msg = dict(_error(_with(scaling=scaling)).problems)["scaling.gpus_per_worker"]
    assert words in msg


@pytest.mark.parametrize(("gpus", "workers"), [(0.25, 1), (0.5, 1), (1, 4), (2, 2), (2.0, 1)])
def test_whole_gpus_or_a_share_of_one_for_a_single_worker_are_accepted(gpus: float, workers: int) -> None:
    spec = Spec.parse(_with(scaling={"gpus_per_worker": gpus, "num_workers": workers}))
    assert spec.scaling.gpus_per_worker == gpus


def test_the_gpu_share_of_a_cpu_training_is_not_checked() -> None:
    # use_gpu: false reserves no GPU, so gpus_per_worker is not used
    scaling = {"use_gpu": False, "gpus_per_worker": 0.5, "num_workers": 2}
    assert Spec.parse(_with(scaling=scaling)).scaling.num_workers == 2
    with pytest.raises(SpecError, match="scaling.gpus_per_worker"):
        Spec.parse(_with(scaling={**scaling, "use_gpu": "auto"}))


def test_a_seeds_draw_of_the_training_images_is_checked() -> None:
    spec = Spec.parse({**BASE, "train": {"resample": "bootstrap", "resample_fraction": 0.8}})
    assert (spec.train.resample, spec.train.resample_fraction) == ("bootstrap", 0.8)
    for train, field in (
        ({"resample": "subsample"}, "train.resample_fraction"),
        ({"resample_fraction": 0.5}, "train.resample_fraction"),
        ({"resample": "jackknife"}, "train.resample"),
        ({"resample": "bootstrap", "resample_fraction": 1.5}, "train.resample_fraction"),
    ):
        with pytest.raises(SpecError) as e:
            Spec.parse({**BASE, "train": train})
        assert field in [p for p, _ in e.value.problems], e.value.problems


def test_memory_per_worker_becomes_rays_memory_resource() -> None:
    from workers.training.trainer import worker_resources

    spec = Spec.parse({**BASE, "scaling": {"memory_per_worker_gb": 1.5, "cpus_per_worker": 2}})
    assert worker_resources(spec, use_gpu=False) == {"CPU": 2.0, "memory": 1.5 * 2**30}
    assert worker_resources(Spec.parse(BASE), use_gpu=True) == {"CPU": 1.0, "GPU": 1.0}
    with pytest.raises(SpecError, match="scaling.memory_per_worker_gb"):
        Spec.parse({**BASE, "scaling": {"memory_per_worker_gb": 0}})


def test_a_stored_spec_with_an_unused_debug_section_still_parses() -> None:
    """Specs stored before ``train.debug`` left the spec (waiting records, resumed searches) parse;
    one that injects a fault is refused as an unknown key."""
    unused = {"crash_rank": None, "crash_after_epoch": 1, "crash_marker": None, "nonfinite_step": None}
    stored = _with(train={"epochs": 2, "debug": unused})
    assert Spec.parse(stored, check_paths=False).train.epochs == 2
    with pytest.raises(SpecError, match="train.debug"):
        Spec.parse(_with(train={"debug": {**unused, "nonfinite_step": 3}}), check_paths=False)
