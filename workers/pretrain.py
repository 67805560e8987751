"""``hdet pretrain SPEC``: pretrain a spec's backbone body once, cache it, track it in MLflow.

``hdet run`` calls :func:`pretrain_on_ray` before any training starts when the spec has a
``pretrain`` section: a cached pretraining is found in the driver and starts nothing; otherwise the
pretraining is one Ray task with one training worker's resources (``scaling``: its CPUs, its GPU when
``use_gpu`` resolves to one, its memory and accelerator type), which trains on the device Ray gave
it and fills the cache. ``hdet pretrain`` trains in its own process (:func:`ensure_pretrained`).

Cache
    The result lives in ``$HDET_HOME/pretrained/<key>/``: ``backbone.pt`` (the body's ``state_dict`` in
    torchvision's naming, what ``detector.pretrained_backbone`` loads) and ``pretrain.json`` (how it
    was made: body, normalisation, data parameters, recipe, per-epoch and final metrics, the file's
    sha256, the MLflow run). ``<key>`` hashes what defines the result: the ``pretrain`` section
    (without ``root``, which only says where the images are written), the body the detector is built
    from, the image size and :data:`PRETRAIN_VERSION` (raised whenever the pretraining code changes
    what it produces). A second run of the same spec finds the folder and pays nothing.

    The folder is written under a temporary name and renamed into place when complete, so an
    interrupted pretraining leaves nothing that looks finished; a lock file keeps two processes of
    one machine from training the same key twice (the second waits and uses the first's result).

    The Ray task writes into the driver's cache folder (the same path: ``$HDET_HOME`` is one folder
    on one machine, shared storage on a cluster) and also returns the file's bytes as a second Ray
    object, which the driver fetches only when it cannot see the task's file (a node whose
    ``$HDET_HOME`` is not shared): it then writes the file and its metadata into its own cache.

MLflow
    A pretraining is its own run in the spec's experiment (tag ``hdet.role = pretrain``, its key in
    ``hdet.pretrain_key``): the recipe as params, the per-epoch curve as metrics, and the two files as
    artifacts under ``pretrained/``, so ``detector.pretrained_backbone: runs:/<run_id>`` names it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.spec import Spec

__all__ = [
    "ARTIFACT_DIR",
    "BACKBONE_FILE",
    "META_FILE",
    "PRETRAIN_VERSION",
    "Pretrained",
    "ensure_pretrained",
    "cached_pretraining",
    "is_pretrain_output",
    "main",
    "pretrain_key",
    "pretrain_on_ray",
    "pretrained_dir",
]

#: Raise when the pretraining code changes what a given spec produces (old cache entries then no
#: longer match any key).
PRETRAIN_VERSION = 1
BACKBONE_FILE = "backbone.pt"
META_FILE = "pretrain.json"
#: Artifact folder of a pretrain run in MLflow (``runs:/<run_id>`` resolves to its backbone file).
ARTIFACT_DIR = "pretrained"


@dataclass(frozen=True)
class Pretrained:
    """A pretraining's result: the backbone file, its metadata, and whether it came from the cache."""

    path: Path
    meta: dict[str, Any]
    cached: bool


def pretrained_dir() -> Path:
    """The cache of pretrained bodies: ``$HDET_HOME/pretrained``."""
    from workers.env import hdet_home

    return hdet_home() / "pretrained"


def _definition(spec: Spec) -> dict[str, Any]:
    from harmonic.pretrain import body_name

    assert spec.pretrain is not None
    return {
        "version": PRETRAIN_VERSION,
        "pretrain": spec.pretrain.model_dump(mode="json", exclude={"root", "image_size"}),
        "body": body_name(spec.detector.arch, spec.detector.backbone),
        "image_size": spec.pretrain_image_size(),
    }


def pretrain_key(spec: Spec) -> str:
    """The cache key of ``spec``'s pretraining (see the module docstring)."""
    text = json.dumps(_definition(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def is_pretrain_output(spec: Spec, path: str) -> bool:
    """True when ``path`` is where ``spec``'s own pretraining puts its file (under any ``$HDET_HOME``):
    what ``hdet run`` writes into ``detector.pretrained_backbone`` after pretraining."""
    p = Path(path)
    return p.name == BACKBONE_FILE and p.parent.name == pretrain_key(spec)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached(folder: Path) -> Pretrained | None:
    if (folder / BACKBONE_FILE).is_file() and (folder / META_FILE).is_file():
        return Pretrained(folder / BACKBONE_FILE, json.loads((folder / META_FILE).read_text()), True)
    return None


def cached_pretraining(spec: Spec) -> Pretrained | None:
    """``spec``'s pretraining when this process finds it in the cache, else None."""
    return _cached(pretrained_dir() / pretrain_key(spec))


def ensure_pretrained(
    spec: Spec,
    *,
    tracking_uri: str | None = None,
    say: Callable[[str], None] = print,
    device: str = "cpu",
    data_workers: int = 0,
) -> Pretrained:
    """The backbone file of ``spec``'s ``pretrain`` section: from the cache, else trained now.

    Args:
        spec: a spec with a ``pretrain`` section.
        tracking_uri: MLflow store for the pretrain run; None: not tracked.
        say: where progress lines go.
        device: where a pretraining that is not cached trains (``cpu``, ``cuda``); the result
            does not depend on it beyond float rounding, so it is not part of the cache key.
        data_workers: processes assembling its batches (:func:`harmonic.pretrain.pretrain_body`);
            not part of the cache key either.

    Returns:
        The file, its metadata and whether it was cached.
    """
    if spec.pretrain is None:
        raise ValueError("ensure_pretrained: the spec has no pretrain section")
    key = pretrain_key(spec)
    folder = pretrained_dir() / key
    found = _cached(folder)
    if found is not None:
        return found
    with _locked(pretrained_dir() / f".{key}.lock"):
        found = _cached(folder)  # another process finished it while we waited
        if found is not None:
            return found
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=pretrained_dir()))
        try:
            meta = _train_into(spec, key, tmp, tracking_uri, say, device, data_workers)
            os.rename(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return Pretrained(folder / BACKBONE_FILE, meta, False)


def pretrain_on_ray(
    spec: Spec, *, tracking_uri: str | None = None, say: Callable[[str], None] = print
) -> Pretrained:
    """``spec``'s pretraining: from the cache (no task), else trained by one Ray task.

    The task reserves what one training worker of ``spec`` reserves
    (:func:`workers.resources.worker_bundle`, ``use_gpu: auto`` resolved as for the trainings), runs
    with the driver's ``$HDET_HOME`` and trains on the device Ray assigned it: a GPU asked for and not
    usable is refused (:class:`~workers.training.errors.DeviceMismatchError`). Its file reaches the driver's
    cache as the module docstring says.

    Args:
        spec: a spec with a ``pretrain`` section (its paths resolved by the driver).
        tracking_uri: MLflow store for the pretrain run; None: not tracked.
        say: where the driver's progress lines go (the task's own go to the job log).

    Raises:
        RuntimeError: the pretraining is not cached and this process is not connected to Ray.
        harmonic.data.DatasetError, DeviceMismatchError: as the task raised them.
    """
    if spec.pretrain is None:
        raise ValueError("pretrain_on_ray: the spec has no pretrain section")
    found = cached_pretraining(spec)
    if found is not None:
        return found
    import ray

    from workers.env import hdet_home
    from workers.resources import resolve_use_gpu, worker_bundle

    if not ray.is_initialized():
        raise RuntimeError("pretrain_on_ray: the pretraining is a Ray task; connect to Ray first (ray.init)")
    use_gpu = resolve_use_gpu(spec)
    bundle = worker_bundle(spec, use_gpu)
    options: dict[str, Any] = {
        "num_cpus": bundle.pop("CPU"),
        "num_gpus": bundle.pop("GPU", 0.0),
        "num_returns": 2,
        "runtime_env": {"env_vars": {"HDET_HOME": str(hdet_home())}},
    }
    if "memory" in bundle:
        options["memory"] = bundle.pop("memory")
    if bundle:  # the accelerator type's marker
        options["resources"] = bundle
    key = pretrain_key(spec)
    say(f"pretrain {key}: a Ray task with {options['num_cpus']:g} CPU, {options['num_gpus']:g} GPU")
    meta_ref, file_ref = (
        ray.remote(_pretrain_task).options(**options).remote(spec.to_dict(), tracking_uri, use_gpu)
    )
    try:
        meta: dict[str, Any] = ray.get(meta_ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, Exception):  # the task's own error, without Ray's wrapper
            raise e.cause from None
        raise
    except BaseException:  # Ctrl-C in the driver: the task stops too, leaving no folder behind
        ray.cancel(meta_ref)
        raise
    folder = pretrained_dir() / key
    found = _cached(folder)
    if found is None:  # the task's node does not share this $HDET_HOME: its file comes as an object
        _store(folder, meta, ray.get(file_ref))
        found = _cached(folder)
        assert found is not None
    return Pretrained(found.path, found.meta, cached=False)


def _pretrain_task(
    spec_dict: dict[str, Any], tracking_uri: str | None, use_gpu: bool
) -> tuple[dict[str, Any], bytes]:
    """The Ray task of :func:`pretrain_on_ray`: the metadata and the file's bytes."""
    import ray
    import torch

    from workers.spec import Spec
    from workers.training.recipe import loading, worker_device_type

    spec = Spec.parse(spec_dict, check_paths=False)
    device = worker_device_type(use_gpu, ray.get_gpu_ids(), torch.cuda.is_available())
    done = ensure_pretrained(
        spec, tracking_uri=tracking_uri, device=device, data_workers=loading(spec, device).data_workers
    )
    return done.meta, done.path.read_bytes()


def _store(folder: Path, meta: dict[str, Any], data: bytes) -> None:
    """Put a pretraining trained elsewhere into this machine's cache (its sha256 checked)."""
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise OSError(f"pretrain {meta['key']}: the file received does not match its sha256")
    with _locked(folder.parent / f".{folder.name}.lock"):
        if _cached(folder) is not None:
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            (tmp / BACKBONE_FILE).write_bytes(data)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
            os.rename(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _train_into(
    spec: Spec,
    key: str,
    out: Path,
    tracking_uri: str | None,
    say: Callable[[str], None],
    device: str,
    data_workers: int,
) -> dict[str, Any]:
    import torch

    from harmonic.data import build_dataset
    from harmonic.data.transforms import build_transforms
    from harmonic.detectors import build_torchvision_detector
    from harmonic.pretrain import PretrainConfig, body_name, pretrain_body
    from workers.env import environment

    p = spec.pretrain
    assert p is not None
    size = spec.pretrain_image_size()
    body = body_name(spec.detector.arch, spec.detector.backbone)
    data = p.dataset_spec(size).build_config()
    say(
        f"pretrain {key}: {body}, task {p.task}, {p.images} generated images of {size} px "
        f"(seed {p.seed}), {p.epochs} epochs"
    )
    t0 = time.time()
    masks = p.task == "segment"
    # resize and flip: the photometric and crop augmentations of SSD are not what is learnt here
    train_ds: Any = build_dataset(
        data, "train", transforms=build_transforms("retinanet", size, True), with_masks=masks
    )
    val_ds: Any = build_dataset(data, "val", with_masks=masks)
    # the detector's own input normalisation, so the body sees what it will see when fine-tuned
    # (built at >= 268 px only because SSD300 needs it; the normalisation does not depend on the size)
    transform: Any = build_torchvision_detector(
        spec.detector.arch, 2, backbone=spec.detector.backbone, image_size=max(size, 268)
    ).transform
    run = _PretrainRun(spec, key, body, tracking_uri) if tracking_uri else None
    try:

        def on_epoch(m: dict[str, float]) -> None:
            miou = f" mIoU {m['val_miou']:.3f}" if "val_miou" in m else ""
            say(
                f"pretrain {key}: epoch {int(m['epoch'])}/{p.epochs} loss {m['train_loss']:.4f} "
                f"val mAP {m['val_map']:.3f}{miou} ({m['seconds']:.0f} s)"
            )
            if run is not None:
                run.log_epoch(m)

        result = pretrain_body(
            body,
            train_ds,
            val_ds,
            PretrainConfig(p.task, p.epochs, p.batch_size, p.lr, p.weight_decay, p.seed),
            image_size=size,
            image_mean=transform.image_mean,
            image_std=transform.image_std,
            on_epoch=on_epoch,
            device=device,
            data_workers=data_workers,
        )
        torch.save(result.state_dict, out / BACKBONE_FILE)
        meta: dict[str, Any] = {
            "key": key,
            "version": PRETRAIN_VERSION,
            "arch": spec.detector.arch,
            "backbone": spec.detector.backbone,
            "body": body,
            "norm": result.norm,
            "image_size": size,
            "input_mean": list(transform.image_mean),
            "input_std": list(transform.image_std),
            "pretrain": p.model_dump(mode="json"),
            "data": {k: v for k, v in data.items() if k != "format"},
            "epochs": p.epochs,
            "final": result.history[-1],
            "history": result.history,
            "sha256": _sha256(out / BACKBONE_FILE),
            "seconds": round(time.time() - t0, 1),
            "device": device,
            "pid": os.getpid(),  # the process that trained it (with environment.hostname)
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "mlflow_run_id": run.run_id if run else None,
            "tracking_uri": tracking_uri,
            "environment": environment(),
        }
        (out / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        if run is not None:
            run.finish(out)
    except BaseException:
        if run is not None:
            run.fail()
        raise
    say(f"pretrain {key}: done in {meta['seconds']:.0f} s, val mAP {meta['final']['val_map']:.3f}")
    return meta


class _PretrainRun:
    """The MLflow run of one pretraining (see the module docstring)."""

    def __init__(self, spec: Spec, key: str, body: str, tracking_uri: str) -> None:
        from workers.env import git_commit, package_version
        from workers.tracking import (
            PRETRAIN_ROLE,
            client,
            flatten_params,
            get_or_create_experiment,
            log_params,
        )

        assert spec.pretrain is not None
        self.client = client(tracking_uri)
        exp_id = get_or_create_experiment(self.client, spec.tracking.experiment, tracking_uri)
        tags = {
            "hdet.role": PRETRAIN_ROLE,
            "hdet.pretrain_key": key,
            "hdet.spec_name": spec.name,
            "arch": spec.detector.arch,
            "body": body,
            "git_commit": git_commit(),
            "harmonicdet_version": package_version(),
        }
        run = self.client.create_run(exp_id, run_name=f"pretrain-{body}-{key[:8]}", tags=tags)
        self.run_id: str = run.info.run_id
        params = flatten_params(
            {**_definition(spec), "pretrain": spec.pretrain.model_dump(mode="json"), "key": key}
        )
        log_params(self.client, self.run_id, params)

    def log_epoch(self, metrics: dict[str, float]) -> None:
        from workers.tracking import log_metrics

        log_metrics(self.client, self.run_id, metrics, step=int(metrics["epoch"]))

    def finish(self, folder: Path) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path=ARTIFACT_DIR)
        self.client.set_terminated(self.run_id, status="FINISHED")

    def fail(self) -> None:
        try:
            self.client.set_terminated(self.run_id, status="FAILED")
        except Exception:  # the store itself may be what failed
            pass


def main(argv: list[str] | None = None) -> int:
    """``hdet pretrain SPEC``: pretrain (or find in the cache) the spec's backbone body."""
    parser = argparse.ArgumentParser(
        prog="hdet pretrain",
        description="Pretrain a spec's backbone body on generated images (cached by its definition).",
    )
    parser.add_argument("spec", help="experiment spec (YAML or JSON) with a pretrain section")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: the spec's, else a local sqlite store)"
    )
    parser.add_argument("--json", action="store_true", help="print the metadata as JSON")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from harmonic.data import DatasetError
    from workers.spec import Spec, SpecError
    from workers.tracking import resolve_tracking_uri

    try:
        suite = Spec.suite_from_file(args.spec)  # one spec, or a suite: each one's pretraining
    except SpecError as e:
        print(f"hdet pretrain: {e}", file=sys.stderr)
        return 2
    with_pretrain = [spec for spec in suite if spec.pretrain is not None]
    if not with_pretrain:
        print(f"hdet pretrain: {args.spec} has no pretrain section", file=sys.stderr)
        return 2
    for spec in with_pretrain:
        tracking_uri = resolve_tracking_uri(spec.tracking.tracking_uri, args.tracking_uri)
        try:
            done = ensure_pretrained(spec, tracking_uri=tracking_uri)
        except DatasetError as e:
            print(f"hdet pretrain: pretraining images refused (pretrain):\n{e}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(done.meta, indent=2, default=str))
        else:
            final = done.meta.get("final", {})
            how = "cached" if done.cached else f"trained in {done.meta.get('seconds', 0):.0f} s"
            print(
                f"{spec.name}: {done.path} ({how}; {done.meta.get('body')}, "
                f"val mAP {final.get('val_map', float('nan')):.3f}, MLflow run {done.meta.get('mlflow_run_id')})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
