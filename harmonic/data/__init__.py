"""Detection datasets: COCO format, PASCAL VOC, the synthetic shapes set; validation, transforms,
aspect-ratio grouped batching.

The torch-based names are imported on first use, so ``hdet data synth`` and ``hdet data check``
start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from harmonic.data.check import CheckReport, DatasetError, Problem, check_dataset

if TYPE_CHECKING:
    from harmonic.data.coco import CocoDetection
    from harmonic.data.factory import build_dataset
    from harmonic.data.sampler import GroupedBatchSampler, collate_fn, create_aspect_ratio_groups
    from harmonic.data.transforms import build_transforms
    from harmonic.data.voc import VOC_CLASSES, VOCDetection

_LAZY = {
    "CocoDetection": "harmonic.data.coco",
    "VOCDetection": "harmonic.data.voc",
    "VOC_CLASSES": "harmonic.data.voc",
    "build_dataset": "harmonic.data.factory",
    "build_transforms": "harmonic.data.transforms",
    "GroupedBatchSampler": "harmonic.data.sampler",
    "create_aspect_ratio_groups": "harmonic.data.sampler",
    "collate_fn": "harmonic.data.sampler",
}

__all__ = [
    "CheckReport",
    "CocoDetection",
    "DatasetError",
    "GroupedBatchSampler",
    "Problem",
    "VOCDetection",
    "VOC_CLASSES",
    "build_dataset",
    "build_transforms",
    "check_dataset",
    "collate_fn",
    "create_aspect_ratio_groups",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'harmonic.data' has no attribute {name!r}")
