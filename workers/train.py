"""Compatibility surface: the names other modules and tests import from ``workers.train``,
re-exported from the modules that own them now. New code imports from those modules.

* :mod:`workers.trainer`: :class:`HarmonicTrainer`, :func:`make_trainer`, :func:`resolve_use_gpu`.
* :mod:`workers.worker_loop`: :func:`train_loop_per_worker` (the per-worker epoch loop).
* :mod:`workers.recipe`: datasets, model, loaders, optimizer and LR schedule of a spec.
* :mod:`workers.run_tracking`: the MLflow child run (:func:`prepare_child_run`) and artifacts.
* :mod:`workers.train_state`: the checkpoint's train state (:data:`STATE_FILE`).
"""

from __future__ import annotations

from workers.epoch_metrics import TEST_PREFIX
from workers.recipe import WarmupDecay, build_model, dataset_config, make_optimizer
from workers.run_tracking import prepare_child_run
from workers.tracking import Artifact
from workers.train_state import STATE_FILE
from workers.trainer import HarmonicTrainer, make_trainer, resolve_use_gpu
from workers.worker_loop import train_loop_per_worker

__all__ = [
    "BEST_ARTIFACT_DIR",
    "HarmonicTrainer",
    "MODEL_FILE",
    "MODEL_INFO_FILE",
    "STATE_FILE",
    "TEST_PREFIX",
    "WarmupDecay",
    "build_model",
    "dataset_config",
    "make_optimizer",
    "make_trainer",
    "prepare_child_run",
    "resolve_use_gpu",
    "train_loop_per_worker",
]

#: Artifact folder of the best checkpoint in the child run (what ``hdet predict`` loads).
BEST_ARTIFACT_DIR = Artifact.CHECKPOINT_DIR
MODEL_FILE = Artifact.MODEL_FILE
MODEL_INFO_FILE = Artifact.MODEL_INFO_FILE
