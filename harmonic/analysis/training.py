"""Training-time consistency curves from the per-positive diagnostics (paper Fig. 3a and 4).

The detector adapters' ``pop_diagnostics()`` return, per step, the score p, IoU and harmonic
factors ``beta_r = exp(-L_loc)`` and ``beta_c`` (p, Eq. 5) of every positive sample, and
``dl_dp``, the gradient of its loss w.r.t. p: where it is positive, the loss pushes that
positive's score down (Eq. 7), which is what explains a Harmonic-loss result.
:class:`TrainingDiagnostics` folds them into running sums, so an epoch of any length costs a
few numbers of memory (plus an optional bounded sample for scatter plots).

On a GPU, reading a step's diagnostics makes the host wait for that step. A training loop keeps
them on the device instead and hands several steps at once to
:meth:`TrainingDiagnostics.update_steps`: one copy to the host, then the same arithmetic as
:meth:`~TrainingDiagnostics.update` step by step, so the sums are those of reading every step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

__all__ = ["IOU_BINS", "TrainingDiagnostics"]

IOU_BINS = 10  # histogram bins over [0, 1] (paper Fig. 3a)
_FIELDS = ("score", "iou", "beta_r", "beta_c")


def _as_numpy(x: Any) -> NDArray[np.float64]:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _to_host(values: Sequence[Any]) -> list[NDArray[np.float64]]:
    """Each of ``values`` as a flat float64 array, the tensors among them copied in one transfer."""
    tensors = [v.detach().reshape(-1) for v in values if isinstance(v, torch.Tensor)]
    flat = _as_numpy(torch.cat(tensors)) if tensors else np.zeros(0)
    # float32 and float16 widen to float64 exactly: the same numbers as _as_numpy of each tensor.
    parts = iter(np.split(flat, np.cumsum([t.numel() for t in tensors])[:-1]) if tensors else [])
    return [next(parts) if isinstance(v, torch.Tensor) else _as_numpy(v) for v in values]


class TrainingDiagnostics:
    """Accumulates per-positive diagnostics over an epoch.

    Memory is bounded: running sums, a 10-bin IoU histogram and, when ``sample_size > 0``, a
    uniform reservoir sample of at most ``sample_size`` (score, IoU) pairs for density plots.

    Several data-parallel ranks combine exactly: each rank's :meth:`epoch_summary` carries its
    sums (``n_pos``, ``sum_abs_gap``, ``sum_one_plus_beta_r``, ``sum_one_plus_beta_c``,
    ``iou_hist``), so after gathering them, ``TrainingDiagnostics.combine(summaries)`` (or
    ``acc.merge(summary)`` for each) gives the same numbers as one process that saw all
    positives. The reservoir samples are concatenated and cut to ``sample_size``.

    Args:
        sample_size: size of the (score, IoU) reservoir; 0 keeps none.
        seed: seed of the reservoir's random choices (deterministic runs).
    """

    def __init__(self, sample_size: int = 0, seed: int = 0) -> None:
        if sample_size < 0:
            raise ValueError(f"sample_size must be >= 0, got {sample_size}")
        self.sample_size = sample_size
        self._rng = np.random.default_rng(seed)
        self.reset()

    def reset(self) -> None:
        """Start a new epoch."""
        self.n_pos = 0
        self.sum_abs_gap = 0.0
        self.sum_one_plus_beta_r = 0.0
        self.sum_one_plus_beta_c = 0.0
        self.sum_score = 0.0
        self.n_pushed = 0
        self.sum_score_pushed = 0.0
        self.iou_hist = np.zeros(IOU_BINS, dtype=np.int64)
        self._seen = 0  # samples offered to the reservoir
        self._sample = np.zeros((0, 2), dtype=np.float64)

    def update(self, diag: Mapping[str, Any]) -> None:
        """Add one step's diagnostics: 1-D ``score``, ``iou``, ``beta_r``, ``beta_c`` (and optionally
        ``dl_dp``) of equal length.

        Raises:
            ValueError: a field is missing or the lengths differ.
        """
        missing = [k for k in _FIELDS if k not in diag]
        if missing:
            raise ValueError(f"diagnostics lack {missing} (need {list(_FIELDS)})")
        score, iou, br, bc = (_as_numpy(diag[k]) for k in _FIELDS)
        if not (len(score) == len(iou) == len(br) == len(bc)):
            raise ValueError(
                f"diagnostics differ in length: score {len(score)}, iou {len(iou)}, beta_r {len(br)}, beta_c {len(bc)}"
            )
        n = len(score)
        if n == 0:
            return
        self.n_pos += n
        self.sum_abs_gap += float(np.abs(score - iou).sum())
        self.sum_one_plus_beta_r += float((1.0 + br).sum())
        self.sum_one_plus_beta_c += float((1.0 + bc).sum())
        self.sum_score += float(score.sum())
        if "dl_dp" in diag:
            pushed = _as_numpy(diag["dl_dp"]) > 0
            if len(pushed) != n:
                raise ValueError(f"diagnostics differ in length: score {n}, dl_dp {len(pushed)}")
            self.n_pushed += int(pushed.sum())
            self.sum_score_pushed += float(score[pushed].sum())
        self.iou_hist += np.histogram(np.clip(iou, 0.0, 1.0), bins=IOU_BINS, range=(0.0, 1.0))[0]
        if self.sample_size:
            self._offer(np.stack([score, iou], axis=1))

    def update_steps(self, steps: Sequence[Mapping[str, Any]]) -> None:
        """Add several steps' diagnostics, in order: the same sums, histogram and sample as
        :meth:`update` of each, but the device tensors among them are copied to the host at once
        (one wait for the device instead of one per step).

        Raises:
            ValueError: as :meth:`update`, for the first step that has a field missing or lengths
                that differ.
        """
        keyed = [(i, k) for i, d in enumerate(steps) for k in d]
        host = _to_host([steps[i][k] for i, k in keyed])
        per_step: list[dict[str, Any]] = [{} for _ in steps]
        for (i, k), arr in zip(keyed, host, strict=True):
            per_step[i][k] = arr
        for d in per_step:
            if d:
                self.update(d)

    def _offer(self, pairs: NDArray[np.float64]) -> None:
        # Reservoir sampling (Algorithm R), vectorised per batch: item number s (0-based) replaces
        # a random slot with probability sample_size / (s + 1).
        room = self.sample_size - len(self._sample)
        if room > 0:
            self._sample = np.concatenate([self._sample, pairs[:room]])
            self._seen += min(room, len(pairs))
            pairs = pairs[room:]
        if len(pairs) == 0:
            return
        seen = self._seen + np.arange(len(pairs))
        slot = (self._rng.random(len(pairs)) * (seen + 1)).astype(np.int64)
        hit = slot < self.sample_size
        # Later items of the batch win a slot they share, as in the sequential algorithm.
        self._sample[slot[hit]] = pairs[hit]
        self._seen += len(pairs)

    @property
    def sample(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """The reservoir's ``(scores, ious)``."""
        return self._sample[:, 0].copy(), self._sample[:, 1].copy()

    def epoch_summary(self) -> dict[str, Any]:
        """This epoch's numbers.

        Returns:
            ``aic`` (mean |score - IoU|), ``mean_one_plus_beta_r``, ``mean_one_plus_beta_c``,
            ``mean_score`` (mean p), ``pushed_down_share`` (share of positives with dL/dp > 0) and
            ``pushed_down_mean_score`` (their mean p; NaN when there are none) (NaN without
            positives), ``n_pos``, ``iou_hist`` (10 counts over [0, 1], list),
            the sums that :meth:`combine` needs, and ``sample`` (list of [score, IoU] pairs).
        """
        n = self.n_pos
        nan = float("nan")
        return {
            "aic": self.sum_abs_gap / n if n else nan,
            "mean_one_plus_beta_r": self.sum_one_plus_beta_r / n if n else nan,
            "mean_one_plus_beta_c": self.sum_one_plus_beta_c / n if n else nan,
            "mean_score": self.sum_score / n if n else nan,
            "pushed_down_share": self.n_pushed / n if n else nan,
            "pushed_down_mean_score": self.sum_score_pushed / self.n_pushed if self.n_pushed else nan,
            "n_pos": n,
            "iou_hist": self.iou_hist.tolist(),
            "sum_abs_gap": self.sum_abs_gap,
            "sum_one_plus_beta_r": self.sum_one_plus_beta_r,
            "sum_one_plus_beta_c": self.sum_one_plus_beta_c,
            "sum_score": self.sum_score,
            "n_pushed": self.n_pushed,
            "sum_score_pushed": self.sum_score_pushed,
            "sample": self._sample.tolist(),
        }

    def merge(self, summary: Mapping[str, Any]) -> None:
        """Fold another accumulator's :meth:`epoch_summary` (e.g. another rank's) into this one."""
        for k in ("n_pos", "sum_abs_gap", "sum_one_plus_beta_r", "sum_one_plus_beta_c", "iou_hist"):
            if k not in summary:
                raise ValueError(f"summary lacks {k!r}: pass the dict epoch_summary() returned")
        hist = np.asarray(summary["iou_hist"], dtype=np.int64)
        if hist.shape != (IOU_BINS,):
            raise ValueError(f"iou_hist must have {IOU_BINS} bins, got {hist.shape}")
        self.n_pos += int(summary["n_pos"])
        self.sum_abs_gap += float(summary["sum_abs_gap"])
        self.sum_one_plus_beta_r += float(summary["sum_one_plus_beta_r"])
        self.sum_one_plus_beta_c += float(summary["sum_one_plus_beta_c"])
        self.sum_score += float(summary.get("sum_score", 0.0))
        self.n_pushed += int(summary.get("n_pushed", 0))
        self.sum_score_pushed += float(summary.get("sum_score_pushed", 0.0))
        self.iou_hist += hist
        other = np.asarray(summary.get("sample", []), dtype=np.float64).reshape(-1, 2)
        if self.sample_size and len(other):
            # Keep the combined sample bounded; each part is already a uniform sample of its rank.
            both = np.concatenate([self._sample, other])
            if len(both) > self.sample_size:
                both = both[self._rng.choice(len(both), self.sample_size, replace=False)]
            self._sample = both
            self._seen += len(other)

    @classmethod
    def combine(cls, summaries: Iterable[Mapping[str, Any]], sample_size: int = 0) -> dict[str, Any]:
        """One summary from several ranks' :meth:`epoch_summary` dicts (exact for all sums)."""
        acc = cls(sample_size=sample_size)
        for s in summaries:
            acc.merge(s)
        return acc.epoch_summary()
