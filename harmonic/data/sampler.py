"""Aspect-ratio grouped batching that works over any sampler, a DistributedSampler included.

Batches of images with similar aspect ratios waste less padding. Grouping must not break DDP:
every rank has to run the same number of steps, or the ranks that finish first leave the others
waiting in an all-reduce forever. :class:`GroupedBatchSampler` therefore yields exactly
``ceil(len(sampler) / batch_size)`` batches, a number that depends only on the length of the
sampler underneath; ``DistributedSampler`` gives every rank the same length (it pads the
index list to a multiple of the world size), so every rank yields the same number of batches.
Batches are filled from one group; when the sampler is exhausted, the leftover partial groups
(largest first) are completed with repeated indices of the same group, as many as needed to reach
that count. The indices of the remaining (smaller) partial groups, at most
``(num_groups - 1) * (batch_size - 1)`` per rank, sit this epoch out; with a shuffling sampler
they are different ones every epoch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches whose indices all share a group id (e.g. an aspect-ratio bin).

    Args:
        sampler: yields dataset indices (``RandomSampler``, ``DistributedSampler``, ...).
        group_ids: the group of every dataset index.
        batch_size: indices per batch.

    ``set_epoch`` is forwarded to the sampler underneath, so a DistributedSampler reshuffles.
    """

    def __init__(self, sampler: Sampler[int], group_ids: Sequence[int], batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"GroupedBatchSampler: batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = defaultdict(list)
        seen: dict[int, list[int]] = defaultdict(list)
        produced = 0
        for idx in self.sampler:
            g = self.group_ids[idx]
            buffers[g].append(idx)
            seen[g].append(idx)
            if len(buffers[g]) == self.batch_size:
                yield buffers.pop(g)
                produced += 1
        remaining = len(self) - produced
        # each leftover buffer holds < batch_size indices, so there are at least `remaining` of them
        for g, buf in sorted(buffers.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            if remaining <= 0:
                break
            if not buf:
                continue
            pool = seen[g]
            k = 0
            while len(buf) < self.batch_size:
                buf.append(pool[k % len(pool)])
                k += 1
            yield buf
            remaining -= 1


#: how a seed draws its training images: all of them, a bootstrap sample, or a subsample.
RESAMPLE_METHODS = ("none", "bootstrap", "subsample")


def resample_indices(n: int, method: str, fraction: float, seed: int) -> list[int]:
    """The indices of the training images that the seed ``seed`` trains on.

    A seed that varies only the initialisation, the data order and the augmentation leaves out
    the variation of the benchmark's own sample; Bouthillier et al. ("Accounting for Variance in
    Machine Learning Benchmarks", MLSys 2021) found that resampling the training set per seed is
    needed for estimates that generalise. ``bootstrap``: ``round(fraction * n)`` draws with
    replacement; ``subsample``: ``round(fraction * n)`` distinct images; ``none``: every image.
    The draw depends on ``seed`` alone, so both arms of a seed train on the same images, and it
    is drawn from a stream of its own (not the one that initialises or shuffles).

    Raises:
        ValueError: an unknown method, a fraction outside (0, 1], or a draw of no image.
    """
    if method not in RESAMPLE_METHODS:
        raise ValueError(f"resample: {method!r} is not one of {', '.join(RESAMPLE_METHODS)}")
    if not 0 < fraction <= 1:
        raise ValueError(f"resample_fraction: {fraction} is not in (0, 1]")
    if method == "none":
        return list(range(n))
    k = round(fraction * n)
    if k < 1:
        raise ValueError(f"resample_fraction {fraction} of {n} images draws none")
    rng = np.random.default_rng([seed, 0x5EED])
    if method == "bootstrap":
        return sorted(rng.integers(0, n, size=k).tolist())
    return sorted(rng.choice(n, size=k, replace=False).tolist())


def create_aspect_ratio_groups(aspect_ratios: Sequence[float], k: int = 3) -> list[int]:
    """Bin width/height ratios into ``2k + 2`` groups with edges ``2 ** linspace(-1, 1, 2k + 1)``
    (torchvision's reference binning; ``k=0``: portrait vs landscape).

    Args:
        aspect_ratios: width / height of every dataset item (``dataset.aspect_ratios()``).
        k: bins per side of 1.

    Returns:
        The group id of every item.
    """
    bins = (2.0 ** np.linspace(-1, 1, 2 * k + 1)) if k > 0 else np.array([1.0])
    return np.searchsorted(bins, np.asarray(aspect_ratios, dtype=np.float64), side="right").tolist()


def collate_fn(batch: Sequence[Any]) -> tuple[Any, ...]:
    """``[(image, target), ...] -> ((images...), (targets...))``: detectors take lists, not stacks."""
    return tuple(zip(*batch))
