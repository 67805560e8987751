"""The data sections of a spec: the benchmark's dataset and the backbone pretraining's generated set."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from workers.spec.base import _STRICT, SplitRef, _check_paths, _expand, _problems


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
    synth: dict[str, Any] = Field(default={}, description="synthetic: other generator parameters")

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
    synth: dict[str, Any] = Field(default={}, description="other generator parameters, as in dataset.synth")
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
