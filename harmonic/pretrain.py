"""Pretraining a detector's backbone body on generated images: this project's stand-in for ImageNet.

The paper fine-tunes every detector from an ImageNet-pretrained backbone; no weights can be
downloaded here, and from scratch the losses cannot be compared (the baseline stays at a few AP
points). :func:`pretrain_body` trains the *body* of a detector's backbone (the ResNet, MobileNetV3 or
VGG16 that the FPN / SSD extractor wraps) on a generated set that is disjoint from the benchmark's
(another generator seed; ``workers.spec`` refuses the benchmark's own seed or root), and returns its
``state_dict`` in torchvision's naming, which :func:`harmonic.detectors.backbones.load_pretrained`
loads like an ImageNet file.

The task: semantic segmentation plus image-level classes (``segment``, the default)
    Which shape class every pixel shows (an FCN head: a 1x1 convolution on each of the body's last
    three resolutions, upsampled and summed, softmax cross-entropy with the background as class 0),
    plus which classes the image holds (a linear head on the globally pooled last feature map, BCE).
    Like ImageNet it involves neither boxes nor any detection loss, so it is neutral between the
    losses a benchmark compares: both arms start from the same features, which neither arm's loss
    has shaped. The masks come with the generated set (its instance polygons).

    Why not image-level classification alone (``classify``, still available): from scratch it does not
    get off the ground in a CPU budget. A MobileNetV3 (SSDlite) body trained for 6 epochs on 2,000
    generated 96 px images stayed at chance (BCE 0.692, validation mAP 0.53 = the class prevalence),
    and so did the same recipe on easier images (up to 3 objects); fine-tuning SSDlite from that body
    gave what scratch gives (AP 0.0-0.1 after 3 epochs). The per-pixel labels give every image
    thousands of targets instead of five: the same body on the same images reached validation mIoU
    0.23 in 6 epochs, 0.64 in 10 epochs of 3,000 images, and image-level mAP 0.97 along the way.

    Why not detection pretraining (the detector trained with the standard loss on the disjoint set,
    its body kept): it would shape the body with the baseline arm's own loss, a bias towards the
    baseline, and it was not needed: the segmentation body took SSDlite fine-tuning (standard loss,
    70 CPU seconds) from AP 0.1 (scratch) to 23.6 at 96 px and 29.2 at 128 px (README, "Pretraining").

Normalisation and initialisation
    The body is built exactly as the detector builds it from scratch (GroupNorm in place of
    BatchNorm, MobileNetV3's reduced tail for SSDlite, VGG16 with a GroupNorm after every
    convolution), so the file fits the detector built from it. The images are normalised with the
    detector's own mean and std, so the body sees the inputs it will see when fine-tuned.

Nothing here imports Ray or MLflow: :mod:`workers.pretrain` caches the result and tracks it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harmonic.step import optimizer_step

TASKS: tuple[str, ...] = ("classify", "segment")

__all__ = [
    "TASKS",
    "PretrainConfig",
    "PretrainNet",
    "PretrainResult",
    "body_name",
    "build_classifier",
    "head_prefix",
    "multilabel_average_precision",
    "pretrain_body",
]


@dataclass(frozen=True)
class PretrainConfig:
    """The recipe of a pretraining (``pretrain`` section of a spec; see :mod:`workers.spec`).

    Attributes:
        task: ``classify`` (image-level multi-label) or ``segment`` (the same plus per-pixel
            classes); see the module docstring.
        epochs: passes over the training images.
        batch_size: images per step.
        lr: AdamW peak learning rate (linear warm-up over the first 5% of the steps, cosine decay).
        weight_decay: AdamW weight decay.
        seed: torch seed of the head's initialisation and of the data order.
    """

    task: str = "segment"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


@dataclass
class PretrainResult:
    """What :func:`pretrain_body` returns.

    Attributes:
        state_dict: the body's weights in torchvision's naming, without the classification head.
        history: one dict per epoch (``epoch``, ``train_loss``, ``val_loss``, ``val_map``,
            ``val_acc``, ``lr``, ``seconds``).
        body: the body's name (:func:`body_name`).
        norm: ``"group"``: the normalisation the body was trained with.
    """

    state_dict: dict[str, Tensor]
    history: list[dict[str, float]] = field(default_factory=list)
    body: str = ""
    norm: str = "group"


def body_name(arch: str, backbone: str | None) -> str:
    """The classification network a detector's backbone is built from.

    ``resnet18`` ... ``resnext101_32x8d`` for the ``*_fpn`` backbones and the plain ResNets of DSSD and
    RefineDet (``resnet18`` ... ``resnet101``: the same network; DSSD's conv5_x dilation changes no
    weight), ``mobilenet_v3_large`` (FPN detectors), ``mobilenet_v3_large_reduced`` (SSDlite:
    MobileNetV3's reduced tail, as torchvision's SSDlite builds it without ImageNet weights),
    ``vgg16`` (SSD, RefineDet).
    """
    from harmonic.catalog import PLAIN_RESNETS
    from harmonic.detectors.backbones import RESNETS
    from harmonic.detectors.factory import default_backbone, valid_backbones

    name = default_backbone(arch) if backbone is None else backbone
    if name not in valid_backbones(arch):
        raise ValueError(
            f"backbone: {name!r} cannot be used with {arch}; valid: {', '.join(valid_backbones(arch))}"
        )
    if arch == "ssdlite":
        return "mobilenet_v3_large_reduced"
    if name == "mobilenet_v3":
        return "mobilenet_v3_large"
    if name == "vgg16" or name in PLAIN_RESNETS:
        return name
    return RESNETS[name]


def head_prefix(body: str) -> str:
    """The state-dict prefix of the classification head (left out of the saved file)."""
    return "fc." if body.startswith(("resnet", "resnext")) else "classifier."


class _VGG16Classifier(nn.Module):
    """VGG16's convolutional part (as SSD builds it from scratch) with a linear head."""

    def __init__(self, num_classes: int) -> None:
        from harmonic.detectors.backbones import vgg16_features

        super().__init__()
        self.features = vgg16_features(None)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def build_classifier(body: str, num_classes: int) -> nn.Module:
    """``body`` (a :func:`body_name`) built with GroupNorm, with a linear head of ``num_classes``
    outputs on its globally pooled last feature map, in torchvision's naming."""
    from torchvision.models import mobilenet_v3_large, resnet

    from harmonic.detectors.backbones import group_norm

    if body == "vgg16":
        return _VGG16Classifier(num_classes)
    if body.startswith("mobilenet_v3_large"):
        net = mobilenet_v3_large(weights=None, norm_layer=group_norm, reduced_tail=body.endswith("_reduced"))
        # a linear head straight on the pooled features (torchvision's has a hidden layer)
        net.classifier = nn.Linear(net.features[-1].out_channels, num_classes)  # type: ignore[assignment]
        return net
    net = getattr(resnet, body)(weights=None, norm_layer=group_norm)
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net


def multilabel_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of the average precision of ``scores[:, k]`` ranking ``labels[:, k]``.

    Classes without a positive are left out; NaN when no class has one.
    """
    aps = []
    for k in range(labels.shape[1]):
        y = labels[:, k] > 0
        if not y.any():
            continue
        order = np.argsort(-scores[:, k], kind="stable")
        hits = y[order]
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(float(precision[hits].mean()))
    return float(np.mean(aps)) if aps else float("nan")


class _Items(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """``dataset[i]`` as (image at ``size`` px, multi-hot labels [K], semantic map with 0 = background)."""

    def __init__(self, dataset: Any, size: int, num_classes: int) -> None:
        self.dataset, self.size, self.num_classes = dataset, size, num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        image, target = self.dataset[i]
        semantic = torch.zeros(image.shape[-2:], dtype=torch.int64)
        for mask, label in zip(target.get("masks", ()), target["labels"]):
            semantic[mask.bool()] = int(label)
        size = self.size
        if tuple(image.shape[-2:]) != (size, size):
            image = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)[0]
            semantic = F.interpolate(semantic[None, None].float(), size=(size, size), mode="nearest")[0, 0]
        y = torch.zeros(self.num_classes)
        y[target["labels"] - 1] = 1.0
        return image, y, semantic.long()


def _batches(
    dataset: Any,
    indices: Sequence[int],
    batch_size: int,
    size: int,
    num_classes: int,
    *,
    workers: int = 0,
    seed: int = 0,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(images, multi-hot labels [B, K], semantic maps [B, size, size] with 0 = background) of
    ``indices`` in that order; ``workers`` > 0 assembles them in that many loader processes (their
    random transforms then draw from generators seeded by ``seed``)."""
    items = _Items(dataset, size, num_classes)
    if workers > 0:
        loader = torch.utils.data.DataLoader(
            items, batch_size=batch_size, sampler=list(indices), num_workers=workers,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        yield from loader
        return
    order = list(indices)
    for start in range(0, len(order), batch_size):
        images, labels, maps = zip(*(items[i] for i in order[start : start + batch_size]))
        yield torch.stack(images), torch.stack(labels), torch.stack(maps)


def _stages(net: nn.Module) -> list[nn.Module]:
    """The body's modules in the order a forward pass applies them (up to the pooled head)."""
    if hasattr(net, "layer4"):  # ResNet / ResNeXt
        return [
            getattr(net, n)
            for n in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        ]
    return list(net.features)  # type: ignore[arg-type]


class PretrainNet(nn.Module):
    """A body with the heads of the pretraining tasks.

    ``classify``: a linear layer on the globally pooled last feature map (the body's own head slot,
    ``fc`` / ``classifier``). ``segment``: a 1x1 convolution to K + 1 logits on each of the last three
    resolutions (strides 8, 16, 32), upsampled and summed (FCN-8s), per-pixel softmax cross-entropy
    against the semantic map (0 = background). The body is ``self.body``, in torchvision's naming.
    """

    def __init__(self, body: str, num_classes: int, task: str) -> None:
        super().__init__()
        self.task = task
        self.body = build_classifier(body, num_classes)
        self.stages = _stages(self.body)
        with torch.no_grad():
            channels = [f.shape[1] for f in self._pyramid(torch.zeros(1, 3, 64, 64))[0]]
        self.seg = nn.ModuleList(nn.Conv2d(c, num_classes + 1, 1) for c in channels)

    def _pyramid(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        last: dict[tuple[int, ...], Tensor] = {}
        for m in self.stages:
            x = m(x)
            last[tuple(x.shape[-2:])] = x
        return list(last.values())[-3:], x

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Image-level logits [B, K] and, for ``segment``, per-pixel logits [B, K + 1, H, W]."""
        pyramid, top = self._pyramid(x)
        head: nn.Module = self.body.fc if hasattr(self.body, "fc") else self.body.classifier  # type: ignore[assignment]
        logits = head(torch.flatten(F.adaptive_avg_pool2d(top, 1), 1))
        if self.task != "segment":
            return logits, None
        size = pyramid[0].shape[-2:]
        dense = sum(
            F.interpolate(conv(f), size=size, mode="bilinear", align_corners=False)
            for conv, f in zip(self.seg, pyramid)
        )
        assert isinstance(dense, Tensor)
        return logits, F.interpolate(dense, size=x.shape[-2:], mode="bilinear", align_corners=False)


def pretrain_body(
    body: str,
    train_ds: Any,
    val_ds: Any,
    config: PretrainConfig,
    *,
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    device: str | torch.device = "cpu",
    data_workers: int = 0,
) -> PretrainResult:
    """Train ``body`` on the multi-label task of the module docstring.

    Args:
        body: a :func:`body_name`.
        train_ds, val_ds: detection datasets (``(image, target)`` with ``target["labels"]`` in
            1..K and a ``num_classes`` attribute K), training transforms on ``train_ds``.
        config: the recipe.
        image_size: side of the square inputs (images of another size are resized).
        image_mean, image_std: the detector's input normalisation.
        on_epoch: called with each epoch's metrics (e.g. to log them).
        device: where the network trains (the batches are assembled on the CPU, then moved).
        data_workers: processes that assemble the training batches (0: this one). With more, the
            random flips draw from other generators: the result differs as another seed would.

    Returns:
        The body's weights without the head, and the per-epoch metrics.
    """
    if config.task not in TASKS:
        raise ValueError(f"task: {config.task!r} is not one of {', '.join(TASKS)}")
    num_classes = int(train_ds.num_classes)
    torch.manual_seed(config.seed)
    net = PretrainNet(body, num_classes, config.task).to(device)
    mean = torch.tensor(list(image_mean), device=device).view(1, 3, 1, 1)
    std = torch.tensor(list(image_std), device=device).view(1, 3, 1, 1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_ds) / config.batch_size))
    total = steps_per_epoch * config.epochs
    warmup = max(1, total // 20)

    def factor(it: int) -> float:
        ramp = min(1.0, (it + 1) / warmup)
        return ramp * 0.5 * (1 + math.cos(math.pi * min(it, total) / total))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        net.train()
        order = torch.randperm(len(train_ds), generator=generator).tolist()
        losses = []
        lr = optimizer.param_groups[0]["lr"]
        batches = _batches(
            train_ds, order, config.batch_size, image_size, num_classes,
            workers=data_workers, seed=config.seed + epoch,
        )  # fmt: skip
        for images, labels, maps in batches:
            images, labels, maps = images.to(device), labels.to(device), maps.to(device)
            logits, dense = net((images - mean) / std)
            loss = F.binary_cross_entropy_with_logits(logits, labels)
            if dense is not None:
                loss = loss + F.cross_entropy(dense, maps)
            optimizer_step(loss, optimizer, scheduler=scheduler)
            losses.append(float(loss.detach()))
        metrics = {"epoch": float(epoch), "train_loss": float(np.mean(losses)), "lr": float(lr)}
        metrics.update(_validate(net, val_ds, config.batch_size, image_size, num_classes, mean, std))
        metrics["seconds"] = time.perf_counter() - t0
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics)
    prefix = head_prefix(body)
    state = {
        k: v.detach().cpu().clone() for k, v in net.body.state_dict().items() if not k.startswith(prefix)
    }
    return PretrainResult(state, history, body, "group")


def _validate(
    net: PretrainNet, val_ds: Any, batch_size: int, size: int, num_classes: int, mean: Tensor, std: Tensor
) -> dict[str, float]:
    net.eval()
    scores, labels, losses = [], [], []
    inter = np.zeros(num_classes + 1)
    union = np.zeros(num_classes + 1)
    with torch.no_grad():
        for images, y, maps in _batches(val_ds, range(len(val_ds)), batch_size, size, num_classes):
            logits, dense = net((images.to(mean.device) - mean) / std)
            logits = logits.float().cpu()
            losses.append(float(F.binary_cross_entropy_with_logits(logits, y, reduction="sum")))
            scores.append(torch.sigmoid(logits).numpy())
            labels.append(y.numpy())
            if dense is not None:
                pred = dense.argmax(1).cpu()
                for k in range(num_classes + 1):
                    inter[k] += float(((pred == k) & (maps == k)).sum())
                    union[k] += float(((pred == k) | (maps == k)).sum())
    s, y_all = np.concatenate(scores), np.concatenate(labels)
    out = {
        "val_loss": float(sum(losses) / y_all.size),
        "val_map": multilabel_average_precision(s, y_all),
        "val_acc": float(((s > 0.5) == (y_all > 0)).mean()),
    }
    if net.task == "segment":
        seen = union[1:] > 0
        out["val_miou"] = float((inter[1:][seen] / union[1:][seen]).mean()) if seen.any() else float("nan")
    return out
