"""A loss described by its parts in a spec: accepted where the detector's head takes it, refused by
``hdet spec check`` with the field and the reason where it does not; the presets parse as before."""

from __future__ import annotations

import json
from typing import Any

import pytest

from harmonic.config import LossConfig, LossConfigError
from workers.spec import Spec, SpecError

BASE: dict[str, Any] = {"name": "t", "dataset": {"format": "synthetic"}}


def _spec(arch: str, loss: dict[str, Any], **extra: Any) -> dict[str, Any]:
    detector = {"arch": arch, "image_size": 300 if arch == "ssd" else 256}
    return {**BASE, "detector": detector, "loss": loss, **extra}


def _problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as info:
        Spec.parse(data, check_paths=False)
    return info.value.problems


@pytest.mark.parametrize(
    ("arch", "loss"),
    [
        ("retinanet", {"kind": "standard", "cls": "quality_focal", "box": "giou"}),
        ("fcos", {"kind": "pisa", "cls": "varifocal", "box": "ciou", "box_extra": "l1"}),
        ("retinanet", {"kind": "standard", "cls": "ghm_c", "box": "balanced_l1"}),
        (
            "fcos",
            {"kind": "harmonicdet", "cls": "quality_focal", "box": "smooth_l1", "fcos_loc": "smooth_l1"},
        ),
        ("ssd", {"kind": "pisa", "box": "diou", "carl_k": 2.0, "carl_bias": 0.0}),
        ("ssdlite", {"kind": "standard", "cls": "ce", "box": "balanced_l1"}),
        ("dssd", {"kind": "harmonic", "box": "giou", "box_extra": "hiou", "box_extra_weight": 2.0}),
        ("faster_rcnn", {"kind": "pisa", "box": "giou"}),
        ("mask_rcnn", {"kind": "standard", "box": "ciou"}),
        ("refinedet", {"kind": "harmonicdet", "cls": None, "box": None}),
    ],
)
def test_parts_a_head_takes_are_accepted(arch: str, loss: dict[str, Any]) -> None:
    spec = Spec.parse(_spec(arch, loss), check_paths=False)
    cfg = spec.loss_config()
    assert {k: getattr(cfg, k) for k in loss} == loss


@pytest.mark.parametrize(
    ("arch", "loss", "path", "words"),
    [
        ("ssdlite", {"cls": "quality_focal"}, "loss.cls", "needs a sigmoid classification head"),
        ("ssd", {"cls": "varifocal"}, "loss.cls", "retinanet, fcos"),
        ("faster_rcnn", {"kind": "standard", "cls": "ghm_c"}, "loss.cls", "softmax"),
        ("mask_rcnn", {"cls": "focal"}, "loss.cls", "take ce"),
        ("fcos", {"cls": "ce"}, "loss.cls", "sigmoid classifier per class"),
        ("refinedet", {"box": "giou"}, "loss.box", "presets only"),
        ("refinedet", {"kind": "pisa"}, "loss.kind", "presets only"),
        ("fcos", {"box": "diou", "fcos_loc": "smooth_l1"}, "loss.fcos_loc", "give it as box"),
        ("retinanet", {"kind": "harmonicdet", "cls": "ghm_c"}, "loss.cls", "gradient density"),
        ("retinanet", {"cls": "varifocal", "sigmoid_cls": "bce"}, "loss.sigmoid_cls", "leave sigmoid_cls"),
        ("retinanet", {"box": "l2"}, "loss.box", "smooth_l1"),
        ("retinanet", {"box_extra_weight": -1.0}, "loss.box_extra_weight", ">= 0"),
        ("retinanet", {"kind": "pisa", "carl_bias": 1.5}, "loss.carl_bias", "[0, 1]"),
        ("retinanet", {"kind": "pisa", "carl_k": -1.0}, "loss.carl_k", ">= 0"),
    ],
)
def test_parts_a_head_cannot_take_are_refused_naming_the_field(
    arch: str, loss: dict[str, Any], path: str, words: str
) -> None:
    problems = _problems(_spec(arch, loss))
    assert any(p == path and words in m for p, m in problems), problems


def test_spec_check_prints_the_refusal(tmp_path, capsys) -> None:
    from workers.spec.cli import check_main

    f = tmp_path / "spec.json"
    f.write_text(json.dumps(_spec("ssdlite", {"kind": "standard", "cls": "quality_focal"})))
    assert check_main([str(f)]) == 2
    out = capsys.readouterr()
    assert "loss.cls: quality_focal needs a sigmoid classification head" in out.out + out.err


def test_a_search_over_a_part_a_head_cannot_take_is_refused() -> None:
    data = _spec(
        "ssdlite", {"kind": "standard"}, search={"space": {"loss.cls": {"choice": ["ce", "varifocal"]}}}
    )
    problems = _problems(data)
    assert any(p == "search.space.loss.cls.choice" and "varifocal" in m for p, m in problems), problems


@pytest.mark.parametrize("kind", ["standard", "harmonic", "harmonicdet"])
def test_the_presets_parse_to_the_configs_they_were(kind: str) -> None:
    cfg = Spec.parse(_spec("retinanet", {"kind": kind}), check_paths=False).loss_config()
    assert cfg == LossConfig(kind=kind)
    assert (cfg.cls, cfg.box, cfg.box_extra, cfg.has_parts, cfg.label) == (None, None, None, False, kind)


def test_the_label_names_the_kind_and_its_parts() -> None:
    cfg = LossConfig(kind="pisa", cls="varifocal", box="giou", box_extra="smooth_l1", box_extra_weight=0.5)
    assert cfg.label == "pisa+cls=varifocal+box=giou+box_extra=0.5*smooth_l1"
    assert cfg.has_parts and not cfg.is_harmonic


def test_loss_config_refuses_ghm_c_under_the_harmonic_coupling() -> None:
    with pytest.raises(LossConfigError, match="loss.cls: ghm_c"):
        LossConfig(kind="harmonic", cls="ghm_c")


def test_the_baseline_arm_trains_the_detectors_own_loss_whatever_the_parts() -> None:
    from workers.search.runner import fixed_arm_overrides

    plain = Spec.parse(_spec("retinanet", {"kind": "harmonicdet"}), check_paths=False)
    assert fixed_arm_overrides(plain, "baseline") == {"loss.kind": "standard"}
    parts = Spec.parse(
        _spec("retinanet", {"kind": "pisa", "cls": "varifocal", "box": "giou", "box_extra": "l1"}),
        check_paths=False,
    )
    baseline = parts.with_overrides(fixed_arm_overrides(parts, "baseline"), check_paths=False).loss
    assert (baseline.kind, baseline.cls, baseline.box, baseline.box_extra) == ("standard", None, None, None)
    assert fixed_arm_overrides(parts, "confirmatory") == {}
