"""The model and recipe sections of a spec: detector, loss, eval, train, scaling, tracking."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from harmonic.config import EvalProtocol, EvalProtocolError, LossConfig, LossConfigError
from workers.spec.base import _DEFAULT_EVAL, _DEFAULT_LOSS, _STRICT, _check_paths, _expand, _init_error

# An MLflow run reference: runs:/<run_id> or runs:/<run_id>/<artifact path>.
RUN_REF_PATTERN = r"^runs:/([A-Za-z0-9_-]+)(?:/(.+))?$"


class DetectorSpec(BaseModel):
    model_config = _STRICT

    arch: Literal["retinanet", "faster_rcnn", "mask_rcnn", "ssd", "ssdlite", "fcos"] = "retinanet"
    backbone: str | None = Field(default=None, description="e.g. resnet18_fpn; default: the arch's own")
    image_size: int = Field(default=256, ge=32, le=4096, description="shorter/target image side")
    pretrained_backbone: str | None = Field(
        default=None,
        description=(
            "weights of the backbone body: a state_dict file (ImageNet, or made by `hdet pretrain`) or "
            "runs:/<run_id> of a pretrain run; null: from scratch, or the `pretrain` section's result"
        ),
    )
    init_from: str | None = Field(
        default=None,
        description=(
            "a whole detector's state_dict loaded (strictly) before training: a file, or runs:/<run_id> "
            "of a training run (its checkpoint/model.pt)"
        ),
    )

    @model_validator(mode="after")
    def _buildable(self) -> DetectorSpec:
        from harmonic.catalog import check_detector

        check_detector(self.arch, self.backbone, self.image_size)
        return self

    @field_validator("pretrained_backbone", "init_from")
    @classmethod
    def _weights_exist(cls, v: str | None, info: ValidationInfo) -> str | None:
        import re

        if v is None:
            return v
        if v.startswith("runs:"):
            if not re.match(RUN_REF_PATTERN, v):
                raise ValueError(f"{v!r} is not an MLflow run reference runs:/<run_id>[/<artifact path>]")
            return v
        if _check_paths(info) and not Path(_expand(v)).exists():
            raise ValueError(f"path {v!r} does not exist")
        return v


class LossSpec(BaseModel):
    """The loss options; same names, defaults and ranges as :class:`harmonic.config.LossConfig`."""

    model_config = _STRICT

    kind: Literal["standard", "harmonic", "harmonicdet"] = _DEFAULT_LOSS.kind
    alpha: float = _DEFAULT_LOSS.alpha
    gamma: float = _DEFAULT_LOSS.gamma
    margin: float = _DEFAULT_LOSS.margin
    tc: bool = _DEFAULT_LOSS.tc
    iou_term: Literal["none", "iou", "hiou"] | None = _DEFAULT_LOSS.iou_term
    detach_factors: bool = _DEFAULT_LOSS.detach_factors
    tc_weight: float = _DEFAULT_LOSS.tc_weight
    detach_tc_weight: bool = _DEFAULT_LOSS.detach_tc_weight
    tc_detach_iou: bool = _DEFAULT_LOSS.tc_detach_iou
    sigmoid_cls: Literal["focal", "bce"] = _DEFAULT_LOSS.sigmoid_cls
    normalization: Literal["detector", "num_pos"] = _DEFAULT_LOSS.normalization
    coupling: Literal["score", "loss"] = _DEFAULT_LOSS.coupling
    fcos_loc: Literal["giou", "smooth_l1"] = _DEFAULT_LOSS.fcos_loc

    @model_validator(mode="wrap")
    @classmethod
    def _every_problem(cls, data: Any, handler: Any) -> LossSpec:
        """An unknown key must not hide a range error: when pydantic stops before the whole-section
        check, each known option is still checked alone, so every problem is reported at once."""
        try:
            return handler(data)  # type: ignore[no-any-return]
        except ValidationError as e:
            errors = [_init_error(err) for err in e.errors()]
            if not isinstance(data, dict) or any(not err["loc"] for err in errors):
                raise
            failed = {err["loc"][0] for err in errors}
            for name, value in data.items():
                if name in cls.model_fields and name not in failed:
                    try:
                        LossConfig(**{name: value})
                    except (LossConfigError, TypeError) as x:
                        errors.append(
                            {
                                "type": "value_error",
                                "loc": (name,),
                                "input": value,
                                "ctx": {"error": ValueError(str(x))},
                            }
                        )
            raise ValidationError.from_exception_data(cls.__name__, errors) from None  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _through_loss_config(self) -> LossSpec:
        try:
            self.to_config()
        except LossConfigError as e:
            raise ValueError(str(e)) from None
        return self

    def to_config(self) -> LossConfig:
        return LossConfig(**self.model_dump())


class EvalSpec(BaseModel):
    """The evaluation protocol, the same for every arch and both arms (:class:`harmonic.config.EvalProtocol`)."""

    model_config = _STRICT

    score_thresh: float = Field(
        default=_DEFAULT_EVAL.score_thresh, ge=0, lt=1, description="detections scored below it are dropped"
    )
    max_detections: int = Field(
        default=_DEFAULT_EVAL.max_detections, ge=1, description="detections kept per image after NMS"
    )
    nms_thresh: float = Field(
        default=_DEFAULT_EVAL.nms_thresh, gt=0, le=1, description="IoU of the final per-class NMS"
    )

    @model_validator(mode="after")
    def _through_protocol(self) -> EvalSpec:
        try:
            self.to_protocol()
        except EvalProtocolError as e:
            raise ValueError(str(e)) from None
        return self

    def to_protocol(self) -> EvalProtocol:
        return EvalProtocol(**self.model_dump())


class WarmupSpec(BaseModel):
    model_config = _STRICT

    iters: int = Field(default=100, ge=0, description="linear warm-up length in iterations (0: none)")
    factor: float = Field(default=0.001, gt=0, le=1, description="lr multiplier at iteration 0")


class DebugSpec(BaseModel):
    """Fault injection, for the tests of recovery only."""

    model_config = _STRICT

    crash_rank: int | None = Field(
        default=None,
        ge=0,
        description="this rank exits its process once, at the first step after epoch crash_after_epoch's checkpoint",
    )
    crash_after_epoch: int = Field(default=1, ge=1, description="1-based epoch")
    crash_marker: str | None = Field(default=None, description="file recording that the crash happened")
    nonfinite_step: int | None = Field(
        default=None, ge=0, description="the first loss term is made infinite at this global step"
    )

    @model_validator(mode="after")
    def _marker_with_rank(self) -> DebugSpec:
        if self.crash_rank is not None and not self.crash_marker:
            raise ValueError("crash_marker: required with crash_rank (the crash must happen only once)")
        return self


class TrainSpec(BaseModel):
    """The recipe, after torchvision's detection reference scripts."""

    model_config = _STRICT

    epochs: int = Field(default=12, ge=1)
    batch_size: int = Field(default=8, ge=1, description="images per worker per step")
    lr: float = Field(
        default=0.01, gt=0, description="learning rate of one step (batch_size x num_workers images)"
    )
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=1e-4, ge=0)
    schedule: Literal["multistep", "cosine", "constant"] = "multistep"
    lr_steps: list[int] | None = Field(
        default=None, description="multistep: epochs at which lr is multiplied by lr_gamma (default 2/3, 8/9)"
    )
    lr_gamma: float = Field(default=0.1, gt=0, le=1)
    warmup: WarmupSpec = Field(default_factory=WarmupSpec)
    clip_grad_norm: float | None = Field(
        default=None, gt=0, description="max gradient norm (null: no clipping)"
    )
    seed: int = Field(default=0, ge=0, description="each worker seeds with seed + rank")
    amp: Literal["auto"] | bool = Field(default="auto", description="mixed precision; auto = on GPU only")
    data_workers: int = Field(default=0, ge=0, description="DataLoader processes per worker")
    aspect_ratio_groups: int = Field(default=3, ge=0, description="aspect-ratio grouping bins (0: off)")
    augment: Literal["detector", "flip"] = Field(
        default="detector",
        description=(
            "training augmentation: detector = each detector's own recipe (SSD's photometric distortion, "
            "zoom-out and IoU crop for ssd/ssdlite; resize + flip otherwise); flip = resize + flip for every arch"
        ),
    )
    nms_iou: float = Field(default=0.5, gt=0, le=1, description="IoU of the NMS audit")
    debug: DebugSpec = Field(default_factory=DebugSpec)

    @model_validator(mode="after")
    def _steps_in_range(self) -> TrainSpec:
        if self.lr_steps is not None:
            bad = [s for s in self.lr_steps if not 0 < s < self.epochs]
            if bad:
                raise ValueError(f"lr_steps: {bad} outside 1..epochs-1 ({self.epochs - 1})")
            if sorted(self.lr_steps) != self.lr_steps:
                raise ValueError(f"lr_steps: must be increasing, got {self.lr_steps}")
        return self

    def resolved_lr_steps(self) -> list[int]:
        if self.lr_steps is not None:
            return list(self.lr_steps)
        # torchvision's 26-epoch recipe decays at 16 and 22, i.e. ~2/3 and ~8/9 of the run.
        steps = sorted({round(self.epochs * 2 / 3), round(self.epochs * 8 / 9)})
        return [s for s in steps if 0 < s < self.epochs]


class ScalingSpec(BaseModel):
    model_config = _STRICT

    num_workers: int = Field(default=1, ge=1, description="Ray Train workers (DDP ranks) per training run")
    use_gpu: Literal["auto"] | bool = Field(default="auto", description="auto: GPUs if the cluster has any")
    gpus_per_worker: float = Field(default=1, gt=0)
    cpus_per_worker: float = Field(default=1, gt=0)
    accelerator_type: str | None = Field(default=None, description="e.g. H100, A10G: run only on those nodes")
    max_failures: int = Field(
        default=2, ge=-1, description="worker failures a run recovers from (-1: forever)"
    )


class TrackingSpec(BaseModel):
    model_config = _STRICT

    experiment: str = Field(default="harmonicdet", min_length=1, description="MLflow experiment name")
    tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI (default: local sqlite store)"
    )
