"""The model and recipe sections of a spec: detector, loss, eval, train, scaling, tracking."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from harmonic.config import EvalProtocol, EvalProtocolError, LossConfig, LossConfigError
from harmonic.loss_parts import BoxPart, ClsPart
from workers.spec.base import _DEFAULT_EVAL, _DEFAULT_LOSS, _STRICT, _check_paths, _expand, _init_error

#: ``train.amp``'s named settings (a boolean is also accepted: true = on, false = off).
AmpChoice = Literal["auto", "off", "fp16", "bf16"]
AMP_CHOICES: tuple[str, ...] = get_args(AmpChoice)

# An MLflow run reference: runs:/<run_id> or runs:/<run_id>/<artifact path>.
RUN_REF_PATTERN = r"^runs:/([A-Za-z0-9_-]+)(?:/(.+))?$"


def parse_run_ref(ref: str) -> tuple[str, str | None]:
    """``(run_id, artifact path or None)`` of ``runs:/<run_id>[/<artifact path>]``.

    Raises:
        ValueError: not such a reference, or its artifact path leaves the run (``..``, absolute, ``\\``).
    """
    m = re.match(RUN_REF_PATTERN, ref)
    if m is None:
        raise ValueError(f"{ref!r} is not an MLflow run reference runs:/<run_id>[/<artifact path>]")
    artifact = m.group(2)
    if artifact is not None and (
        artifact.startswith("/") or "\\" in artifact or ".." in artifact.split("/") or "\0" in artifact
    ):
        raise ValueError(
            f"the artifact path of {ref!r} must stay inside the run (no '..', '/' first or '\\')"
        )
    return m.group(1), artifact


class DetectorSpec(BaseModel):
    """The torchvision detector the loss is plugged into, its backbone and input size."""

    model_config = _STRICT

    arch: Literal["retinanet", "faster_rcnn", "mask_rcnn", "ssd", "ssdlite", "fcos", "dssd", "refinedet"] = (
        Field(
            default="retinanet", description="the detector (torchvision's, with the loss of the loss section)"
        )
    )
    backbone: str | None = Field(default=None, description="e.g. resnet18_fpn; default: the arch's own")
    image_size: int = Field(default=256, ge=32, le=4096, description="shorter/target image side")
    anchor_scale: float | None = Field(
        default=None,
        description=(
            "retinanet: anchor side per level in units of its stride, 3 sizes per octave from there "
            "(mmdetection's octave_base_scale); null: torchvision's 4 (32 px at stride 8)"
        ),
    )
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
        from harmonic.catalog import check_anchor_scale, check_detector

        check_detector(self.arch, self.backbone, self.image_size)
        check_anchor_scale(self.arch, self.anchor_scale)
        return self

    @field_validator("pretrained_backbone", "init_from")
    @classmethod
    def _weights_exist(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        if v.startswith("runs:"):
            parse_run_ref(v)
            return v
        if _check_paths(info) and not Path(_expand(v)).exists():
            raise ValueError(f"path {v!r} does not exist")
        return v


class LossSpec(BaseModel):
    """The loss options; same names, defaults and ranges as :class:`harmonic.config.LossConfig`."""

    model_config = _STRICT

    kind: Literal["standard", "harmonic", "harmonicdet", "pisa"] = Field(
        default=_DEFAULT_LOSS.kind,
        description="standard: the detector's own loss (the baseline arm); harmonic: Eq. 2-3 (+ TC); harmonicdet: Eq. 11-13 (HIoU inside L_loc); pisa: + PISA's classification-aware regression loss (CARL)",
    )
    alpha: float = Field(
        default=_DEFAULT_LOSS.alpha, description="weight of the IoU term inside L_loc (Eq. 11)"
    )
    gamma: float = Field(
        default=_DEFAULT_LOSS.gamma, description="HIoU focusing parameter (Eq. 10), in [0, 1]"
    )
    margin: float = Field(default=_DEFAULT_LOSS.margin, description="Task-Contrastive margin (Eq. 8), >= 0")
    tc: bool = Field(default=_DEFAULT_LOSS.tc, description="add the Task-Contrastive loss (Eq. 8)")
    iou_term: Literal["none", "iou", "hiou"] | None = Field(
        default=_DEFAULT_LOSS.iou_term,
        description="the IoU part of L_loc: none, iou (1 - IoU, Eq. 9) or hiou (Eq. 10); null: hiou for harmonicdet, none otherwise",
    )
    detach_factors: bool = Field(
        default=_DEFAULT_LOSS.detach_factors,
        description="treat beta_r and beta_c as constant weights (default: differentiate through them, Eq. 4-7)",
    )
    tc_weight: float = Field(
        default=_DEFAULT_LOSS.tc_weight, description="weight of the TC term (Eq. 12 adds it with weight 1)"
    )
    detach_tc_weight: bool = Field(
        default=_DEFAULT_LOSS.detach_tc_weight,
        description="the entropy weight 1/(1 + beta_e) of Eq. 8 carries no gradient",
    )
    tc_detach_iou: bool = Field(
        default=_DEFAULT_LOSS.tc_detach_iou,
        description="the TC term moves the score towards the IoU, not the IoU towards the score",
    )
    sigmoid_cls: Literal["focal", "bce"] = Field(
        default=_DEFAULT_LOSS.sigmoid_cls,
        description="sigmoid heads (RetinaNet, FCOS): the classification loss coupled as CE, the head's focal loss or BCE of the ground-truth class",
    )
    normalization: Literal["detector", "num_pos"] = Field(
        default=_DEFAULT_LOSS.normalization,
        description="detector: each detector's own loss normalisation; num_pos: divide by the number of positives",
    )
    coupling: Literal["score", "loss"] = Field(
        default=_DEFAULT_LOSS.coupling,
        description="beta_c of Eq. 2-7: score = the confidence p of the ground-truth class (Eq. 5); loss = exp(-CE) of the coupled loss (ablation)",
    )
    fcos_loc: Literal["giou", "smooth_l1"] = Field(
        default=_DEFAULT_LOSS.fcos_loc,
        description="FCOS only: the L_loc of Eq. 11, giou (FCOS's own, bounded) or smooth_l1 (the paper's form, on the encoded offsets)",
    )
    cls: ClsPart | None = Field(
        default=_DEFAULT_LOSS.cls,
        description="the classification part: focal, quality_focal, varifocal or ghm_c (sigmoid heads: retinanet, fcos); ce (softmax heads: the others); null: the head's own",
    )
    box: BoxPart | None = Field(
        default=_DEFAULT_LOSS.box,
        description="the localisation part: smooth_l1, l1, balanced_l1 (encoded offsets), iou, giou, diou, ciou, hiou (decoded boxes); null: the head's own",
    )
    box_extra: BoxPart | None = Field(
        default=_DEFAULT_LOSS.box_extra,
        description="a second localisation part added to box (null: none)",
    )
    box_extra_weight: float = Field(
        default=_DEFAULT_LOSS.box_extra_weight, description="weight of box_extra, >= 0"
    )
    carl_k: float = Field(
        default=_DEFAULT_LOSS.carl_k, description="pisa: k of CARL's weight ((1 - b) s + b)^k"
    )
    carl_bias: float = Field(
        default=_DEFAULT_LOSS.carl_bias, description="pisa: b of CARL's weight, in [0, 1]"
    )

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
                        # alone under kind standard: the rules across options need the whole section
                        LossConfig(**{"kind": "standard", name: value})
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
    extra_score_thresholds: list[Annotated[float, Field(ge=0, lt=1)]] = Field(
        default_factory=list,
        description=(
            "more score thresholds the test split is also judged at, each in [0, 1) and not score_thresh: "
            "metrics test_<m>_thr<t> and a secondary verdict; one inference, at the lowest threshold"
        ),
    )

    @model_validator(mode="after")
    def _through_protocol(self) -> EvalSpec:
        try:
            self.to_protocol()
        except EvalProtocolError as e:
            raise ValueError(str(e)) from None
        extra = self.extra_score_thresholds
        if self.score_thresh in extra:
            raise ValueError(
                f"extra_score_thresholds: {self.score_thresh} is score_thresh already; list other thresholds"
            )
        if len(set(extra)) != len(extra):
            repeated = sorted({t for t in extra if extra.count(t) > 1})
            raise ValueError(f"extra_score_thresholds: {repeated} given more than once")
        return self

    def to_protocol(self) -> EvalProtocol:
        """The detector's settings (the extra thresholds are the test evaluation's, not the detector's)."""
        return EvalProtocol(**self.model_dump(exclude={"extra_score_thresholds"}))

    def test_inference_thresh(self) -> float | None:
        """The score threshold the test split's one inference runs at when it is lower than
        ``score_thresh`` (an extra threshold below it); None: the detector's own."""
        low = min(self.extra_score_thresholds, default=self.score_thresh)
        return low if low < self.score_thresh else None


class WarmupSpec(BaseModel):
    """Linear learning-rate warm-up over the first iterations."""

    model_config = _STRICT

    iters: int = Field(default=100, ge=0, description="linear warm-up length in iterations (0: none)")
    factor: float = Field(default=0.001, gt=0, le=1, description="lr multiplier at iteration 0")


class TrainSpec(BaseModel):
    """The recipe, after torchvision's detection reference scripts."""

    model_config = _STRICT

    epochs: int = Field(default=12, ge=1, description="passes over the training split")
    batch_size: int = Field(default=8, ge=1, description="images per worker per step")
    lr: float = Field(
        default=0.01, gt=0, description="learning rate of one step (batch_size x num_workers images)"
    )
    optimizer: Literal["sgd", "adamw"] = Field(default="sgd", description="SGD with momentum, or AdamW")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(
        default=1e-4, ge=0, description="weight decay (norm layers and biases included)"
    )
    schedule: Literal["multistep", "cosine", "constant"] = Field(
        default="multistep", description="learning-rate decay after the warm-up"
    )
    lr_steps: list[int] | None = Field(
        default=None, description="multistep: epochs at which lr is multiplied by lr_gamma (default 2/3, 8/9)"
    )
    lr_gamma: float = Field(default=0.1, gt=0, le=1, description="multistep: the lr factor at each step")
    warmup: WarmupSpec = Field(default_factory=WarmupSpec, description="linear learning-rate warm-up")
    clip_grad_norm: float | None = Field(
        default=None, gt=0, description="max gradient norm (null: no clipping)"
    )
    seed: int = Field(default=0, ge=0, description="each worker seeds with seed + rank")
    amp: AmpChoice | bool = Field(
        default="auto",
        description=(
            "mixed precision: auto = fp16 on GPU, off on CPU; fp16 (with a gradient scaler); bf16 "
            "(no scaler; GPUs from Ampere on, or CPU); off; true = fp16 on GPU, bf16 on CPU"
        ),
    )
    data_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        default="auto",
        description=(
            "DataLoader processes per worker, kept for the whole training (0: load in the training "
            "process); auto = 0 on CPU, on a GPU every CPU the worker reserves (scaling.cpus_per_worker) "
            "but one, at least 1 (batches are then pinned and copied without waiting)"
        ),
    )
    resample: Literal["none", "bootstrap", "subsample"] = Field(
        default="none",
        description=(
            "the training images each seed draws (the same for every arm of a seed): none = all; "
            "bootstrap = resample_fraction x N with replacement; subsample = resample_fraction x N distinct"
        ),
    )
    resample_fraction: float = Field(
        default=1.0, gt=0, le=1, description="share of the training split a seed draws (resample)"
    )
    aspect_ratio_groups: int = Field(default=3, ge=0, description="aspect-ratio grouping bins (0: off)")
    augment: Literal["detector", "flip"] = Field(
        default="detector",
        description=(
            "training augmentation: detector = each detector's own recipe (SSD's photometric distortion, "
            "zoom-out and IoU crop for ssd/ssdlite/dssd/refinedet; resize + flip otherwise); flip = resize + flip for every arch"
        ),
    )
    nms_iou: float = Field(default=0.5, gt=0, le=1, description="IoU of the NMS audit")

    @model_validator(mode="after")
    def _resample_varies(self) -> TrainSpec:
        if self.resample == "subsample" and self.resample_fraction >= 1:
            raise ValueError(
                "resample_fraction: a subsample of the whole split is the split itself; give a fraction "
                "below 1 (or resample: none)"
            )
        if self.resample == "none" and self.resample_fraction != 1:
            raise ValueError("resample_fraction: only with resample bootstrap or subsample")
        return self

    @field_validator("data_workers", mode="before")
    @classmethod
    def _workers_or_auto(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError(f"{v!r} is neither a number of processes (0 or more) nor auto")

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_choice(cls, v: Any) -> Any:
        if isinstance(v, bool) or v in AMP_CHOICES:
            return v
        raise ValueError(f"{v!r} is not one of {', '.join(AMP_CHOICES)} (or true/false)")

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
    """The resources of one training run on Ray (every seed of every arm gets the same)."""

    model_config = _STRICT

    num_workers: int = Field(default=1, ge=1, description="Ray Train workers (DDP ranks) per training run")
    use_gpu: Literal["auto"] | bool = Field(
        default="auto",
        description=(
            "auto: GPUs when a node the cluster has, or can start (HDET_CLUSTER_NODE_TYPES), holds a worker "
            "with its gpus_per_worker; decided per training"
        ),
    )
    gpus_per_worker: float = Field(
        default=1,
        gt=0,
        description=(
            "GPUs each worker reserves (with use_gpu): a whole number, or a fraction below 1 for "
            "single-worker trainings that share a GPU"
        ),
    )
    cpus_per_worker: float = Field(
        default=1, gt=0, description="CPUs each worker reserves (fractions share a core)"
    )
    accelerator_type: str | None = Field(default=None, description="e.g. H100, A10G: run only on those nodes")
    memory_per_worker_gb: float | None = Field(
        default=None,
        gt=0,
        description=(
            "memory each worker reserves on its node (Ray's memory resource): trainings then start only "
            "as many at once as the nodes' memory holds (null: no reservation)"
        ),
    )
    max_failures: int = Field(
        default=2, ge=-1, description="worker failures a run recovers from (-1: forever)"
    )
    trainer: Literal["auto", "pooled", "ray_train"] = Field(
        default="auto",
        description=(
            "how a training runs: ray_train (a Ray Train controller and worker group, any num_workers), "
            "pooled (one Ray task in a reused worker process with its imports done; num_workers 1), "
            "auto: pooled for one worker on CPU with local storage, else ray_train"
        ),
    )

    @model_validator(mode="after")
    def _whole_gpus_or_one_shared(self) -> ScalingSpec:
        if self.trainer == "pooled" and self.num_workers > 1:
            raise ValueError(
                f"trainer: pooled runs one worker per training; with num_workers: {self.num_workers} "
                "set trainer: ray_train (or auto)"
            )
        g = self.gpus_per_worker
        if self.use_gpu is False:  # reserved only with use_gpu
            return self
        if g > 1 and not g.is_integer():
            raise ValueError(
                f"gpus_per_worker: {g} is neither a whole number of GPUs nor a fraction below 1; "
                f"use {int(g)} or {int(g) + 1}"
            )
        if g < 1 and self.num_workers > 1:
            raise ValueError(
                f"gpus_per_worker: a fraction of a GPU ({g}) is for single-worker trainings that share "
                f"a GPU; with num_workers: {self.num_workers} each DDP worker needs whole GPUs "
                "(set gpus_per_worker: 1, or num_workers: 1)"
            )
        return self


class TrackingSpec(BaseModel):
    """Where the runs are recorded: an MLflow experiment (parent run per experiment, child run per training)."""

    model_config = _STRICT

    experiment: str = Field(default="harmonicdet", min_length=1, description="MLflow experiment name")
    tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI (default: local sqlite store)"
    )
