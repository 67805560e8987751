"""torchvision detectors (and DSSD, RefineDet, which torchvision lacks, in its contract) trained with
the Harmonic / HarmonicDet losses.

``build_detector(arch, num_classes, loss=..., backbone=..., image_size=..., pretrained_backbone=...)``
returns a plain torchvision model whose loss-computing part is the adapter for the configured loss
(see :mod:`harmonic.config` for every loss option, and the adapters' module docstrings for what each
detector couples). ``pop_diagnostics`` reads the per-positive score/IoU/beta_r/beta_c of the last
training step (and dL/dp); ``set_eval_protocol`` sets the one evaluation protocol (score threshold,
detections per image, NMS IoU) that every model built here gets; ``pre_nms_predictions`` runs inference with the final NMS turned off.
"""

from .backbones import BACKBONES
from .common import pop_diagnostics, pre_nms_predictions
from .factory import (
    ARCHS,
    build_detector,
    build_torchvision_detector,
    install_loss,
    set_eval_protocol,
    valid_backbones,
)

__all__ = [
    "ARCHS",
    "BACKBONES",
    "build_detector",
    "build_torchvision_detector",
    "install_loss",
    "pop_diagnostics",
    "pre_nms_predictions",
    "set_eval_protocol",
    "valid_backbones",
]
