"""The training recipe of a spec: datasets, detector, data loaders, optimizer, LR schedule, seeding,
and the device and mixed precision a worker trains with.
One definition for the Ray Train worker, ``hdet bench train``'s plain loop and ``scripts/finetune.py``.

Nothing here knows Ray or MLflow: a loader is built for one shard (``rank`` of ``world``), which is
the whole set for a single process. Heavy imports (torch, the data pipeline) happen in the functions.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from workers.training.errors import DeviceMismatchError

if TYPE_CHECKING:
    import torch

    from workers.spec import Spec

__all__ = [
    "Datasets",
    "Loading",
    "TrainLoader",
    "WarmupDecay",
    "amp_dtype",
    "build_datasets",
    "build_model",
    "dataset_config",
    "eval_dataset",
    "eval_loader",
    "gpu_data_workers",
    "grad_scaler",
    "loading",
    "make_optimizer",
    "make_scheduler",
    "seed_everything",
    "train_dataset",
    "train_loader",
    "use_amp",
    "worker_device_type",
]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- device and precision


def worker_device_type(use_gpu: bool, gpu_ids: Sequence[Any], cuda_available: bool) -> str:
    """The device a worker trains on, ``cuda`` or ``cpu``, from what it was given; refuses a mismatch.

    Args:
        use_gpu: ``scaling.use_gpu`` as resolved for the run (``auto`` already decided by the driver).
        gpu_ids: the GPUs Ray assigned this worker (``ray.get_gpu_ids()``).
        cuda_available: ``torch.cuda.is_available()`` in the worker.

    Returns:
        ``cuda`` when GPUs were asked for, assigned and usable; ``cpu`` when none were asked for,
        even where CUDA devices are visible (they belong to whoever reserved them).

    Raises:
        DeviceMismatchError: GPUs asked for but none assigned or none usable by torch, or none asked
            for but some assigned (the worker would hold GPUs it does not use).
    """
    ids = [str(i) for i in gpu_ids]
    if use_gpu and not ids:
        raise DeviceMismatchError(
            "scaling.use_gpu is true but Ray assigned this worker no GPU: check that the cluster's nodes "
            "declare their GPUs (ray start --num-gpus) and that scaling.gpus_per_worker is > 0"
        )
    if use_gpu and not cuda_available:
        raise DeviceMismatchError(
            f"scaling.use_gpu is true and Ray assigned this worker GPU {', '.join(ids)}, but torch sees no "
            "CUDA device (torch.cuda.is_available() is False: a CPU build of torch, a missing driver, or "
            "GPUs declared to Ray that this node does not have); fix the node, or set scaling.use_gpu: false"
        )
    if not use_gpu and ids:
        raise DeviceMismatchError(
            f"scaling.use_gpu is false but Ray assigned this worker GPU {', '.join(ids)}: it would hold "
            "GPUs it does not train on; set scaling.use_gpu: true, or reserve no GPU for the workers"
        )
    return "cuda" if use_gpu else "cpu"


def amp_dtype(spec: Spec, device_type: str) -> torch.dtype | None:
    """``train.amp`` on ``device_type``: the autocast dtype, or None for full precision.

    ``auto`` is fp16 on a GPU and off elsewhere; ``true`` is torch's autocast default (fp16 on a GPU,
    bf16 on CPU). Refused (:class:`~workers.spec.SpecError` on ``train.amp``): fp16 on CPU, whose
    convolutions run hundreds of times slower than float32, and bf16 on a GPU without bf16.
    """
    import torch

    from workers.spec import SpecError

    amp = spec.train.amp
    if amp is False or amp == "off" or (amp == "auto" and device_type != "cuda"):
        return None
    if amp == "bf16":
        if device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise SpecError([("train.amp", "bf16: this GPU has no bfloat16 support; use fp16")])
        return torch.bfloat16
    if amp == "fp16" or device_type == "cuda":
        if device_type != "cuda":
            raise SpecError(
                [("train.amp", f"fp16 on {device_type} is far slower than float32; use bf16 or off")]
            )
        return torch.float16
    return torch.bfloat16


def use_amp(spec: Spec, device_type: str) -> bool:
    """``train.amp``: whether ``device_type`` trains in mixed precision (see :func:`amp_dtype`)."""
    return amp_dtype(spec, device_type) is not None


def grad_scaler(device_type: str, dtype: torch.dtype | None) -> Any:
    """A ``torch.amp.GradScaler``, enabled for fp16 only: bf16 has float32's range, so its gradients
    need no scaling."""
    import torch

    return torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)


# --------------------------------------------------------------------------- data


def dataset_config(spec: Spec) -> dict[str, Any]:
    """The ``harmonic.data.build_dataset`` config of a spec's dataset (the synthetic set is generated
    there on first use)."""
    return spec.dataset.build_config()


class Datasets(NamedTuple):
    """A spec's splits: ``train`` with the training transforms, ``val`` and the held-out ``test``
    (None when the dataset has none) with the evaluation transforms."""

    train: Any
    val: Any
    test: Any | None

    @property
    def num_classes(self) -> int:
        """Foreground classes."""
        return int(self.train.num_classes)


def train_dataset(spec: Spec, *, augment: str | None = None) -> Any:
    """The training split with the detector's training transforms (``augment``: default ``train.augment``)."""
    from harmonic.data import build_dataset
    from harmonic.data.transforms import build_transforms

    det = spec.detector
    return build_dataset(
        dataset_config(spec),
        "train",
        transforms=build_transforms(det.arch, det.image_size, True, augment=augment or spec.train.augment),
        skip_bad=spec.dataset.skip_bad,
    )


def eval_dataset(spec: Spec, split: str) -> Any:
    """``split`` (``val`` or ``test``) with the detector's evaluation transforms."""
    from harmonic.data import build_dataset
    from harmonic.data.transforms import build_transforms

    det = spec.detector
    return build_dataset(
        dataset_config(spec),
        split,  # type: ignore[arg-type]
        transforms=build_transforms(det.arch, det.image_size, False),
        skip_bad=spec.dataset.skip_bad,
    )


def build_datasets(spec: Spec) -> Datasets:
    """Train, val and (when the dataset has one) test, built in that order."""
    train = train_dataset(spec)
    val = eval_dataset(spec, "val")
    test = eval_dataset(spec, "test") if spec.dataset.has_test() else None
    return Datasets(train, val, test)


class Loading(NamedTuple):
    """How a worker's loaders feed its device (:func:`loading`)."""

    #: DataLoader processes assembling the batches (0: the training process itself); with any, they
    #: are persistent: started once per loader, not once per epoch.
    data_workers: int
    #: batches in page-locked memory, so that their copies to the GPU (``non_blocking``) overlap the step.
    pin_memory: bool


def gpu_data_workers(cpus_per_worker: float) -> int:
    """``train.data_workers: auto`` on a GPU: every CPU the worker reserves but the training
    process's own, and at least one, so that batches are assembled while the GPU computes."""
    return max(1, math.ceil(cpus_per_worker) - 1)


def loading(spec: Spec, device_type: str) -> Loading:
    """The data loading of ``spec`` on ``device_type`` (``cuda`` or ``cpu``).

    ``train.data_workers: auto`` is :func:`gpu_data_workers` on a GPU and 0 on a CPU, where a loader
    process would take cores from the training itself (and the seeded CPU trajectory stays that of
    loading in-process); a number is taken as given. Memory is pinned on a GPU only.
    """
    workers = spec.train.data_workers
    if workers == "auto":
        workers = gpu_data_workers(spec.scaling.cpus_per_worker) if device_type == "cuda" else 0
    return Loading(int(workers), device_type == "cuda")


class TrainLoader(NamedTuple):
    """A training shard's loader, its ``DistributedSampler`` (``set_epoch`` it every epoch) and its
    number of batches per epoch."""

    loader: Any
    sampler: Any
    iters_per_epoch: int


def train_loader(
    ds: Any,
    *,
    batch_size: int,
    aspect_ratio_groups: int,
    seed: int,
    data_workers: int = 0,
    rank: int = 0,
    world: int = 1,
    pin_memory: bool = False,
    resample: str = "none",
    resample_fraction: float = 1.0,
) -> TrainLoader:
    """Shard ``rank`` of ``world`` of ``ds``, shuffled by a ``DistributedSampler`` (seeded), in batches
    of one aspect-ratio group each (torchvision's reference recipe; ``aspect_ratio_groups=0``: plain
    batches); the last incomplete batch is dropped. ``resample``: the seed's draw of the images
    (:func:`harmonic.data.sampler.resample_indices`). ``data_workers`` and ``pin_memory``: see
    :class:`Loading`; build the loader once per training, its worker processes persist across epochs
    (``sampler.set_epoch`` still reshuffles: the batches are drawn in this process)."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    from harmonic.data.sampler import (
        GroupedBatchSampler,
        collate_fn,
        create_aspect_ratio_groups,
        resample_indices,
    )

    ratios = ds.aspect_ratios() if aspect_ratio_groups > 0 else None
    if resample != "none":
        drawn = resample_indices(len(ds), resample, resample_fraction, seed)
        ds = Subset(ds, drawn)
        ratios = [ratios[i] for i in drawn] if ratios is not None else None
    sampler: DistributedSampler[Any] = DistributedSampler(
        ds, num_replicas=world, rank=rank, shuffle=True, seed=seed
    )
    if ratios is not None:
        group_ids = create_aspect_ratio_groups(ratios, k=aspect_ratio_groups)
        batch_sampler: Any = GroupedBatchSampler(sampler, group_ids, batch_size)
    else:
        batch_sampler = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=True)
    loader = DataLoader(
        ds,
        batch_sampler=batch_sampler,
        num_workers=data_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        persistent_workers=data_workers > 0,
    )
    return TrainLoader(loader, sampler, len(batch_sampler))


def eval_loader(
    ds: Any,
    *,
    batch_size: int,
    data_workers: int = 0,
    rank: int = 0,
    world: int = 1,
    pin_memory: bool = False,
    persistent: bool = True,
) -> Any:
    """Every ``world``-th image of ``ds`` from ``rank`` on, in order (each rank evaluates its share).
    ``data_workers``, ``pin_memory``: see :class:`Loading`; ``persistent``: keep the loader's processes
    between passes (for a loader used every epoch, not for one used once)."""
    from torch.utils.data import DataLoader, Subset

    from harmonic.data.sampler import collate_fn

    return DataLoader(
        Subset(ds, list(range(rank, len(ds), world))), batch_size=batch_size, shuffle=False,
        num_workers=data_workers, collate_fn=collate_fn, pin_memory=pin_memory,
        persistent_workers=persistent and data_workers > 0,
    )  # fmt: skip


# --------------------------------------------------------------------------- model


def build_model(spec: Spec, num_classes: int) -> Any:
    """The spec's detector for ``num_classes`` foreground classes: loss, backbone (pretrained body if
    given), image size and evaluation protocol, then ``detector.init_from`` loaded strictly."""
    from harmonic.detectors import build_detector
    from workers.training.weights import load_init_from

    d = spec.detector
    model = build_detector(
        d.arch,
        num_classes + 1,
        loss=spec.loss_config(),
        backbone=d.backbone,
        image_size=d.image_size,
        pretrained_backbone=d.pretrained_backbone,
        eval_protocol=spec.eval.to_protocol(),
        anchor_scale=d.anchor_scale,
    )
    load_init_from(model, spec)
    return model


# --------------------------------------------------------------------------- optimizer and schedule


def make_optimizer(model: Any, spec: Spec) -> Any:
    """The spec's optimizer (``train.optimizer``: SGD with momentum, or AdamW) over the trainable parameters."""
    import torch

    t = spec.train
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


class WarmupDecay:
    """LR multiplier per iteration: linear warm-up, then multi-step or cosine decay (picklable).

    Its attributes are what ``LambdaLR.state_dict()`` saves in a checkpoint: keep their names.
    """

    def __init__(self, spec: Spec, iters_per_epoch: int):
        t = spec.train
        self.iters_per_epoch = max(1, iters_per_epoch)
        self.total = self.iters_per_epoch * t.epochs
        self.warmup_iters = min(t.warmup.iters, self.total)
        self.warmup_factor = t.warmup.factor
        self.schedule = t.schedule
        self.steps = t.resolved_lr_steps()
        self.gamma = t.lr_gamma

    def __call__(self, it: int) -> float:
        f = 1.0
        if it < self.warmup_iters:
            a = it / self.warmup_iters
            f = self.warmup_factor * (1 - a) + a
        if self.schedule == "multistep":
            f *= self.gamma ** bisect.bisect_right(self.steps, it // self.iters_per_epoch)
        elif self.schedule == "cosine":
            f *= 0.5 * (1 + math.cos(math.pi * min(it, self.total) / self.total))
        return f


def make_scheduler(optimizer: Any, spec: Spec, iters_per_epoch: int) -> Any:
    """The spec's LR schedule (:class:`WarmupDecay`), stepped once per training step."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(spec, iters_per_epoch))
