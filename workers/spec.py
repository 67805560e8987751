"""The experiment spec: one schema for the REST API, the CLI and the Ray entrypoint.

A spec is a YAML or JSON document with the sections ``name``, ``dataset``, ``detector``,
``loss``, ``train``, ``scaling``, ``search`` (optional), ``tracking`` and ``pretrain`` (optional:
pretrain the backbone body first, see :class:`PretrainSpec`). Unknown keys are
errors everywhere, and every error names the field it is about, e.g.
``loss.gamma: 1.5 is outside [0, 1] ...``.

The ``loss`` section has exactly the options of :class:`harmonic.config.LossConfig` and is
validated by it, so the ranges live in one place.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
from dataclasses import fields as dc_fields
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from harmonic.config import EvalProtocol, EvalProtocolError, LossConfig, LossConfigError

__all__ = [
    "Spec",
    "SpecError",
    "DatasetSpec",
    "DetectorSpec",
    "LossSpec",
    "TrainSpec",
    "ScalingSpec",
    "SearchSpec",
    "TrackingSpec",
    "DebugSpec",
    "EvalSpec",
    "PretrainSpec",
    "resolve_param_path",
    "search_space_problems",
    "NOT_SEARCHABLE",
]

_STRICT = ConfigDict(extra="forbid", validate_default=True)
_DEFAULT_LOSS = LossConfig()
_DEFAULT_EVAL = EvalProtocol()


class SpecError(ValueError):
    """A spec is invalid. ``problems`` lists ``(field path, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"invalid spec {source}" if source else "invalid spec"
        lines = [f"  {path}: {msg}" if path else f"  {msg}" for path, msg in problems]
        super().__init__(head + ":\n" + "\n".join(lines))

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.problems, self.source))


def _check_paths(info: ValidationInfo) -> bool:
    # The service validates specs for a cluster whose storage it may not see: it passes
    # context={"check_paths": False}. Everything else checks that paths exist.
    ctx = info.context or {}
    return bool(ctx.get("check_paths", True))


def _expand(path: str) -> str:
    return os.path.expanduser(os.path.expandvars(path))


SplitRef = str | int | dict[str, str] | list[list[str | int]]


class DatasetSpec(BaseModel):
    """Where the data is, in the conventions of :func:`harmonic.data.build_dataset`.

    ``coco``: ``train``/``val``/``test`` name a split (images in ``root/NAME/``, annotations in
    ``root/annotations/instances_NAME.json``) or give ``{images: DIR, ann: FILE}``.
    ``voc``: ``root`` is the VOCdevkit, splits like ``"2007-trainval+2012-trainval"``.
    ``synthetic``: generated into ``root`` (default: under ``$HDET_HOME/data``) on first use;
    ``train``/``val``/``test`` are image counts, ``image_size``/``seed`` and ``synth`` (any other
    argument of :func:`harmonic.data.synth.generate`) shape the set.

    ``test`` is the held-out split that judges a comparison: a search ranks configurations on
    ``val``, and the evidence table (best or confirmatory configuration vs the baseline) is computed
    on ``test`` alone. A synthetic set generates one (as many images as ``val`` unless given; 0
    turns it off); for COCO/VOC the spec names it, and without one the evidence is judged on
    ``val`` and says so.
    """

    model_config = _STRICT

    format: Literal["coco", "voc", "synthetic"] = Field(description="dataset layout")
    root: str | None = Field(default=None, description="dataset root (synthetic: where it is generated)")
    train: SplitRef | None = Field(default=None, description="training split (synthetic: number of images)")
    val: SplitRef | None = Field(default=None, description="validation split (synthetic: number of images)")
    test: SplitRef | None = Field(
        default=None,
        description=(
            "held-out test split that judges comparisons (synthetic: number of images, default = val's, "
            "0 = none; coco/voc: a split name, none if absent)"
        ),
    )
    skip_bad: bool = Field(
        default=False, description="skip broken images/annotations instead of refusing the dataset"
    )
    keep_difficult: bool = Field(default=False, description="voc: keep objects marked difficult")
    image_size: int | None = Field(
        default=None, ge=32, le=4096, description="synthetic: image side in pixels"
    )
    seed: int | None = Field(default=None, ge=0, description="synthetic: generator seed")
    synth: dict[str, Any] = Field(default_factory=dict, description="synthetic: other generator parameters")

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> DatasetSpec:
        if self.format == "synthetic":
            for split in ("train", "val"):
                v = getattr(self, split)
                if v is not None and (not isinstance(v, int) or v < 1):
                    raise ValueError(f"{split}: for format synthetic, the number of images (>= 1), got {v!r}")
            if self.test is not None and (not isinstance(self.test, int) or self.test < 0):
                raise ValueError(
                    f"test: for format synthetic, the number of images (>= 0), got {self.test!r}"
                )
            self._check_synth()
            return self
        for name in ("image_size", "seed"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name}: only for format synthetic")
        if self.synth:
            raise ValueError("synth: only for format synthetic")
        if self.root is None:
            raise ValueError(f"root: required for format {self.format!r}")
        if not _check_paths(info):
            return self
        root = Path(_expand(self.root))
        if not root.exists():
            raise ValueError(f"root: path {self.root!r} does not exist")
        if self.format == "coco":
            for split in ("train", "val", "test"):
                if split == "test" and self.test is None:
                    continue
                for what, p in self._coco_paths(root, getattr(self, split)):
                    if not p.exists():
                        raise ValueError(f"{split}: {what} {str(p)!r} does not exist")
        return self

    @staticmethod
    def _coco_paths(root: Path, ref: Any) -> list[tuple[str, Path]]:
        def under(p: str) -> Path:
            q = Path(_expand(p))
            return q if q.is_absolute() else root / q

        if isinstance(ref, str):
            return [
                ("annotation file", root / "annotations" / f"instances_{ref}.json"),
                ("image folder", root / ref),
            ]
        if isinstance(ref, dict):
            return [(f"{k} path", under(v)) for k, v in ref.items() if k in ("images", "ann")]
        return []

    def _check_synth(self) -> None:
        from harmonic.data.synth_params import SynthParams

        known = set(SynthParams.__dataclass_fields__) - {
            "train",
            "val",
            "test",
            "image_size",
            "seed",
            "version",
        }
        unknown = sorted(set(self.synth) - known)
        if unknown:
            raise ValueError(
                f"synth: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        try:
            kwargs: dict[str, Any] = {
                k: tuple(v) if k == "aspect_ratios" else v for k, v in self.synth_params().items()
            }
            SynthParams(**kwargs).validate()
        except (TypeError, ValueError) as e:
            raise ValueError(str(e)) from None

    def synth_params(self) -> dict[str, Any]:
        """The generator's keyword arguments that this spec sets (``test`` defaults to ``val``'s count)."""
        from harmonic.data.synth_params import SynthParams

        test = self.test if self.test is not None else (self.val if self.val is not None else SynthParams.val)
        given = {
            "train": self.train,
            "val": self.val,
            "test": test,
            "image_size": self.image_size,
            "seed": self.seed,
        }
        return {**{k: v for k, v in given.items() if v is not None}, **self.synth}

    def has_test(self) -> bool:
        """Whether the dataset has a held-out ``test`` split."""
        if self.format == "synthetic":
            return int(self.synth_params().get("test", 0)) > 0
        return self.test is not None

    def resolved_root(self) -> str:
        """The root with ``~``/variables expanded; for synthetic, a default folder named by its parameters."""
        if self.root is not None:
            return str(Path(_expand(self.root)).resolve())
        from workers.env import data_dir

        params = json.dumps(self.synth_params(), sort_keys=True)
        digest = hashlib.sha1(params.encode()).hexdigest()[:8]
        return str(data_dir() / f"synthetic-{digest}")

    def build_config(self) -> dict[str, Any]:
        """The ``dataset_cfg`` of :func:`harmonic.data.build_dataset` (root resolved)."""
        cfg: dict[str, Any] = {"format": self.format, "root": self.resolved_root()}
        if self.format == "synthetic":
            return {**cfg, **self.synth_params()}
        for split in ("train", "val", "test"):
            if getattr(self, split) is not None:
                cfg[split] = getattr(self, split)
        if self.format == "voc":
            cfg["keep_difficult"] = self.keep_difficult
        return cfg


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


SpaceEntry = dict[str, list[Any]]


class SearchSpec(BaseModel):
    model_config = _STRICT

    space: dict[str, SpaceEntry] = Field(
        description=(
            "param -> {uniform|loguniform: [lo, hi]} | {choice: [...]} | {grid: [...]}; empty ({}) with "
            "confirmatory: a comparison of the fixed arms without a search"
        )
    )
    algorithm: Literal["random", "grid", "optuna"] = "random"
    scheduler: Literal["fifo", "asha"] = "fifo"
    num_samples: int = Field(default=8, ge=1)
    max_concurrent: int = Field(default=1, ge=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    baseline: bool = False
    confirmatory: bool = Field(
        default=False,
        description=(
            "also train the spec's own loss section (e.g. the paper's defaults) on the same seeds, outside "
            "the searcher: a pre-registered arm judged against the baseline without selection"
        ),
    )
    grace_period: int = Field(
        default=1,
        ge=1,
        description="ASHA: epochs every trial trains before it can be stopped (<= train.epochs)",
    )
    reduction_factor: float = Field(
        default=2.0, gt=1.0, description="ASHA: 1/reduction_factor of the trials at a rung go on to the next"
    )

    @field_validator("space")
    @classmethod
    def _entries(cls, space: dict[str, SpaceEntry]) -> dict[str, SpaceEntry]:
        for param, entry in space.items():
            try:
                resolve_param_path(param)
            except KeyError as e:
                raise ValueError(f"{param}: {e.args[0]}") from None
            if not isinstance(entry, dict) or len(entry) != 1:
                raise ValueError(f"{param}: must have exactly one of uniform, loguniform, choice, grid")
            ((kind, values),) = entry.items()
            if kind in ("uniform", "loguniform"):
                if len(values) != 2 or not all(_is_number(v) for v in values):
                    raise ValueError(f"{param}.{kind}: must be [lo, hi] numbers, got {values}")
                lo, hi = values
                if not lo < hi:
                    raise ValueError(f"{param}.{kind}: lo must be < hi, got [{lo}, {hi}]")
                if kind == "loguniform" and lo <= 0:
                    raise ValueError(f"{param}.loguniform: lo must be > 0, got {lo}")
            elif kind in ("choice", "grid"):
                if not values:
                    raise ValueError(f"{param}.{kind}: must be a non-empty list, got {values!r}")
            else:
                raise ValueError(f"{param}: unknown entry {kind!r}; use uniform, loguniform, choice or grid")
        return space

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"must be distinct, got {seeds}")
        return seeds

    @model_validator(mode="after")
    def _empty_space_compares(self) -> SearchSpec:
        if not self.space and not self.confirmatory:
            raise ValueError(
                "space: must name at least one parameter (an empty space needs confirmatory: true, "
                "to compare the spec's own loss with the baseline without a search)"
            )
        return self

    @model_validator(mode="after")
    def _grid_needs_grid(self) -> SearchSpec:
        if self.algorithm == "grid":
            sampled = [p for p, e in self.space.items() if next(iter(e)) in ("uniform", "loguniform")]
            if sampled:
                raise ValueError(
                    f"algorithm: grid cannot sample {', '.join(sampled)}; use grid/choice entries"
                )
        return self


class TrackingSpec(BaseModel):
    model_config = _STRICT

    experiment: str = Field(default="harmonicdet", min_length=1, description="MLflow experiment name")
    tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI (default: local sqlite store)"
    )


class PretrainSpec(BaseModel):
    """Pretraining of the detector's backbone body before every training of the spec, the stand-in
    for ImageNet weights (:mod:`harmonic.pretrain` says what task and why, :mod:`workers.pretrain`
    how it is cached and tracked).

    The images are generated by the synthetic generator with ``seed``, which must differ from the
    benchmark's (a synthetic ``dataset`` is refused with its own seed or root), so the pretraining
    sees no benchmark image. ``hdet run`` (or ``hdet pretrain``) trains it once and caches the result
    by the hash of this section, the backbone and the image size; every training and trial of the
    spec, both arms alike, starts from that file with fresh heads.
    """

    model_config = _STRICT

    task: Literal["segment", "classify"] = Field(
        default="segment",
        description=(
            "segment: which shape class each pixel shows (FCN head on the last three resolutions) plus "
            "which classes the image holds; classify: the latter alone (linear head, BCE)"
        ),
    )
    images: int = Field(default=3000, ge=8, description="generated training images")
    val_images: int = Field(
        default=200, ge=8, description="generated validation images (the reported metric)"
    )
    seed: int = Field(default=1000, ge=0, description="generator seed; must differ from dataset.seed")
    root: str | None = Field(
        default=None,
        description="where the images are generated (default: under $HDET_HOME/data); not the dataset's root",
    )
    image_size: int | None = Field(
        default=None, ge=32, le=4096, description="image side; default: detector.image_size"
    )
    synth: dict[str, Any] = Field(
        default_factory=dict, description="other generator parameters, as in dataset.synth"
    )
    epochs: int = Field(default=10, ge=1, description="passes over the training images")
    batch_size: int = Field(default=32, ge=1, description="images per step")
    lr: float = Field(default=3e-3, gt=0, description="AdamW peak learning rate (5% warm-up, cosine decay)")
    weight_decay: float = Field(default=1e-4, ge=0, description="AdamW weight decay")

    @model_validator(mode="after")
    def _valid_images(self) -> PretrainSpec:
        try:
            self.dataset_spec(self.image_size or 256)
        except ValidationError as e:
            path, msg = _problems(e)[0]
            raise ValueError(f"{path}: {msg}" if path else msg) from None
        return self

    def dataset_spec(self, image_size: int) -> DatasetSpec:
        """The generated pretraining set, as a synthetic dataset section (no test split)."""
        return DatasetSpec(
            format="synthetic",
            root=self.root,
            train=self.images,
            val=self.val_images,
            test=0,
            image_size=image_size,
            seed=self.seed,
            synth=self.synth,
        )


class Spec(BaseModel):
    """An experiment: one training run, or a Tune search when ``search`` is present."""

    model_config = _STRICT

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    dataset: DatasetSpec
    detector: DetectorSpec = Field(default_factory=DetectorSpec)
    loss: LossSpec = Field(default_factory=LossSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    search: SearchSpec | None = None
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    pretrain: PretrainSpec | None = Field(
        default=None,
        description="pretrain the backbone body first (absent: detector.pretrained_backbone or scratch)",
    )

    @classmethod
    def parse(cls, data: dict[str, Any], *, source: str | None = None, check_paths: bool = True) -> Spec:
        """Validate a spec dict; raises :class:`SpecError` naming each bad field."""
        if not isinstance(data, dict):
            raise SpecError([("", f"a spec must be a mapping, got {type(data).__name__}")], source)
        try:
            spec = cls.model_validate(data, context={"check_paths": check_paths})
        except ValidationError as e:
            problems = _problems(e)
            search = data.get("search")
            if isinstance(search, dict):
                # The names of a search space are checked even when another section failed.
                known = {p for p, _ in problems}
                problems += [p for p in _space_path_problems(search.get("space"))[0] if p[0] not in known]
            raise SpecError(problems, source) from None
        problems = search_space_problems(spec)
        if problems:
            raise SpecError(problems, source)
        return spec

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, check_paths: bool = True) -> Spec:
        """Load and validate a YAML (``.yaml``/``.yml``) or JSON spec file."""
        p = Path(path)
        if not p.is_file():
            raise SpecError([("", f"spec file {str(p)!r} does not exist")], str(p))
        docs = _documents(p)
        if len(docs) != 1:
            raise SpecError(
                [("", f"holds {len(docs)} experiments (YAML documents); load it with Spec.suite_from_file")],
                str(p),
            )
        return cls.parse(docs[0], source=str(p), check_paths=check_paths)

    @classmethod
    def suite_from_file(cls, path: str | os.PathLike[str], *, check_paths: bool = True) -> list[Spec]:
        """Load a file of one or more specs (YAML documents separated by ``---``), all validated.

        A suite (e.g. ``configs/evidence-cpu.yaml``: one comparison per detector) is run by
        ``hdet run`` one experiment after the other. Every problem of every document is reported
        at once (paths prefixed ``#N:`` for the N-th document), and names must be distinct.
        """
        p = Path(path)
        docs = _documents(p)
        if not docs:
            raise SpecError([("", "holds no spec")], str(p))
        specs: list[Spec] = []
        problems: list[tuple[str, str]] = []
        for i, data in enumerate(docs, start=1):
            try:
                specs.append(cls.parse(data, source=f"{p}#{i}", check_paths=check_paths))
            except SpecError as e:
                tag = f"#{i}: " if len(docs) > 1 else ""
                problems.extend(
                    (f"{tag}{path}" if path else tag.rstrip(": "), msg) for path, msg in e.problems
                )
        names = [str(d["name"]) for d in docs if isinstance(d, dict) and d.get("name")]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(
                ("name", f"the experiments of a suite need distinct names; repeated: {', '.join(dupes)}")
            )
        if problems:
            raise SpecError(problems, str(p))
        return specs

    def with_overrides(self, overrides: dict[str, Any], *, check_paths: bool = True) -> Spec:
        """A copy with dotted-path values replaced (``{"loss.alpha": 1.2, "train.seed": 1}``), re-validated.

        Bare names (``alpha``, ``lr``) are resolved with :func:`resolve_param_path`.
        """
        data = copy.deepcopy(self.model_dump(mode="json"))
        for key, value in overrides.items():
            path = resolve_param_path(key).split(".")
            node = data
            for part in path[:-1]:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            node[path[-1]] = value
        return Spec.parse(data, source="overrides " + ", ".join(map(str, overrides)), check_paths=check_paths)

    def with_resolved_paths(self) -> Spec:
        """A copy whose dataset and pretraining roots are absolute, resolved here, once.

        The driver calls it before anything starts: a Tune trial or a Ray worker runs in a working
        directory of its own, where a relative root (or the synthetic default under ``./.hdet``)
        would point somewhere else.
        """
        update: dict[str, Any] = {
            "dataset": self.dataset.model_copy(update={"root": self.dataset.resolved_root()})
        }
        if self.pretrain is not None and self.pretrain.root is not None:
            root = str(Path(_expand(self.pretrain.root)).resolve())
            update["pretrain"] = self.pretrain.model_copy(update={"root": root})
        return self.model_copy(update=update)

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec (every default filled in), JSON-serialisable."""
        return self.model_dump(mode="json")

    def loss_config(self) -> LossConfig:
        return self.loss.to_config()

    def pretrain_image_size(self) -> int:
        """The side of the pretraining's images: ``pretrain.image_size``, else ``detector.image_size``."""
        assert self.pretrain is not None
        return self.pretrain.image_size or self.detector.image_size

    @model_validator(mode="after")
    def _pretrain_apart(self) -> Spec:
        """The pretraining never sees the benchmark: another generator seed and root; its result is
        the only backbone file the spec may name; the search cannot change what it was made for."""
        p = self.pretrain
        if p is None:
            return self
        if self.dataset.format == "synthetic":
            from harmonic.data.synth_params import SynthParams

            bench_seed = SynthParams.seed if self.dataset.seed is None else self.dataset.seed
            if p.seed == bench_seed:
                raise ValueError(
                    f"pretrain.seed: {p.seed} is the benchmark dataset's seed (dataset.seed); the "
                    "pretraining must not see the benchmark's images: choose another seed"
                )
        if p.root is not None:
            mine = Path(_expand(p.root)).resolve()
            if mine == Path(self.dataset.resolved_root()):
                raise ValueError(
                    f"pretrain.root: {p.root!r} is the benchmark dataset's root; generate the pretraining "
                    "images elsewhere (or leave it unset)"
                )
        if self.detector.pretrained_backbone is not None:
            from workers.pretrain import is_pretrain_output

            if not is_pretrain_output(self, self.detector.pretrained_backbone):
                raise ValueError(
                    "detector.pretrained_backbone: set together with pretrain; the pretraining produces the "
                    "backbone file, so remove one of them"
                )
        if self.search is not None:
            fixed = [
                k
                for k in self.search.space
                if resolve_param_path(k).startswith("pretrain.")
                or (resolve_param_path(k) == "detector.image_size" and p.image_size is None)
                or resolve_param_path(k) == "detector.backbone"
            ]
            if fixed:
                raise ValueError(
                    f"search.space: {', '.join(fixed)} cannot be searched with a pretrain section (the "
                    "pretraining runs once, before the search, for one backbone and image size)"
                )
        return self

    @model_validator(mode="after")
    def _grace_within_schedule(self) -> Spec:
        if (
            self.search is not None
            and self.search.scheduler == "asha"
            and self.search.grace_period > self.train.epochs
        ):
            raise ValueError(
                f"search.grace_period ({self.search.grace_period}) must be <= train.epochs ({self.train.epochs})"
            )
        return self


def _init_error(err: Any) -> dict[str, Any]:
    """A pydantic error (``ValidationError.errors()``) as the input of ``ValidationError.from_exception_data``."""
    out = {"type": err["type"], "loc": tuple(err["loc"]), "input": err.get("input")}
    if "ctx" in err:
        out["ctx"] = err["ctx"]
    return out


#: Spec paths a search may not vary (``train.seed``: the seeds are ``search.seeds``).
NOT_SEARCHABLE = ("name", "search", "tracking", "train.seed", "scaling")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def search_space_problems(spec: Spec) -> list[tuple[str, str]]:
    """Every reason ``spec``'s ``search.space`` cannot run, as ``(field path, message)`` pairs.

    The rules a Tune trial would otherwise meet late: the path is a searchable spec field, no path
    is listed twice (``alpha`` and ``loss.alpha``), and every value a trial can get gives a valid
    spec: each listed value of ``choice``/``grid``, and for a range both bounds and a point between
    them that is no integer (an integer field cannot be sampled). The structure of each entry is
    checked by :class:`SearchSpec`; this needs the whole spec, so :meth:`Spec.parse` runs it.
    """
    if spec.search is None:
        return []
    problems, paths = _space_path_problems(spec.search.space)
    base = spec.model_copy(update={"search": None})
    for name, path in paths.items():
        ((kind, values),) = spec.search.space[name].items()
        if kind in ("uniform", "loguniform"):
            lo, hi = float(values[0]), float(values[1])
            values = [lo, round(lo + 0.37 * (hi - lo), 6), hi]
        for v in values:
            try:
                base.with_overrides({path: v}, check_paths=False)
            except SpecError as e:
                why = "; ".join(f"{p}: {m}" if p else m for p, m in e.problems)
                problems.append((f"search.space.{name}.{kind}", f"value {v!r} gives an invalid spec ({why})"))
                break
    return problems


def _space_path_problems(space: Any) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The problems of the names of a search space (no such field, not searchable, listed twice),
    and the spec path of every name without one."""
    problems: list[tuple[str, str]] = []
    paths: dict[str, str] = {}
    if not isinstance(space, dict):
        return problems, paths
    for name in space:
        where = f"search.space.{name}"
        try:
            path = resolve_param_path(str(name))
        except KeyError as e:
            problems.append((where, str(e.args[0])))
            continue
        if any(path == p or path.startswith(p + ".") for p in NOT_SEARCHABLE):
            hint = " (seeds are set by search.seeds)" if path == "train.seed" else ""
            problems.append((where, f"{path} cannot be searched{hint}"))
            continue
        twin = next((n for n, q in paths.items() if q == path), None)
        if twin is not None:
            problems.append((where, f"{path} is listed twice (also as {twin})"))
            continue
        paths[name] = path
    return problems, paths


def _documents(p: Path) -> list[Any]:
    """The spec documents of a file: one JSON document, or every YAML document of the file."""
    if not p.is_file():
        raise SpecError([("", f"spec file {str(p)!r} does not exist")], str(p))
    text = p.read_text()
    try:
        if p.suffix == ".json":
            return [json.loads(text)]
        import yaml

        return [d for d in yaml.safe_load_all(text) if d is not None]
    except Exception as e:  # yaml/json parse errors: report them as spec errors
        raise SpecError([("", f"cannot parse: {e}")], str(p)) from None


# Spec sections whose fields a bare search-space name may refer to, in lookup order.
_BARE_SECTIONS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("loss", LossSpec),
    ("train", TrainSpec),
    ("detector", DetectorSpec),
)


def resolve_param_path(name: str) -> str:
    """The dotted spec path of a search parameter: ``alpha`` -> ``loss.alpha``, ``lr`` -> ``train.lr``.

    Dotted names are checked against the spec's sections. Raises ``KeyError`` with a message for
    a name that is no spec field.
    """
    if "." in name:
        parts = name.split(".")
        model: type[BaseModel] = Spec
        for i, part in enumerate(parts):
            field = model.model_fields.get(part)
            if field is None:
                raise KeyError(f"{'.'.join(parts[: i + 1])} is not a spec field")
            ann = field.annotation
            sub = next(
                (
                    a
                    for a in getattr(ann, "__args__", (ann,))
                    if isinstance(a, type) and issubclass(a, BaseModel)
                ),
                None,
            )
            if i < len(parts) - 1:
                if sub is None:
                    raise KeyError(f"{'.'.join(parts[: i + 1])} has no sub-fields")
                model = sub
        return name
    for section, model in _BARE_SECTIONS:
        if name in model.model_fields:
            return f"{section}.{name}"
    raise KeyError(f"{name!r} is not a field of loss, train or detector; use a dotted path such as train.lr")


def _problems(e: ValidationError) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for err in e.errors():
        loc = [str(p) for p in err["loc"]]
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        path = ".".join(loc)
        # Validators of a section write "field: message" (and LossConfig "loss.field: message");
        # fold that field into the path so every message starts with the full field path.
        head, sep, rest = msg.partition(": ")
        if sep and head and " " not in head and not head.startswith("["):
            if head.startswith(path + ".") or head == path:
                path, msg = head, rest
            elif path and not head.startswith(loc[0] + "."):
                path, msg = f"{path}.{head}", rest
            elif not path:
                path, msg = head, rest
        problems.append((path, msg))
    return problems


def schema_main(argv: list[str]) -> int:
    """``hdet spec schema``: print the spec's JSON Schema."""
    parser = argparse.ArgumentParser(
        prog="hdet spec schema", description="Print the experiment spec's JSON Schema."
    )
    parser.add_argument("--indent", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(Spec.model_json_schema(), indent=args.indent))
    return 0


def check_main(argv: list[str]) -> int:
    """``hdet spec check SPEC...``: validate spec files; exit 2 naming each bad field (as ``hdet run`` would)."""
    parser = argparse.ArgumentParser(prog="hdet spec check", description="Validate experiment spec files.")
    parser.add_argument("specs", nargs="+", metavar="SPEC")
    parser.add_argument("--no-paths", action="store_true", help="do not check that dataset paths exist")
    parser.add_argument("--print", action="store_true", help="print the resolved spec")
    args = parser.parse_args(argv)
    rc = 0
    for path in args.specs:
        try:
            suite = Spec.suite_from_file(path, check_paths=not args.no_paths)
        except SpecError as e:
            print(e, file=sys.stderr)
            rc = 2
            continue
        for i, spec in enumerate(suite, start=1):
            where = f"{path}#{i}" if len(suite) > 1 else path
            kind = (
                "search"
                if spec.search and spec.search.space
                else "comparison"
                if spec.search
                else "single run"
            )
            print(f"{where}: ok ({spec.name}: {kind}, {spec.detector.arch}, loss {spec.loss.kind})")
            if args.print:
                print(json.dumps(spec.to_dict(), indent=2))
    return rc


def _loss_fields_match() -> bool:
    """True when :class:`LossSpec` mirrors :class:`LossConfig` field for field (checked by the tests)."""
    return set(LossSpec.model_fields) == {f.name for f in dc_fields(LossConfig)}
