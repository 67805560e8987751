"""``build_dataset``: the ``dataset`` section of an experiment spec -> a torch Dataset.

Spec conventions (paths relative to ``root`` unless absolute)

``format: coco``
    ``train``/``val`` name a split: a string ``NAME`` means images in ``root/NAME/`` and
    annotations in ``root/annotations/instances_NAME.json`` (COCO 2017: ``train2017``,
    ``val2017``; ``hdet data synth``: ``train``, ``val``), or a mapping
    ``{images: DIR, ann: FILE}``. When the key is absent, ``train2017``/``val2017`` is used if
    its annotation file exists, else ``train``/``val``.
``format: voc``
    ``root`` is the ``VOCdevkit`` folder; ``train``/``val`` are ``"2007-trainval+2012-trainval"``
    style strings or lists of ``[year, image_set]`` pairs. Defaults: the paper's 07+12 trainval
    for training, 2007 test for evaluation. ``keep_difficult`` (false) is honoured.
``format: synthetic``
    ``root`` is where the set lives; it is generated there on first use (atomically, so ranks
    that start together do not collide). ``train``/``val`` are image counts (200/50), plus
    optional ``image_size`` (256), ``seed`` (0), ``max_objects`` and the other keyword arguments
    of :func:`harmonic.data.synth.generate`. An existing set made with other parameters is an
    error rather than silently reused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from harmonic.data.check import DatasetError
from harmonic.data.coco import CocoDetection, Transforms
from harmonic.data.synth_params import SynthParams

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
_SYNTH_KEYS = {f for f in SynthParams.__dataclass_fields__ if f not in ("version",)}


def _resolve(root: Path, p: str | os.PathLike[str]) -> Path:
    p = Path(p)
    return p if p.is_absolute() else root / p


def coco_split_paths(root: str | os.PathLike[str], split: Split, spec: Any = None) -> tuple[Path, Path]:
    """(images_dir, ann_file) of a COCO-format split, following the conventions of this module."""
    root = Path(root)
    if isinstance(spec, Mapping):
        missing = {"images", "ann"} - set(spec)
        if missing:
            raise DatasetError(
                f"dataset.{split}: mapping needs keys 'images' and 'ann' (missing {sorted(missing)})"
            )
        return _resolve(root, spec["images"]), _resolve(root, spec["ann"])
    if spec is None:
        spec = f"{split}2017" if (root / "annotations" / f"instances_{split}2017.json").is_file() else split
    if not isinstance(spec, str):
        raise DatasetError(f"dataset.{split}: expected a split name or {{images, ann}}, got {spec!r}")
    return root / spec, root / "annotations" / f"instances_{spec}.json"


def _voc_splits(spec: Any, split: Split) -> tuple[tuple[str, str], ...]:
    if spec is None:
        return (("2007", "trainval"), ("2012", "trainval")) if split == "train" else (("2007", "test"),)
    if isinstance(spec, str):
        pairs = []
        for part in spec.split("+"):
            year, _, image_set = part.strip().partition("-")
            if not year or not image_set:
                raise DatasetError(f"dataset.{split}: {part!r} is not YEAR-IMAGESET (e.g. 2007-trainval)")
            pairs.append((year, image_set))
        return tuple(pairs)
    try:
        return tuple((str(y), str(s)) for y, s in spec)
    except (TypeError, ValueError):
        raise DatasetError(
            f"dataset.{split}: expected 'YEAR-SET+...' or [[year, set], ...], got {spec!r}"
        ) from None


def ensure_synthetic(cfg: Mapping[str, Any], *, jobs: int = 1) -> Path:
    """Generate the synthetic set of a ``format: synthetic`` spec unless it exists (in ``jobs``
    processes; the files do not depend on it); return its root."""
    root = Path(cfg["root"])
    given = {k: v for k, v in cfg.items() if v is not None}
    kwargs: dict[str, Any] = {k: v for k, v in given.items() if k in _SYNTH_KEYS}
    unknown = set(given) - _SYNTH_KEYS - {"format", "root"}
    if unknown:
        raise DatasetError(f"dataset: unknown key(s) for format synthetic: {sorted(unknown)}")
    try:
        wanted = SynthParams(**{k: tuple(v) if k == "aspect_ratios" else v for k, v in kwargs.items()})  # type: ignore[arg-type]
        wanted.validate()
    except (TypeError, ValueError) as e:
        raise DatasetError(f"dataset (synthetic): {e}") from None
    marker = root / "synth.json"
    if marker.is_file():
        have = json.loads(marker.read_text())
        have.setdefault("test", 0)  # sets written before the test split existed
        want = json.loads(json.dumps(asdict(wanted) | {"aspect_ratios": list(wanted.aspect_ratios)}))
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            raise DatasetError(
                f"synthetic set at {root} was generated with other parameters "
                f"({', '.join(f'{k}: {a!r} there, {b!r} asked' for k, (a, b) in diff.items())}); "
                "delete it or point root elsewhere"
            )
        return root
    if root.exists() and any(root.iterdir()):
        raise DatasetError(f"{root} exists but holds no synthetic set (no {marker}); point root elsewhere")
    from harmonic.data.synth import generate

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        generate(tmp, **kwargs, jobs=jobs)
        try:
            if root.exists():
                root.rmdir()  # empty folder (checked above)
            os.rename(tmp, root)
        except OSError:
            if not (root / "synth.json").is_file():
                raise
            # another process finished first: its identical set is used
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _names_no_test_split(dataset_cfg: Mapping[str, Any]) -> bool:
    """True when a COCO/VOC config has no ``test`` entry (their test split must be named)."""
    return dataset_cfg.get("format") in ("coco", "voc") and dataset_cfg.get("test") is None


def build_dataset(
    dataset_cfg: Mapping[str, Any],
    split: Split,
    *,
    transforms: Transforms | None = None,
    with_masks: bool = False,
    skip_bad: bool = False,
) -> Dataset[Any]:
    """Build the train, val or test dataset of a spec's ``dataset`` section (see the module docstring).

    Args:
        dataset_cfg: ``{format: coco | voc | synthetic, root, train, val, ...}``.
        split: ``"train"``, ``"val"`` or ``"test"`` (the held-out split; COCO/VOC: only when the
            spec names it).
        transforms: passed to the dataset.
        with_masks: instance masks (COCO and synthetic formats only).
        skip_bad: drop bad annotations instead of refusing the dataset (COCO and synthetic).

    Returns:
        A :class:`CocoDetection` or :class:`VOCDetection`.

    Raises:
        DatasetError: unknown format, missing ``root``, or a missing path (named in the message).
    """
    if split not in SPLITS:
        raise DatasetError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if split == "test" and _names_no_test_split(dataset_cfg):
        raise DatasetError("dataset.test: this dataset names no test split")
    fmt = dataset_cfg.get("format")
    if "root" not in dataset_cfg or not dataset_cfg["root"]:
        raise DatasetError("dataset.root is required")
    root = Path(dataset_cfg["root"])
    if fmt == "synthetic":
        ensure_synthetic(dataset_cfg)
        if split == "test" and not int(dataset_cfg.get("test") or 0):
            raise DatasetError("dataset.test: the synthetic set has no test split (test: 0)")
        return CocoDetection(
            root / split,
            root / "annotations" / f"instances_{split}.json",
            transforms=transforms,
            with_masks=with_masks,
            skip_bad=skip_bad,
        )
    if not root.is_dir():
        raise DatasetError(f"dataset.root not found: {root}")
    if fmt == "coco":
        images_dir, ann_file = coco_split_paths(root, split, dataset_cfg.get(split))
        if not ann_file.is_file():
            raise DatasetError(f"dataset.{split}: annotation file not found: {ann_file}")
        if not images_dir.is_dir():
            raise DatasetError(f"dataset.{split}: image folder not found: {images_dir}")
        return CocoDetection(
            images_dir, ann_file, transforms=transforms, with_masks=with_masks, skip_bad=skip_bad
        )
    if fmt == "voc":
        if with_masks:
            raise DatasetError("dataset.format voc has no instance masks (mask_rcnn needs coco or synthetic)")
        from harmonic.data.voc import VOCDetection

        return VOCDetection(
            root,
            _voc_splits(dataset_cfg.get(split), split),
            transforms=transforms,
            keep_difficult=bool(dataset_cfg.get("keep_difficult", False)),
        )
    raise DatasetError(f"dataset.format must be coco, voc or synthetic, got {fmt!r}")
