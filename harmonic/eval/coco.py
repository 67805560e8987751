"""COCO box AP, equal to pycocotools' ``COCOeval`` and an order of magnitude faster.

The numbers follow ``COCOeval(iouType="bbox")`` exactly, quirks included:

* detections are sorted by score (stable, so ties keep the results file's order) and only the
  ``max(max_dets)`` best of each (image, category) are evaluated; ``maxDets`` of the summary
  also counts per (image, category), not per image;
* ground truths with ``iscrowd`` are ignored, match any number of detections, and their IoU is
  ``intersection / detection area``;
* the ``area`` *field* of a ground truth (not its box) decides its area range, a detection's
  area is ``w * h``; unmatched detections outside the range are ignored;
* greedy matching at each IoU threshold: a detection takes the best free non-ignored ground
  truth with ``IoU >= t`` (the last one of equal IoU), only otherwise an ignored one;
* a match to a ground truth whose id is 0 counts as no match (pycocotools stores ids and tests
  them for truth); 101-point interpolated precision; -1 where a value is undefined (a category
  without ground truth in the area range, or a key whose threshold/range is not evaluated).

The one deliberate difference: a ground truth with ``"ignore": 1`` (VOC's *difficult*, as the
VOC loader's ``to_coco()`` writes it) is ignored the way VOC ignores difficult objects: it is
not a positive, a detection matched to it is neither a true nor a false positive, and it may
absorb any number of detections (VOC never counts a duplicate on a difficult object as a false
positive). pycocotools overwrites ``ignore`` with ``iscrowd``; without an ``ignore`` key the
two evaluators agree.

How it is fast: the per (image, category) Python loops of ``COCOeval`` become array
operations. IoUs are computed for all detections at once (one padded row of ground truths per
detection); the greedy matching walks the detection ranks (at most ``max(max_dets)`` steps) and
matches every (image, category) group, area range and IoU threshold of that rank in one go;
accumulation sorts the detections once and slices per category, area range and ``maxDet``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "COCO_AREA_RANGES",
    "COCO_IOU_THRESHOLDS",
    "COCO_MAX_DETS",
    "COCO_RECALL_THRESHOLDS",
    "STATS_KEYS",
    "EvalResult",
    "evaluate",
    "load_detections",
    "load_ground_truth",
]

# Built exactly as pycocotools builds them: np.arange drifts, and a threshold that differs in the
# last bit changes which IoUs pass.
COCO_IOU_THRESHOLDS: NDArray[np.float64] = np.linspace(
    0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True
)
COCO_RECALL_THRESHOLDS: NDArray[np.float64] = np.linspace(
    0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True
)
COCO_AREA_RANGES: dict[str, tuple[float, float]] = {
    "all": (0.0**2, 1e5**2),
    "small": (0.0**2, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, 1e5**2),
}
COCO_MAX_DETS: tuple[int, int, int] = (1, 10, 100)
STATS_KEYS: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip

GroundTruthLike = Any  # COCO-format dict | path | pycocotools.coco.COCO
DetectionsLike = Any  # list of COCO result dicts | path | numpy [N, 7] array


# --------------------------------------------------------------------------- loading


@dataclass
class GroundTruth:
    """Ground truth as arrays, annotations sorted by (image, category, file order).

    Attributes:
        img_ids: sorted unique image ids (the evaluation's image order).
        cat_ids: sorted unique category ids.
        cat_names: category name of each ``cat_ids`` entry.
        img: image position of each annotation (index into ``img_ids``).
        cat: category position of each annotation.
        box: ``[N, 4]`` boxes ``x, y, w, h`` (float64).
        area: the annotations' ``area`` field (``w * h`` where absent).
        crowd: ``iscrowd`` flag.
        ignore: crowd or VOC-difficult (``"ignore": 1``): never a positive.
        ann_id: annotation ids.
    """

    img_ids: NDArray[Any]
    cat_ids: NDArray[Any]
    cat_names: list[str]
    img: NDArray[np.int64]
    cat: NDArray[np.int64]
    box: NDArray[np.float64]
    area: NDArray[np.float64]
    crowd: NDArray[np.bool_]
    ignore: NDArray[np.bool_]
    ann_id: NDArray[np.int64]

    @property
    def key(self) -> NDArray[np.int64]:
        """Group key ``image * K + category`` of each annotation (sorted)."""
        return self.img * len(self.cat_ids) + self.cat


@dataclass
class Detections:
    """Detections as arrays, in the order of the results file.

    Attributes:
        img: image position (index into the ground truth's ``img_ids``).
        cat: category position (index into ``cat_ids``).
        box: ``[N, 4]`` boxes ``x, y, w, h``.
        score: confidence.
    """

    img: NDArray[np.int64]
    cat: NDArray[np.int64]
    box: NDArray[np.float64]
    score: NDArray[np.float64]


def _read_json(path: str | os.PathLike[str]) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {os.fspath(path)!r}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{os.fspath(path)!r} is not valid JSON: {e}") from None


def _positions(sorted_ids: NDArray[Any], ids: NDArray[Any]) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """Index of each of ``ids`` in ``sorted_ids`` and whether it is there at all."""
    if len(sorted_ids) == 0:
        return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
    pos = np.searchsorted(sorted_ids, ids).astype(np.int64)
    pos_c = np.minimum(pos, len(sorted_ids) - 1)
    return pos_c, sorted_ids[pos_c] == ids


def load_ground_truth(gt: GroundTruthLike) -> GroundTruth:
    """Read ground truth given as a COCO-format dict, a JSON path or a pycocotools ``COCO``.

    Annotations of images or categories the file does not list are dropped, as pycocotools'
    ``getAnnIds(imgIds, catIds)`` drops them.

    Raises:
        ValueError: the input is not COCO-format (missing ``images``/``annotations``/
            ``categories`` or an annotation without ``bbox``/``image_id``/``category_id``).
    """
    if isinstance(gt, GroundTruth):
        return gt
    if isinstance(gt, (str, os.PathLike)):
        gt = _read_json(gt)
    elif not isinstance(gt, Mapping) and isinstance(getattr(gt, "dataset", None), Mapping):
        gt = gt.dataset  # a pycocotools COCO
    if not isinstance(gt, Mapping):
        raise TypeError(f"ground truth must be a COCO-format dict, a path or a COCO object, got {type(gt)}")
    for k in ("images", "annotations", "categories"):
        if k not in gt:
            raise ValueError(f"ground truth is not COCO-format: it has no {k!r} list")
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    cat_ids = np.array([c["id"] for c in cats])
    cat_names = [str(c.get("name", c["id"])) for c in cats]
    img_ids = np.unique(np.array([im["id"] for im in gt["images"]]))
    anns = gt["annotations"]
    try:
        a_img = np.array([a["image_id"] for a in anns])
        a_cat = np.array([a["category_id"] for a in anns])
        box = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    except KeyError as e:
        raise ValueError(f"a ground-truth annotation has no {e.args[0]!r}") from None
    except ValueError as e:
        raise ValueError(f"ground-truth boxes must be [x, y, w, h] lists of numbers: {e}") from None
    area = np.array([a.get("area", math.nan) for a in anns], dtype=np.float64)
    area = np.where(np.isnan(area), box[:, 2] * box[:, 3], area)
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    ignore = crowd | np.array([bool(a.get("ignore", 0)) for a in anns], dtype=bool)
    ann_id = np.array([a.get("id", 0) for a in anns], dtype=np.int64)
    ipos, iok = _positions(img_ids, a_img)
    cpos, cok = _positions(cat_ids, a_cat)
    keep = np.flatnonzero(iok & cok)
    order = keep[np.lexsort((keep, cpos[keep], ipos[keep]))]
    return GroundTruth(
        img_ids=img_ids,
        cat_ids=cat_ids,
        cat_names=cat_names,
        img=ipos[order],
        cat=cpos[order],
        box=box[order],
        area=area[order],
        crowd=crowd[order],
        ignore=ignore[order],
        ann_id=ann_id[order],
    )


def load_detections(dets: DetectionsLike, gt: GroundTruth) -> Detections:
    """Read detections given as a list of COCO result dicts, a JSON path or an ``[N, 7]`` array.

    The array form is pycocotools' ``loadNumpyAnnotations`` layout:
    ``image_id, x, y, w, h, score, category_id``. Detections of categories the ground truth
    does not list are dropped (pycocotools drops them too).

    Raises:
        ValueError: a detection lacks a field, or names an image the ground truth lacks.
    """
    if isinstance(dets, Detections):
        return dets
    if isinstance(dets, (str, os.PathLike)):
        dets = _read_json(dets)
    if isinstance(dets, np.ndarray):
        if dets.ndim != 2 or dets.shape[1] != 7:
            raise ValueError(
                f"a detection array must be [N, 7] (image_id, x, y, w, h, score, category_id), got {dets.shape}"
            )
        a = dets.astype(np.float64)
        img_raw: NDArray[Any] = a[:, 0].astype(np.int64)
        cat_raw: NDArray[Any] = a[:, 6].astype(np.int64)
        box, score = a[:, 1:5].copy(), a[:, 5].copy()
    elif isinstance(dets, Sequence):
        try:
            img_raw = np.array([d["image_id"] for d in dets])
            cat_raw = np.array([d["category_id"] for d in dets])
            score = np.array([d["score"] for d in dets], dtype=np.float64)
            box = np.array([d["bbox"] for d in dets], dtype=np.float64).reshape(-1, 4)
        except KeyError as e:
            raise ValueError(
                f"a detection has no {e.args[0]!r} (COCO results need image_id, category_id, bbox, score)"
            ) from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"detections must be COCO result dicts with [x, y, w, h] boxes: {e}") from None
    else:
        raise TypeError(
            f"detections must be a list of COCO result dicts, a path or an array, got {type(dets)}"
        )
    ipos, iok = _positions(gt.img_ids, img_raw)
    if not iok.all():
        bad = img_raw[~iok][:5].tolist()
        raise ValueError(
            f"{int((~iok).sum())} detection(s) name image ids the ground truth lacks, e.g. {bad}"
        )
    cpos, cok = _positions(gt.cat_ids, cat_raw)
    return Detections(img=ipos[cok], cat=cpos[cok], box=box[cok], score=score[cok])


# --------------------------------------------------------------------------- IoU + matching


def box_iou_xywh(
    d: NDArray[np.float64], g: NDArray[np.float64], crowd: NDArray[np.bool_]
) -> NDArray[np.float64]:
    """IoU of boxes ``d`` and ``g`` (broadcast), computed as pycocotools' C ``bbIou``.

    The same operations in the same order, so the values are bit-identical; for a crowd ground
    truth the union is the detection's area.
    """
    w = np.minimum(d[..., 2] + d[..., 0], g[..., 2] + g[..., 0]) - np.maximum(d[..., 0], g[..., 0])
    h = np.minimum(d[..., 3] + d[..., 1], g[..., 3] + g[..., 1]) - np.maximum(d[..., 1], g[..., 1])
    da = d[..., 2] * d[..., 3]
    ga = g[..., 2] * g[..., 3]
    inter = w * h
    union = np.where(crowd, da, da + ga - inter)
    ok = (w > 0) & (h > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, inter / np.where(ok, union, 1.0), 0.0)


@dataclass
class Matching:
    """Result of the greedy matching of the kept detections.

    Attributes:
        det: index into the :class:`Detections` of each kept detection, sorted by
            (image, category, score descending, file order).
        rank: rank of the detection within its (image, category).
        gt_index: ``[D, A, T]`` matched annotation (index into :class:`GroundTruth`) or -1.
        best_iou: ``[D]`` highest IoU with a non-ignored ground truth of the same image and
            category (0 if none).
    """

    det: NDArray[np.int64]
    rank: NDArray[np.int64]
    gt_index: NDArray[np.int64]
    best_iou: NDArray[np.float64]


def _gt_ignored(gt: GroundTruth, area_rngs: NDArray[np.float64]) -> NDArray[np.bool_]:
    """``[G, A]``: ignored in each area range (crowd, difficult or area outside the range)."""
    outside = (gt.area[:, None] < area_rngs[None, :, 0]) | (gt.area[:, None] > area_rngs[None, :, 1])
    return gt.ignore[:, None] | outside


def match(
    gt: GroundTruth,
    dets: Detections,
    iou_thresholds: NDArray[np.float64],
    area_rngs: NDArray[np.float64],
    max_det: int | None,
) -> Matching:
    """Greedy COCO matching of every (image, category) group, area range and IoU threshold.

    Args:
        gt: ground truth.
        dets: detections.
        iou_thresholds: ``[T]`` thresholds.
        area_rngs: ``[A, 2]`` area ranges.
        max_det: keep at most this many detections per (image, category); ``None`` keeps all.
    """
    K = len(gt.cat_ids)
    T, A = len(iou_thresholds), len(area_rngs)
    n_all = len(dets.score)
    orig = np.arange(n_all)
    order = np.lexsort((orig, -dets.score, dets.cat, dets.img))
    dkey = (dets.img * K + dets.cat)[order]
    starts = np.flatnonzero(np.r_[True, dkey[1:] != dkey[:-1]]) if n_all else np.zeros(0, np.int64)
    first = np.repeat(starts, np.diff(np.r_[starts, n_all]))
    rank = np.arange(n_all) - first
    if max_det is not None:
        keep = rank < max_det
        order, dkey, rank = order[keep], dkey[keep], rank[keep]
    n = len(order)
    gt_index = np.full((n, A, T), -1, dtype=np.int64)
    best_iou = np.zeros(n, dtype=np.float64)

    gkey = gt.key
    gstart = np.searchsorted(gkey, dkey, side="left")
    ng = np.searchsorted(gkey, dkey, side="right") - gstart
    gt_ig = _gt_ignored(gt, area_rngs)  # [G, A]
    # Crowd and difficult ground truths may absorb any number of detections.
    reusable = gt.ignore
    dbox = dets.box[order]

    has_gt = ng > 0
    if has_gt.any():
        # Bucket groups by the next power of two of their ground-truth count, to bound padding.
        bucket = np.ceil(np.log2(np.maximum(ng, 1))).astype(np.int64)
        for b in np.unique(bucket[has_gt]):
            sel_b = np.flatnonzero(has_gt & (bucket == b))
            gpad = int(ng[sel_b].max())
            slots = np.arange(gpad)
            valid = slots[None, :] < ng[sel_b, None]
            gidx = np.where(valid, gstart[sel_b, None] + slots[None, :], 0)
            iou = box_iou_xywh(dbox[sel_b, None, :], gt.box[gidx], gt.crowd[gidx])
            iou = np.where(valid, iou, -1.0)
            real = valid & ~gt.ignore[gidx]
            best_iou[sel_b] = np.where(real, iou, 0.0).max(axis=1, initial=0.0)
            # Local group index of each detection; groups are contiguous since dets are sorted.
            gk = dkey[sel_b]
            new_group = np.r_[True, gk[1:] != gk[:-1]]
            lg = np.cumsum(new_group) - 1
            group_first = np.flatnonzero(new_group)
            g_ig = gt_ig[gidx[group_first]]  # [NG, gpad, A]
            g_ig = np.moveaxis(g_ig, 2, 1)[:, :, None, :]  # [NG, A, 1, gpad]
            g_reuse = reusable[gidx[group_first]] & valid[group_first]  # [NG, gpad]
            taken = np.zeros((len(group_first), A, T, gpad), dtype=bool)
            r_b = rank[sel_b]
            by_rank = np.argsort(r_b, kind="stable")
            bounds = np.searchsorted(r_b[by_rank], np.arange(int(r_b.max()) + 2))
            ge_all = iou[:, None, :] >= iou_thresholds[None, :, None]  # [n_b, T, gpad]
            for r in range(len(bounds) - 1):
                rows = by_rank[bounds[r] : bounds[r + 1]]
                if len(rows) == 0:
                    continue
                g = lg[rows]
                cand = (~taken[g] | g_reuse[g][:, None, None, :]) & ge_all[rows][:, None, :, :]
                ig = g_ig[g]
                c_reg = cand & ~ig
                use_reg = c_reg.any(axis=-1, keepdims=True)
                chosen = np.where(use_reg, c_reg, cand & ig)
                has = chosen.any(axis=-1)
                vals = np.where(chosen, iou[rows][:, None, None, :], -2.0)
                # Last maximum (pycocotools keeps a later ground truth of equal IoU).
                m = gpad - 1 - np.argmax(vals[..., ::-1], axis=-1)
                ii, aa, tt = np.nonzero(has)
                mm = m[ii, aa, tt]
                taken[g[ii], aa, tt, mm] = True
                out = np.full(m.shape, -1, dtype=np.int64)
                out[ii, aa, tt] = gidx[rows[ii], mm]
                gt_index[sel_b[rows]] = out
    return Matching(det=order, rank=rank, gt_index=gt_index, best_iou=best_iou)


# --------------------------------------------------------------------------- accumulate


@dataclass
class EvalResult:
    """COCO evaluation result.

    Attributes:
        stats: the 12 numbers of ``COCOeval.summarize`` by name (``AP``, ``AP50``, ``AP75``,
            ``APs``, ``APm``, ``APl``, ``AR1``, ``AR10``, ``AR100``, ``ARs``, ``ARm``, ``ARl``);
            -1 where undefined.
        per_class: category name -> AP@[.5:.95] (area all, the largest ``maxDets``); -1 for a
            category without (non-ignored) ground truth.
        ap_vs_iou: IoU threshold (rounded to 2 decimals) -> AP at that threshold.
        precision: ``[T, R, K, A, M]`` interpolated precision, as ``COCOeval.eval["precision"]``.
        recall: ``[T, K, A, M]`` recall, as ``COCOeval.eval["recall"]``.
        iou_thresholds, area_labels, max_dets: the evaluated parameters.
    """

    stats: dict[str, float]
    per_class: dict[str, float]
    ap_vs_iou: dict[float, float]
    precision: NDArray[np.float64] = field(repr=False)
    recall: NDArray[np.float64] = field(repr=False)
    iou_thresholds: NDArray[np.float64] = field(repr=False)
    area_labels: list[str] = field(default_factory=list)
    max_dets: tuple[int, ...] = COCO_MAX_DETS

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``stats``, ``per_class`` and ``ap_vs_iou`` (threshold keys as "0.50")."""
        return {
            "stats": {k: float(v) for k, v in self.stats.items()},
            "per_class": {k: float(v) for k, v in self.per_class.items()},
            "ap_vs_iou": {f"{t:.2f}": float(v) for t, v in self.ap_vs_iou.items()},
        }


def _mean_defined(s: NDArray[np.float64]) -> float:
    """pycocotools' summary mean: over the entries > -1, or -1 when there are none."""
    s = s[s > -1]
    return -1.0 if s.size == 0 else float(np.mean(s))


def _accumulate(
    gt: GroundTruth,
    dets: Detections,
    m: Matching,
    gt_ig: NDArray[np.bool_],
    area_rngs: NDArray[np.float64],
    max_dets: Sequence[int],
    T: int,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    K, A, M = len(gt.cat_ids), len(area_rngs), len(max_dets)
    R = len(COCO_RECALL_THRESHOLDS)
    precision = -np.ones((T, R, K, A, M))
    recall = -np.ones((T, K, A, M))

    # Positives per (category, area range).
    npig = np.zeros((K, A), dtype=np.int64)
    for a in range(A):
        npig[:, a] = np.bincount(gt.cat[~gt_ig[:, a]], minlength=K)

    d = m.det
    matched = m.gt_index >= 0
    gsafe = np.where(matched, m.gt_index, 0)
    # pycocotools stores the matched id and tests it for truth: a ground truth with id 0 never
    # yields a true positive.
    dtm = matched & (gt.ann_id[gsafe] != 0)
    a_idx = np.arange(A)[None, :, None]
    matched_ig = matched & gt_ig[gsafe, a_idx]
    darea = dets.box[d, 2] * dets.box[d, 3]
    outside = (darea[:, None] < area_rngs[None, :, 0]) | (darea[:, None] > area_rngs[None, :, 1])
    dt_ig = matched_ig | (~dtm & outside[:, :, None])
    # [A, T, D]: the per-category slices below are then contiguous rows.
    tps = np.ascontiguousarray((dtm & ~dt_ig).transpose(1, 2, 0))
    fps = np.ascontiguousarray((~dtm & ~dt_ig).transpose(1, 2, 0))

    # One sort for everything: within a category, score descending, then image order, then the
    # rank inside the image: the order of pycocotools' mergesort over its concatenation.
    cat = dets.cat[d]
    srt = np.lexsort((m.rank, dets.img[d], -dets.score[d], cat))
    rec_thrs = COCO_RECALL_THRESHOLDS
    eps = np.spacing(1)
    for mi, max_det in enumerate(max_dets):
        sub = srt[m.rank[srt] < max_det]
        cat_bounds = np.searchsorted(cat[sub], np.arange(K + 1))
        for a in range(A):
            tp_a = tps[a][:, sub]  # [T, n]
            fp_a = fps[a][:, sub]
            for k in range(K):
                if npig[k, a] == 0:
                    continue
                lo, hi = cat_bounds[k], cat_bounds[k + 1]
                nd = hi - lo
                if nd == 0:
                    recall[:, k, a, mi] = 0.0
                    precision[:, :, k, a, mi] = 0.0
                    continue
                tp = np.cumsum(tp_a[:, lo:hi], axis=1).astype(float)  # [T, nd]
                fp = np.cumsum(fp_a[:, lo:hi], axis=1).astype(float)
                rc = tp / npig[k, a]
                pr = tp / (fp + tp + eps)
                recall[:, k, a, mi] = rc[:, -1]
                pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
                for t in range(T):
                    inds = np.searchsorted(rc[t], rec_thrs, side="left")
                    inside = inds < nd
                    q = np.zeros(R)
                    q[inside] = pr[t, inds[inside]]
                    precision[t, :, k, a, mi] = q
    return precision, recall


def evaluate(
    gt: GroundTruthLike,
    dets: DetectionsLike,
    *,
    iou_thresholds: Sequence[float] | NDArray[np.float64] | None = None,
    area_ranges: Mapping[str, tuple[float, float]] | None = None,
    max_dets: Sequence[int] = COCO_MAX_DETS,
) -> EvalResult:
    """COCO box evaluation, equal to pycocotools' ``COCOeval`` (bbox) on the same input.

    Args:
        gt: COCO-format ground truth: a dict, a path to its JSON, or a pycocotools ``COCO``.
            Annotations with ``"ignore": 1`` are ignored as VOC ignores difficult objects (see
            the module docstring: the one difference from pycocotools).
        dets: detections: a list of COCO result dicts (``image_id``, ``category_id``,
            ``bbox`` as ``[x, y, w, h]``, ``score``), a path to such a JSON, or an ``[N, 7]``
            array ``image_id, x, y, w, h, score, category_id``.
        iou_thresholds: IoU thresholds; default COCO's 0.50:0.05:0.95.
        area_ranges: label -> (min area, max area), default COCO's ``all``, ``small``,
            ``medium``, ``large``. Summary keys of missing labels are -1.
        max_dets: three increasing per-image detection limits, default ``(1, 10, 100)``
            (``AR1``, ``AR10``, ``AR100`` use them in order).

    Returns:
        An :class:`EvalResult`.
    """
    thr = COCO_IOU_THRESHOLDS if iou_thresholds is None else np.asarray(iou_thresholds, dtype=np.float64)
    if thr.ndim != 1 or thr.size == 0 or (thr < 0).any() or (thr > 1).any():
        raise ValueError(f"iou_thresholds must be a non-empty list of values in [0, 1], got {thr.tolist()}")
    max_dets = tuple(int(x) for x in max_dets)
    if len(max_dets) != 3 or list(max_dets) != sorted(max_dets) or max_dets[0] < 1:
        raise ValueError(
            f"max_dets must be three increasing positive limits like (1, 10, 100), got {max_dets}"
        )
    ranges = dict(COCO_AREA_RANGES if area_ranges is None else area_ranges)
    if not ranges:
        raise ValueError("area_ranges must name at least one range")
    labels = list(ranges)
    area_rngs = np.array([ranges[k] for k in labels], dtype=np.float64).reshape(-1, 2)

    g = load_ground_truth(gt)
    d = load_detections(dets, g)
    # pycocotools caps each comparison at 1 - 1e-10 so that IoU == 1 still matches at t = 1.
    thr_eff = np.minimum(thr, 1 - 1e-10)
    m = match(g, d, thr_eff, area_rngs, max_dets[-1])
    gt_ig = _gt_ignored(g, area_rngs)
    precision, recall = _accumulate(g, d, m, gt_ig, area_rngs, max_dets, len(thr))
    return _summarize(g, precision, recall, thr, labels, max_dets)


def _summarize(
    g: GroundTruth,
    precision: NDArray[np.float64],
    recall: NDArray[np.float64],
    thr: NDArray[np.float64],
    labels: list[str],
    max_dets: tuple[int, ...],
) -> EvalResult:
    def summ(ap: bool, iou: float | None = None, area: str = "all", md: int = max_dets[-1]) -> float:
        # Same slicing as COCOeval.summarize, so the means are taken over identical arrays.
        aind = [i for i, lbl in enumerate(labels) if lbl == area]
        mind = [i for i, x in enumerate(max_dets) if x == md]
        s = precision if ap else recall
        if iou is not None:
            s = s[np.where(iou == thr)[0]]
        s = s[:, :, :, aind, mind] if ap else s[:, :, aind, mind]
        return _mean_defined(s)

    md0, md1, md2 = max_dets
    stats = {
        "AP": summ(True),
        "AP50": summ(True, iou=0.5, md=md2),
        "AP75": summ(True, iou=0.75, md=md2),
        "APs": summ(True, area="small", md=md2),
        "APm": summ(True, area="medium", md=md2),
        "APl": summ(True, area="large", md=md2),
        "AR1": summ(False, md=md0),
        "AR10": summ(False, md=md1),
        "AR100": summ(False, md=md2),
        "ARs": summ(False, area="small", md=md2),
        "ARm": summ(False, area="medium", md=md2),
        "ARl": summ(False, area="large", md=md2),
    }
    a_all = labels.index("all") if "all" in labels else 0
    per_class = {name: _mean_defined(precision[:, :, k, a_all, -1]) for k, name in enumerate(g.cat_names)}
    ap_vs_iou = {round(float(t), 2): _mean_defined(precision[i, :, :, a_all, -1]) for i, t in enumerate(thr)}
    return EvalResult(
        stats=stats,
        per_class=per_class,
        ap_vs_iou=ap_vs_iou,
        precision=precision,
        recall=recall,
        iou_thresholds=thr,
        area_labels=labels,
        max_dets=max_dets,
    )
