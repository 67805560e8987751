"""Synthetic COCO-format detection set: irregular shapes with thin tails, occluding each other.

``hdet data synth --out DIR`` writes ``DIR/{train,val,test}/NNNNNN.png``,
``DIR/annotations/instances_{train,val,test}.json`` and ``DIR/synth.json`` (the parameters). The
``test`` split (``--test N``, none by default here) is held out: a search selects on ``val`` and
its evidence is judged on ``test``. The splits never share an image (each has its own stream).

What makes it a test of localisation quality
    * Five classes told apart by shape, not colour: ``polygon`` (irregular, 5-9 vertices),
      ``star`` (5-7 points), ``tadpole`` (an ellipse with a long, curved, 1-2 px tail),
      ``crescent`` and ``cross`` (uneven arms). Other shapes carry a thin antenna with
      probability ``tail_prob``. A tail moves a box edge far from the object's bulk while adding
      only a few pixels, so a detector that localises the body but not the tail gets IoU
      0.6-0.8: AP at IoU 0.75-0.9 separates good localisation from bad.
    * Textured backgrounds (smooth colour fields, gratings, pixel noise) and faint distractor
      lines that look like tails.
    * Partial occlusion: with probability ``occlusion`` an object is placed against an earlier
      one and drawn over it; an object keeps at least ``min_visible`` of its pixels.

Annotation convention (COCO's)
    Boxes, areas and polygons describe the *visible* part of an object (modal, as COCO's
    annotations do), not its full extent behind occluders. A placement that would leave an
    object's visible part with a hole is rejected, because COCO polygons cannot express holes.
    Polygons trace the pixel boundary of the visible mask exactly (a pixel belongs to one
    object only), and ``bbox``/``area`` are pycocotools' own values for those polygons, so box,
    area and decoded mask always agree. Categories have ids 1..5, annotations ids from 1,
    ``iscrowd`` is 0.

Determinism
    Image ``i`` of a split depends only on (``seed``, split, ``i``) and the parameters: the same
    arguments write byte-identical files, and a larger set extends a smaller one.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import contourpy
import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from scipy import ndimage

from harmonic.data.synth_params import FORMAT_VERSION, SynthParams

CATEGORIES: tuple[str, ...] = ("polygon", "star", "tadpole", "crescent", "cross")
SPLITS: tuple[str, ...] = ("train", "val", "test")
NOISE = 4  # pixel noise amplitude (grey levels); more costs PNG size and write time


@dataclass
class _Obj:
    category: int  # 1-based
    mask: np.ndarray  # bool[H, W], full object
    visible: np.ndarray  # bool[H, W], what later objects leave of it
    full_area: int
    center: tuple[float, float]
    radius: float


# --------------------------------------------------------------------------- shapes


def _rot(points: np.ndarray, theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return points @ np.array([[c, s], [-s, c]])


def _draw(
    h: int, w: int, polygons: Sequence[np.ndarray] = (), lines: Sequence[tuple[np.ndarray, int]] = ()
) -> np.ndarray:
    im = Image.new("1", (w, h), 0)
    d = ImageDraw.Draw(im)
    for p in polygons:
        d.polygon([(float(x), float(y)) for x, y in p], fill=1)
    for p, width in lines:
        d.line([(float(x), float(y)) for x, y in p], fill=1, width=width, joint="curve")
    return np.array(im, dtype=bool)


def _tail(rng: np.random.Generator, start: np.ndarray, heading: float, length: float) -> np.ndarray:
    """A gently curving polyline (no loops: the heading turns < 0.35 rad per segment)."""
    n = 6
    pts = [start]
    step = length / n
    turn = rng.uniform(-0.35, 0.35)
    for _ in range(n):
        heading += turn + rng.uniform(-0.1, 0.1)
        pts.append(pts[-1] + step * np.array([math.cos(heading), math.sin(heading)]))
    return np.array(pts)


def _shape(
    rng: np.random.Generator,
    cat: int,
    cx: float,
    cy: float,
    r: float,
    h: int,
    w: int,
    tail_prob: float,
    tail_w: int,
) -> np.ndarray:
    """Rasterise one object of category ``cat`` (1-based) centred at (cx, cy) with radius ``r``."""
    theta = rng.uniform(0, 2 * math.pi)
    centre = np.array([cx, cy])
    name = CATEGORIES[cat - 1]
    lines: list[tuple[np.ndarray, int]] = []
    if name == "polygon":
        n = int(rng.integers(5, 10))
        ang = 2 * math.pi * (np.arange(n) + rng.uniform(-0.35, 0.35, n)) / n
        rad = r * rng.uniform(0.5, 1.0, n)
        outline = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
        polys = [centre + _rot(outline, theta)]
    elif name == "star":
        n = int(rng.integers(5, 8))
        ang = np.arange(2 * n) * math.pi / n
        rad = np.where(
            np.arange(2 * n) % 2 == 0, r * rng.uniform(0.85, 1.0, 2 * n), r * rng.uniform(0.35, 0.55, 2 * n)
        )
        outline = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
        polys = [centre + _rot(outline, theta)]
    elif name == "tadpole":
        rx = r * rng.uniform(0.45, 0.65)
        ry = rx * rng.uniform(0.6, 0.95)
        ang = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        outline = np.stack([rx * np.cos(ang), ry * np.sin(ang)], 1)
        polys = [centre + _rot(outline, theta)]
        back = centre + _rot(np.array([[-rx * 0.9, 0.0]]), theta)[0]
        lines.append((_tail(rng, back, theta + math.pi, r * rng.uniform(1.2, 2.2)), tail_w))
    elif name == "crescent":
        ang = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        disc = np.stack([np.cos(ang), np.sin(ang)], 1)
        r2 = r * rng.uniform(0.75, 0.95)
        off = r * rng.uniform(0.35, 0.6)
        outer = _draw(h, w, [centre + r * disc])
        # off + r2 > r, so the cut disc leaves the outer one and the crescent has no hole
        cut = _draw(h, w, [centre + off * np.array([math.cos(theta), math.sin(theta)]) + r2 * disc])
        mask = outer & ~cut
        if rng.random() < tail_prob:
            tip = centre - r * 0.95 * np.array([math.cos(theta), math.sin(theta)])
            mask |= _draw(h, w, lines=[(_tail(rng, tip, theta + math.pi, r * rng.uniform(0.6, 1.3)), tail_w)])
        return mask
    else:  # cross with uneven arms
        t = r * rng.uniform(0.28, 0.42) / 2
        a = r * rng.uniform(0.6, 1.0, 4)
        outline = np.array(
            [
                [t, t],
                [a[0], t],
                [a[0], -t],
                [t, -t],
                [t, -a[1]],
                [-t, -a[1]],
                [-t, -t],
                [-a[2], -t],
                [-a[2], t],
                [-t, t],
                [-t, a[3]],
                [t, a[3]],
            ]
        )
        polys = [centre + _rot(outline, theta)]
    if name != "tadpole" and rng.random() < tail_prob:
        # an antenna from a random outline vertex, pointing away from the centre
        v = polys[0][int(rng.integers(len(polys[0])))]
        heading = math.atan2(v[1] - cy, v[0] - cx)
        lines.append((_tail(rng, v, heading, r * rng.uniform(0.6, 1.3)), tail_w))
    return _draw(h, w, polys, lines)


def _four_connected(mask: np.ndarray) -> np.ndarray:
    """Add a pixel wherever two pixels touch only diagonally, so thin tails stay one polygon."""
    m = mask.copy()
    for _ in range(4):
        a = m[:-1, :-1] & m[1:, 1:] & ~m[:-1, 1:] & ~m[1:, :-1]
        b = m[:-1, 1:] & m[1:, :-1] & ~m[:-1, :-1] & ~m[1:, 1:]
        if not (a.any() or b.any()):
            break
        m[:-1, 1:] |= a
        m[:-1, :-1] |= b
    return m


def _bounds(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask.any(1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _has_hole(mask: np.ndarray) -> bool:
    b = _bounds(mask)
    if b is None:
        return False
    crop = mask[b[0] : b[1], b[2] : b[3]]
    return bool((ndimage.binary_fill_holes(crop) != crop).any())


# --------------------------------------------------------------------------- images


def _background(rng: np.random.Generator, h: int, w: int, s: int) -> np.ndarray:
    g = int(rng.integers(2, 7))
    low = Image.fromarray(rng.uniform(25, 230, (g, g, 3)).astype(np.uint8)).resize(
        (w, h), Image.Resampling.BICUBIC
    )
    bg = np.asarray(low, dtype=np.float32)
    # a grating sin(ax + by), built from 1-D factors: sin(ax)cos(by) + cos(ax)sin(by)
    freq = 2 * math.pi * rng.uniform(2, 14) / s
    phi = rng.uniform(0, math.pi)
    ax = freq * math.cos(phi) * np.arange(w, dtype=np.float32)
    by = freq * math.sin(phi) * np.arange(h, dtype=np.float32)
    wave = np.outer(np.cos(by), np.sin(ax)) + np.outer(np.sin(by), np.cos(ax))
    bg += wave[..., None] * rng.uniform(-25, 25, 3).astype(np.float32)
    return bg


def _clutter(rng: np.random.Generator, bg: np.ndarray, n: int, s: int) -> None:
    h, w = bg.shape[:2]
    for _ in range(n):
        start = rng.uniform([0, 0], [w, h])
        line = _tail(rng, start, rng.uniform(0, 2 * math.pi), s * rng.uniform(0.08, 0.25))
        m = _draw(h, w, lines=[(line, 1)])
        # faint: half-way between the background and a random colour
        bg[m] = 0.5 * bg[m] + 0.5 * rng.uniform(0, 255, 3).astype(np.float32)


def _pick_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    best, best_d = None, -1.0
    for _ in range(10):
        c = rng.uniform(0, 255, 3)
        d = float(np.linalg.norm(c - under))
        if d > 70:
            return c
        if d > best_d:
            best, best_d = c, d
    assert best is not None
    return best


def _place(rng: np.random.Generator, p: SynthParams, objs: list[_Obj], h: int, w: int) -> _Obj | None:
    s = p.image_size
    tail_w = int(rng.integers(1, max(1, s // 128) + 1))
    for _ in range(15):
        cat = int(rng.integers(1, len(CATEGORIES) + 1))
        r = s * rng.uniform(p.min_scale, p.max_scale)
        if objs and rng.random() < p.occlusion:
            other = objs[int(rng.integers(len(objs)))]
            ang = rng.uniform(0, 2 * math.pi)
            dist = (r + other.radius) * rng.uniform(0.45, 0.85)
            cx, cy = other.center[0] + dist * math.cos(ang), other.center[1] + dist * math.sin(ang)
        else:
            cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
        mask = _four_connected(_shape(rng, cat, cx, cy, r, h, w, p.tail_prob, tail_w))
        area = int(mask.sum())
        if area < 30 or _has_hole(mask):
            continue
        ok = True
        for o in objs:
            if not (o.visible & mask).any():
                continue
            left = o.visible & ~mask
            if left.sum() < p.min_visible * o.full_area or _has_hole(left):
                ok = False
                break
        if ok:
            for o in objs:
                o.visible &= ~mask
            return _Obj(cat, mask, mask.copy(), area, (cx, cy), r)
    return None


def _polygons(visible: np.ndarray) -> list[list[float]]:
    """Exact outline(s) of a binary mask as COCO polygons (vertices on pixel edges and corners)."""
    b = _bounds(visible)
    assert b is not None
    y0, y1, x0, x1 = b
    crop = np.pad(visible[y0:y1, x0:x1], 1).astype(np.float64)
    xs = np.arange(x0 - 1, x1 + 1) + 0.5
    ys = np.arange(y0 - 1, y1 + 1) + 0.5
    lines = contourpy.contour_generator(xs, ys, crop, line_type=contourpy.LineType.Separate).lines(0.5)
    out = []
    for line in lines:
        pts = np.asarray(line)[:-1]  # closed: last == first
        if len(pts) < 3:
            continue
        prev, nxt = pts - np.roll(pts, 1, 0), np.roll(pts, -1, 0) - pts
        cross = prev[:, 0] * nxt[:, 1] - prev[:, 1] * nxt[:, 0]
        keep = cross != 0  # drop vertices in the middle of a straight run
        if keep.sum() >= 3:
            pts = pts[keep]
        # marching squares on a 0/1 grid puts vertices on half-pixels: the rounding is exact
        out.append(np.round(pts.ravel(), 2).tolist())
    return out


def render(params: SynthParams, split: str, index: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Render image ``index`` (0-based) of ``split``.

    Returns:
        The uint8[H, W, 3] image and its annotations (without ``id``/``image_id``), in drawing order.
    """
    p = params
    rng = np.random.default_rng(np.random.SeedSequence([p.seed, SPLITS.index(split), index]))
    s = p.image_size
    ar = float(p.aspect_ratios[int(rng.integers(len(p.aspect_ratios)))])
    w, h = (s, max(8, round(s / ar))) if ar >= 1 else (max(8, round(s * ar)), s)
    img = _background(rng, h, w, s)
    _clutter(rng, img, int(rng.integers(0, p.clutter + 1)), s)

    objs: list[_Obj] = []
    for _ in range(int(rng.integers(p.min_objects, p.max_objects + 1))):
        o = _place(rng, p, objs, h, w)
        if o is not None:
            objs.append(o)
    for o in objs:
        yy, xx = np.nonzero(o.mask)
        under = img[yy, xx].mean(0)
        colour = _pick_colour(rng, under)
        # a linear shading across the object, so it is not a flat patch
        phi = rng.uniform(0, 2 * math.pi)
        ramp = ((xx - o.center[0]) * math.cos(phi) + (yy - o.center[1]) * math.sin(phi)) / max(o.radius, 1.0)
        img[yy, xx] = colour[None, :] + ramp[:, None] * rng.uniform(0, 30)
    img += rng.integers(-NOISE, NOISE + 1, size=img.shape, dtype=np.int8)
    out = np.clip(img, 0, 255, out=img).astype(np.uint8)

    anns = []
    for o in objs:
        if not o.visible.any():
            continue
        polys = _polygons(o.visible)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
        x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
        anns.append(
            {
                "category_id": o.category,
                "bbox": [x, y, bw, bh],
                "area": float(mask_utils.area(rle)),
                "iscrowd": 0,
                "segmentation": polys,
            }
        )
    return out, anns


def _write_image(task: tuple[SynthParams, str, int, Path]) -> tuple[str, int, int, list[dict[str, Any]]]:
    p, split, index, path = task
    pixels, anns = render(p, split, index)
    Image.fromarray(pixels).save(path, format="PNG", compress_level=p.compress_level)
    return path.name, pixels.shape[1], pixels.shape[0], anns


def generate(
    out_dir: str | Path,
    *,
    train: int = 200,
    val: int = 50,
    test: int = 0,
    image_size: int = 256,
    seed: int = 0,
    max_objects: int = 6,
    min_objects: int = 1,
    min_scale: float = 0.07,
    max_scale: float = 0.17,
    occlusion: float = 0.5,
    min_visible: float = 0.4,
    tail_prob: float = 0.3,
    clutter: int = 2,
    aspect_ratios: Sequence[float] = (1.0,),
    compress_level: int = 1,
    jobs: int = 1,
) -> dict[str, Any]:
    """Write a synthetic COCO-format detection set (see the module docstring).

    Args:
        out_dir: output folder (created; existing files of the same names are overwritten).
        train, val, test: number of images per split (a split of 0 images is not written).
        image_size: longer image side in pixels.
        seed: the seed; the same arguments give byte-identical files.
        max_objects, min_objects: objects per image (fewer when a placement keeps failing).
        min_scale, max_scale: object radius as a fraction of ``image_size``.
        occlusion: probability that an object is placed against an earlier one.
        min_visible: least fraction of an object's pixels that later objects leave visible.
        tail_prob: probability that a shape other than ``tadpole`` gets a thin antenna.
        clutter: up to this many faint distractor lines per image.
        aspect_ratios: width/height values drawn from per image (``(1.0,)``: square images).
        compress_level: PNG zlib level (1: fast to write, larger files).
        jobs: worker processes (the files do not depend on it).

    Returns:
        ``{"root", "splits": {split: {"images_dir", "ann_file", "images", "annotations"}},
        "categories", "params", "seconds", "images_per_s"}``.
    """
    p = SynthParams(
        train=train,
        val=val,
        test=test,
        image_size=image_size,
        seed=seed,
        min_objects=min_objects,
        max_objects=max_objects,
        min_scale=min_scale,
        max_scale=max_scale,
        occlusion=occlusion,
        min_visible=min_visible,
        tail_prob=tail_prob,
        clutter=clutter,
        aspect_ratios=tuple(float(a) for a in aspect_ratios),
        compress_level=compress_level,
    )
    p.validate()
    if jobs < 1:
        raise ValueError(f"synth: jobs must be >= 1, got {jobs}")
    root = Path(out_dir)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CATEGORIES)]
    t0 = time.perf_counter()
    splits: dict[str, Any] = {}
    for split, count in (("train", p.train), ("val", p.val), ("test", p.test)):
        if split == "test" and count == 0:
            continue
        img_dir = root / split
        img_dir.mkdir(parents=True, exist_ok=True)
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        tasks = [(p, split, i, img_dir / f"{i + 1:06d}.png") for i in range(count)]
        if jobs > 1 and count > 1:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                results = list(pool.map(_write_image, tasks, chunksize=max(1, count // (4 * jobs))))
        else:
            results = [_write_image(t) for t in tasks]
        for i, (name, w, h, anns) in enumerate(results):
            images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
            for a in anns:
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **a})
        data = {
            "info": {
                "description": "HarmonicDet synthetic shapes",
                "version": str(FORMAT_VERSION),
                "seed": p.seed,
            },
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        ann_file = root / "annotations" / f"instances_{split}.json"
        ann_file.write_text(json.dumps(data, separators=(",", ":")))
        splits[split] = {
            "images_dir": str(img_dir),
            "ann_file": str(ann_file),
            "images": len(images),
            "annotations": len(annotations),
        }
    seconds = time.perf_counter() - t0
    params = asdict(p)
    params["aspect_ratios"] = list(p.aspect_ratios)
    (root / "synth.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    n = p.train + p.val + p.test
    return {
        "root": str(root),
        "splits": splits,
        "categories": list(CATEGORIES),
        "params": params,
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else float("inf"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``hdet data synth --out DIR [--train N --val N --image-size S --seed K ...]``."""
    d = SynthParams()
    parser = argparse.ArgumentParser(
        prog="hdet data synth", description="Write a synthetic COCO-format detection set."
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train", type=int, default=d.train, help=f"training images (default {d.train})")
    parser.add_argument("--val", type=int, default=d.val, help=f"validation images (default {d.val})")
    parser.add_argument("--test", type=int, default=d.test, help=f"held-out test images (default {d.test})")
    parser.add_argument(
        "--image-size", type=int, default=d.image_size, help=f"longer image side (default {d.image_size})"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help=f"seed (default {d.seed})")
    parser.add_argument("--min-objects", type=int, default=d.min_objects)
    parser.add_argument("--max-objects", type=int, default=d.max_objects)
    parser.add_argument(
        "--min-scale", type=float, default=d.min_scale, help="object radius / image size, lower bound"
    )
    parser.add_argument(
        "--max-scale", type=float, default=d.max_scale, help="object radius / image size, upper bound"
    )
    parser.add_argument(
        "--occlusion", type=float, default=d.occlusion, help="probability an object overlaps an earlier one"
    )
    parser.add_argument(
        "--min-visible", type=float, default=d.min_visible, help="least visible fraction of an object"
    )
    parser.add_argument(
        "--tail-prob", type=float, default=d.tail_prob, help="probability of an antenna on non-tadpoles"
    )
    parser.add_argument(
        "--clutter", type=int, default=d.clutter, help="up to this many distractor lines per image"
    )
    parser.add_argument(
        "--aspect-ratios",
        default="1",
        help="comma-separated width/height values drawn from per image (default 1)",
    )
    parser.add_argument("--compress-level", type=int, default=d.compress_level, help="PNG zlib level 0-9")
    parser.add_argument(
        "--jobs", type=int, default=1, help="worker processes (default 1; output is the same)"
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        ratios = tuple(float(v) for v in args.aspect_ratios.split(","))
        info = generate(
            args.out,
            train=args.train,
            val=args.val,
            test=args.test,
            image_size=args.image_size,
            seed=args.seed,
            min_objects=args.min_objects,
            max_objects=args.max_objects,
            min_scale=args.min_scale,
            max_scale=args.max_scale,
            occlusion=args.occlusion,
            min_visible=args.min_visible,
            tail_prob=args.tail_prob,
            clutter=args.clutter,
            aspect_ratios=ratios,
            compress_level=args.compress_level,
            jobs=args.jobs,
        )
    except ValueError as e:
        parser.error(str(e))
    for split, s in info["splits"].items():
        print(f"{split}: {s['images']} images, {s['annotations']} annotations -> {s['ann_file']}")
    print(f"{info['seconds']:.2f} s, {info['images_per_s']:.0f} images/s")
    return 0
