"""The weights a training starts from: ``detector.pretrained_backbone``, ``detector.init_from``, ``pretrain``.

:func:`resolve_start_weights` runs in ``hdet run`` before any training and before the parent MLflow
run exists, so that bad input fails early and leaves nothing behind:

1. a ``pretrain`` section is trained or found in the cache (:mod:`workers.pretrain`; ``hdet run``
   has trained one not yet cached as a Ray task before this) and its file becomes
   ``detector.pretrained_backbone``;
2. ``runs:/<run_id>[/<path>]`` references are downloaded (once, into
   ``$HDET_HOME/artifacts/<run_id>/``): the backbone file of a pretrain run
   (``pretrained/backbone.pt``) or the best checkpoint of a training run (``checkpoint/model.pt``);
3. the detector is built once with the backbone file and the ``init_from`` checkpoint is loaded
   into it strictly, so a file that is no state dict or does not fit is reported with its field.

The spec it returns names local files only; every training and trial of the search receives it, so
both arms of a comparison start from the same weights (the heads are fresh unless ``init_from``
gives them). On a cluster, ``$HDET_HOME`` must then be storage the workers share.

:func:`load_init_from` is what a training worker calls right after building its detector.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from workers.pretrain import Pretrained
    from workers.spec import Spec

__all__ = ["fetch_run_artifact", "load_init_from", "load_detector_state", "resolve_start_weights"]


def fetch_run_artifact(ref: str, default_path: str, tracking_uri: str, field: str) -> Path:
    """Download the artifact ``runs:/<run_id>[/<path>]`` (``default_path`` when the reference has
    none) to ``$HDET_HOME/artifacts/<run_id>/`` and return the local file.

    Raises:
        SpecError: unknown run, or the run has no such artifact; the message names ``field``.
    """
    from mlflow.exceptions import MlflowException

    from workers.env import hdet_home
    from workers.spec import SpecError, parse_run_ref
    from workers.tracking import client

    try:
        run_id, given = parse_run_ref(ref)
    except ValueError as e:
        raise SpecError([(field, str(e))]) from None
    artifact = given or default_path
    cache = (hdet_home() / "artifacts" / run_id).resolve()
    local = (cache / artifact).resolve()
    if not local.is_relative_to(cache):
        raise SpecError([(field, f"{ref!r}: the artifact path leaves the run's artifacts")])
    if local.is_file():
        return local
    c = client(tracking_uri)
    try:
        c.get_run(run_id)
    except MlflowException:
        raise SpecError([(field, f"no MLflow run {run_id!r} in {tracking_uri}")]) from None
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        got = Path(c.download_artifacts(run_id, artifact, str(cache)))
    except (MlflowException, OSError) as e:
        raise SpecError([(field, f"MLflow run {run_id} has no artifact {artifact!r} ({e})")]) from None
    if not got.is_file():
        raise SpecError([(field, f"MLflow run {run_id}: artifact {artifact!r} is not a file")])
    return got


def load_detector_state(
    model: nn.Module, path: str | os.PathLike[str], field: str = "detector.init_from"
) -> None:
    """Load a whole detector's ``state_dict`` file into ``model``, strictly.

    Raises:
        ValueError: the file is not a state dict, or its keys or shapes differ from the model's (the
            message names ``field``, the file and the first differences).
    """
    from harmonic.detectors.backbones import read_state_dict

    state = read_state_dict(path, what=field)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{field}: {os.fspath(path)!r} does not fit the detector: {len(missing)} missing key(s) "
            f"{missing[:4]}, {len(unexpected)} unexpected key(s) {unexpected[:4]}, {len(shapes)} shape "
            f"mismatch(es) {shapes[:3]} (was it trained with the same arch, backbone, classes and "
            "pretrained_backbone kind?)"
        )
    model.load_state_dict(state, strict=True)


def load_init_from(model: nn.Module, spec: Spec) -> None:
    """Load ``detector.init_from`` (a local file once :func:`resolve_start_weights` ran) into ``model``;
    nothing when it is unset."""
    if spec.detector.init_from is not None:
        load_detector_state(model, spec.detector.init_from)


def resolve_start_weights(
    spec: Spec, tracking_uri: str, say: Callable[[str], None] = print, *, pretrained: Pretrained | None = None
) -> Spec:
    """``spec`` with its starting weights made local files and checked (see the module docstring);
    ``pretrained``: the ``pretrain`` section's result when the caller has it already (not looked up).

    Raises:
        SpecError: a reference or file that cannot be used, naming its field.
        harmonic.data.DatasetError: the pretraining's images cannot be generated.
    """
    from workers.tracking import Artifact

    det = spec.detector
    overrides: dict[str, Any] = {}
    backbone = det.pretrained_backbone
    if spec.pretrain is not None:
        from workers.pretrain import ensure_pretrained

        done = pretrained or ensure_pretrained(spec, tracking_uri=tracking_uri, say=say)
        if done.cached:
            say(f"pretrain: cached {done.path} (MLflow run {done.meta.get('mlflow_run_id')})")
        backbone = str(done.path)
    elif backbone is not None and backbone.startswith("runs:"):
        from workers.pretrain import ARTIFACT_DIR, BACKBONE_FILE

        backbone = str(
            fetch_run_artifact(
                backbone, f"{ARTIFACT_DIR}/{BACKBONE_FILE}", tracking_uri, "detector.pretrained_backbone"
            )
        )
    init = det.init_from
    if init is not None and init.startswith("runs:"):
        model_file = f"{Artifact.CHECKPOINT_DIR}/{Artifact.MODEL_FILE}"
        init = str(fetch_run_artifact(init, model_file, tracking_uri, "detector.init_from"))
    if backbone is None and init is None:
        return spec
    if backbone is not None:
        backbone = os.path.abspath(os.path.expanduser(backbone))
        overrides["detector.pretrained_backbone"] = backbone
    if init is not None:
        init = os.path.abspath(os.path.expanduser(init))
        overrides["detector.init_from"] = init
    resolved = spec.with_overrides(overrides)
    _check_fits(resolved)
    return resolved


def _check_fits(spec: Spec) -> None:
    """Build the detector as a training worker will and load ``init_from``: errors name the field."""
    from harmonic.data import build_dataset
    from harmonic.detectors import build_torchvision_detector
    from workers.spec import SpecError
    from workers.training.recipe import dataset_config

    det = spec.detector
    train_ds: Any = build_dataset(dataset_config(spec), "train")
    num_classes = int(train_ds.num_classes) + 1
    try:
        model = build_torchvision_detector(
            det.arch,
            num_classes,
            backbone=det.backbone,
            image_size=det.image_size,
            pretrained_backbone=det.pretrained_backbone,
            anchor_scale=det.anchor_scale,
        )
    except (OSError, ValueError) as e:
        msg = str(e).removeprefix("pretrained_backbone: ")
        raise SpecError([("detector.pretrained_backbone", msg)]) from None
    if det.init_from is not None:
        try:
            load_detector_state(model, det.init_from)
        except (OSError, ValueError) as e:
            raise SpecError([("detector.init_from", str(e).removeprefix("detector.init_from: "))]) from None
