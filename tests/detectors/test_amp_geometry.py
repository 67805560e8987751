"""Geometry under mixed precision: IoUs, areas and decoded boxes are computed in float32, so a head
whose outputs are fp16 or bf16 (AMP) still gives the IoU of large boxes, and every arch's training
step under autocast (bf16: the CPU's) has a finite float32 loss."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import NUM_CLASSES, SMALL, batch_for, make_batch
from torch import Tensor, nn

from harmonic.detectors import ARCHS, build_detector, pop_diagnostics
from harmonic.detectors.common import paired_iou

HALF = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_identical_large_half_precision_boxes_have_iou_one(dtype: torch.dtype) -> None:
    # 400 x 400 = 160000 is past fp16's largest value (65504): an fp16 area is inf
    boxes = torch.tensor([[0.0, 0.0, 400.0, 400.0], [16.0, 32.0, 1016.0, 832.0]], dtype=dtype)
    iou = paired_iou(boxes, boxes)
    assert iou.dtype == torch.float32
    assert torch.equal(iou, torch.ones(2))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_partly_overlapping_large_half_precision_boxes_match_float32(dtype: torch.dtype) -> None:
    a = torch.tensor([[0.0, 0.0, 600.0, 500.0], [100.0, 40.0, 900.0, 700.0], [0.0, 0.0, 300.0, 300.0]])
    b = torch.tensor([[100.0, 48.0, 704.0, 560.0], [400.0, 400.0, 1000.0, 960.0], [296.0, 0.0, 600.0, 300.0]])
    a_half, b_half = a.to(dtype), b.to(dtype)
    # the float32 IoU of the same (rounded) corners: the half inputs lose nothing more
    expected = paired_iou(a_half.float(), b_half.float())
    assert expected.min() > 0.005
    torch.testing.assert_close(paired_iou(a_half, b_half), expected, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(paired_iou(a_half, b.to(dtype)), paired_iou(b_half, a_half), rtol=1e-6, atol=0)


def _large_box_batch() -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """One 512 px image with a 460 x 470 px box (its area is past fp16's range) and a small one."""
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[20.0, 30.0, 480.0, 500.0], [100.0, 100.0, 160.0, 150.0]])
    return [torch.rand(3, 512, 512, generator=g)], [{"boxes": boxes, "labels": torch.tensor([1, 2])}]


def _loss_with_head_outputs(
    arch: str, dtype: torch.dtype, regression: float
) -> tuple[dict[str, Tensor], Tensor]:
    """The harmonicdet loss and diagnostic IoUs of ``arch`` on the large-box batch, with the head's
    outputs cast to ``dtype`` (what a head returns under AMP) and every box offset set to
    ``regression`` (predicted boxes several times their anchor: large boxes)."""
    torch.manual_seed(0)
    model = build_detector(arch, NUM_CLASSES, loss="harmonicdet", backbone="resnet18_fpn", image_size=512)

    def as_amp(_module: nn.Module, _inputs: Any, out: dict[str, Tensor]) -> dict[str, Tensor]:
        fixed = {k: torch.full_like(v, regression) if k == "bbox_regression" else v for k, v in out.items()}
        return {k: v.to(dtype) for k, v in fixed.items()}

    head: nn.Module = model.head  # type: ignore[assignment]
    head.register_forward_hook(as_amp)
    images, targets = _large_box_batch()
    losses = model(images, targets)
    return losses, pop_diagnostics(model)["iou"]


@pytest.mark.parametrize(("arch", "regression"), [("fcos", 12.0), ("retinanet", 1.0)])
def test_a_head_with_fp16_outputs_gives_the_float32_ious_and_loss(arch: str, regression: float) -> None:
    losses32, iou32 = _loss_with_head_outputs(arch, torch.float32, regression)
    losses16, iou16 = _loss_with_head_outputs(arch, torch.float16, regression)
    # the predicted boxes are large: decoded or measured in fp16 their area is inf, their IoU 0
    assert (iou32 > 0.05).float().mean() > 0.5
    torch.testing.assert_close(iou16, iou32, rtol=0.0, atol=2e-3)
    for name, value in losses16.items():
        assert torch.isfinite(value), name
        torch.testing.assert_close(value.float(), losses32[name], rtol=5e-3, atol=1e-3)


@pytest.mark.parametrize("kind", ["standard", "harmonicdet"])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_training_step_under_cpu_bf16_autocast_is_finite(arch: str, kind: str) -> None:
    torch.manual_seed(0)
    model = build_detector(arch, NUM_CLASSES, loss=kind, **SMALL[arch])
    images, targets = batch_for(arch, num_images=1 if arch == "ssd" else 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert {v.dtype for v in losses.values()} == {torch.float32}
    total = sum(losses.values())
    assert isinstance(total, Tensor) and torch.isfinite(total)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"
    diag = pop_diagnostics(model)
    assert diag["iou"].numel() > 0
    for key, value in diag.items():
        assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_p6_p7_gradients_stay_finite_under_cpu_bf16_autocast_when_p7_sees_one_pixel(arch: str) -> None:
    """At 64 px P7's input is 1x1. On CPUs with AMX, torch's bf16 weight gradient of that conv came out
    NaN in 7 of 12 seeds; harmonic's P6P7 runs the two convs in float32 under CPU autocast."""
    from harmonic.detectors.backbones import P6P7

    for seed in range(8):
        torch.manual_seed(seed)
        model = build_detector(arch, NUM_CLASSES, loss="standard", backbone="resnet18_fpn", image_size=64)
        extra = model.backbone.fpn.extra_blocks
        assert isinstance(extra, P6P7)
        images, targets = make_batch(1, 64, seed=seed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model(images, targets)
        sum(losses.values()).backward()  # type: ignore[union-attr]
        for name, p in (("p6", extra.p6.weight), ("p7", extra.p7.weight)):
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"seed {seed}: {name} gradient"


def test_p6_p7_outside_cpu_autocast_is_torchvisions() -> None:
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    from harmonic.detectors.backbones import P6P7

    torch.manual_seed(0)
    ours, theirs = P6P7(8, 8), LastLevelP6P7(8, 8)
    theirs.load_state_dict(ours.state_dict())
    p = [torch.randn(1, 8, 4, 4)]
    out, names = ours([p[0]], [p[0]], ["p5"])
    ref, ref_names = theirs([p[0]], [p[0]], ["p5"])
    assert names == ref_names == ["p5", "p6", "p7"]
    for a, b in zip(out, ref, strict=True):
        assert torch.equal(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = ours([p[0]], [p[0]], ["p5"])
    assert out[1].dtype == out[2].dtype == torch.float32
    torch.testing.assert_close(out[2], ref[2])
