"""Validation of COCO-format datasets before any training: ``hdet data check``.

A detector trained on a broken dataset fails late and obscurely (a NaN loss, an assertion deep in
torchvision, an AP that silently ignores half the ground truth). Everything that can be checked
from the annotation file and the image files is checked here, once, and every problem is reported
with the image file and the annotation it concerns.

Problem kinds
    ``malformed_json``       the file is not JSON, or lacks ``images``/``annotations``/``categories``.
    ``duplicate_image_id``   two ``images`` entries share an id.
    ``duplicate_category_id`` two ``categories`` entries share an id.
    ``bad_image_entry``      an ``images`` entry lacks an integer id, ``file_name``, or a positive
                             ``width``/``height``.
    ``missing_image``        the image file does not exist.
    ``unreadable_image``     the image file exists but cannot be decoded.
    ``size_mismatch``        the image's real size differs from ``width``/``height`` in the JSON.
    ``unknown_image``        an annotation's ``image_id`` is not in ``images``.
    ``unknown_category``     an annotation's ``category_id`` is not in ``categories``.
    ``bad_ann_id``           an annotation has no integer id.
    ``zero_ann_id``          an annotation has id 0, which pycocotools' matcher uses for "no match".
    ``duplicate_ann_id``     an annotation id seen before (the later ones are reported).
    ``bad_bbox``             ``bbox`` is not four finite numbers.
    ``empty_box``            ``bbox`` has zero or negative width or height.
    ``box_outside``          ``bbox`` extends beyond the image by more than ``BOX_TOLERANCE`` pixels.

The first three kinds are fatal: no annotation can be skipped to repair them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

# Boxes derived from polygons may exceed the image by a rounding error; loaders clip those.
BOX_TOLERANCE = 1.0
FATAL_KINDS = frozenset({"malformed_json", "duplicate_image_id", "duplicate_category_id"})


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; the message lists every problem found."""


@dataclass(frozen=True)
class Problem:
    """One problem of a dataset.

    Args:
        kind: one of the kinds listed in this module's docstring.
        file: the image file the problem concerns (the annotation file for file-level problems).
        annotation_id: the annotation's id as written in the JSON, or None for image/file problems.
        message: a human-readable description.
        ann_index: position of the annotation in the JSON's ``annotations`` list (ids may be
            duplicated or missing, so this is what identifies it).
        image_id: the image concerned, when known.
    """

    kind: str
    file: str
    annotation_id: Any
    message: str
    ann_index: int | None = None
    image_id: int | None = None

    def format(self) -> str:
        ann = "" if self.annotation_id is None and self.ann_index is None else f" ann={self.annotation_id}"
        return f"{self.kind}: {self.file}{ann}: {self.message}"


@dataclass
class CheckReport:
    """Result of :func:`check_dataset`: the problems found and what was checked."""

    ann_file: str
    images_dir: str
    num_images: int = 0
    num_annotations: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def fatal(self) -> bool:
        """True when skipping annotations or images cannot repair the dataset."""
        return any(p.kind in FATAL_KINDS for p in self.problems)

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(p.kind for p in self.problems).items()))

    def format(self, limit: int = 50) -> str:
        """Text report: a summary line, the counts per kind, then up to ``limit`` problems."""
        head = (
            f"{self.ann_file} (images in {self.images_dir}): {self.num_images} images, "
            f"{self.num_annotations} annotations, "
        )
        if self.ok:
            return head + "no problems"
        lines = [
            head
            + f"{len(self.problems)} problem(s): "
            + ", ".join(f"{k} {n}" for k, n in self.counts().items())
        ]
        lines += ["  " + p.format() for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)


def _is_int(x: Any) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def load_json(ann_file: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a COCO annotation file, raising :class:`DatasetError` naming the file and the position of
    a syntax error, or the missing top-level key."""
    path = Path(ann_file)
    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path}")
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"malformed_json: {path}: {e}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"malformed_json: {path}: top level is {type(data).__name__}, not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"malformed_json: {path}: missing or non-list key {key!r}")
    return data


def _verify_image(path: str, deep: bool) -> tuple[str, tuple[int, int] | None, str]:
    """Return (path, (width, height) or None, error message)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            size = im.size
            if deep:
                im.load()
            else:
                im.verify()
        return path, size, ""
    except FileNotFoundError:
        return path, None, "missing"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return path, None, f"{type(e).__name__}: {e}"


def validate(
    data: dict[str, Any],
    images_dir: str | os.PathLike[str],
    ann_file: str | os.PathLike[str],
    *,
    open_images: bool = True,
    deep: bool = False,
) -> CheckReport:
    """Check an already-loaded COCO dict against its image folder.

    Args:
        data: the parsed annotation file (see :func:`load_json`).
        images_dir: folder the ``file_name`` entries are relative to.
        ann_file: path of the annotation file, for the messages.
        open_images: open every image header (readability, real size). With False only the files'
            existence is checked, which is what the loaders do at construction.
        deep: fully decode every image (finds truncated JPEGs; slower).

    Returns:
        The report; problems are in file order.
    """
    images_dir = str(images_dir)
    report = CheckReport(str(ann_file), images_dir, len(data["images"]), len(data["annotations"]))
    problems = report.problems

    cat_ids: set[int] = set()
    for c in data["categories"]:
        cid = c.get("id") if isinstance(c, dict) else None
        if cid in cat_ids:
            problems.append(
                Problem("duplicate_category_id", str(ann_file), None, f"category id {cid} repeated")
            )
        elif cid is not None:
            cat_ids.add(cid)

    images: dict[int, dict[str, Any]] = {}
    files: dict[int, str] = {}
    for img in data["images"]:
        raw_id = img.get("id") if isinstance(img, dict) else None
        if not isinstance(img, dict) or not _is_int(raw_id) or not isinstance(img.get("file_name"), str):
            problems.append(
                Problem(
                    "bad_image_entry", str(ann_file), None, f"images entry {img!r:.120} lacks id/file_name"
                )
            )
            continue
        iid = int(raw_id)
        fname = os.path.join(images_dir, img["file_name"])
        if iid in images:
            problems.append(
                Problem("duplicate_image_id", fname, None, f"image id {iid} repeated", image_id=iid)
            )
            continue
        images[iid] = img
        files[iid] = fname
        w, h = img.get("width"), img.get("height")
        if not (_is_number(w) and _is_number(h) and w > 0 and h > 0):  # type: ignore[operator]
            problems.append(
                Problem(
                    "bad_image_entry",
                    fname,
                    None,
                    f"width/height {w!r}x{h!r} not positive numbers",
                    image_id=iid,
                )
            )

    bad_images = {p.image_id for p in problems if p.image_id is not None}
    if open_images:
        todo = [iid for iid in images if iid not in bad_images]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = pool.map(lambda i: _verify_image(files[i], deep), todo)
            for iid, (path, size, err) in zip(todo, results):
                if err == "missing":
                    problems.append(Problem("missing_image", path, None, "file not found", image_id=iid))
                elif err:
                    problems.append(Problem("unreadable_image", path, None, err, image_id=iid))
                elif size is not None and size != (images[iid]["width"], images[iid]["height"]):
                    problems.append(
                        Problem(
                            "size_mismatch",
                            path,
                            None,
                            f"image is {size[0]}x{size[1]}, JSON says {images[iid]['width']}x{images[iid]['height']}",
                            image_id=iid,
                        )
                    )
    else:
        for iid in images:
            if iid not in bad_images and not os.path.isfile(files[iid]):
                problems.append(Problem("missing_image", files[iid], None, "file not found", image_id=iid))

    seen_ids: set[Any] = set()
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            problems.append(
                Problem("bad_ann_id", str(ann_file), None, f"annotation #{k} is not an object", k)
            )
            continue
        aid = ann.get("id")
        raw_iid = ann.get("image_id")
        iid_or_none = int(raw_iid) if _is_int(raw_iid) else None
        fname = files.get(iid_or_none, str(ann_file)) if iid_or_none is not None else str(ann_file)

        def add(
            kind: str,
            message: str,
            aid: Any = aid,
            fname: str = fname,
            k: int = k,
            iid: int | None = iid_or_none,
        ) -> None:
            problems.append(Problem(kind, fname, aid, message, k, iid))

        if not _is_int(aid):
            add("bad_ann_id", f"annotation #{k} has id {aid!r}, not an integer")
        elif aid == 0:
            add("zero_ann_id", "annotation id 0 (pycocotools' matcher reads 0 as 'no match')")
        elif aid in seen_ids:
            add("duplicate_ann_id", f"annotation id {aid} used before")
        if _is_int(aid):
            seen_ids.add(aid)
        if iid_or_none is None or iid_or_none not in images:
            add("unknown_image", f"image_id {raw_iid!r} is not in 'images'")
        if ann.get("category_id") not in cat_ids:
            add("unknown_category", f"category_id {ann.get('category_id')!r} is not in 'categories'")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            add("bad_bbox", f"bbox {bbox!r:.80} is not four finite numbers [x, y, w, h]")
            continue
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            add("empty_box", f"bbox {bbox} has no area")
            continue
        img = images.get(iid_or_none) if iid_or_none is not None else None
        if img is not None and _is_number(img.get("width")) and _is_number(img.get("height")):
            W, H = img["width"], img["height"]
            t = BOX_TOLERANCE
            if x < -t or y < -t or x + w > W + t or y + h > H + t:
                add("box_outside", f"bbox {bbox} (x1={x + w:g}, y1={y + h:g}) outside the {W}x{H} image")
    return report


def check_dataset(
    images_dir: str | os.PathLike[str],
    ann_file: str | os.PathLike[str],
    *,
    open_images: bool = True,
    deep: bool = False,
) -> CheckReport:
    """Validate a COCO-format dataset: the annotation file and the images it names.

    Args:
        images_dir: folder that the ``file_name`` entries of the JSON are relative to.
        ann_file: the COCO instances JSON.
        open_images: open each image to check it decodes and has the size the JSON says.
        deep: fully decode each image rather than only verifying its header/chunks.

    Returns:
        A :class:`CheckReport`; a malformed or missing JSON gives a report with one
        ``malformed_json`` problem instead of an exception.
    """
    try:
        data = load_json(ann_file)
    except DatasetError as e:
        report = CheckReport(str(ann_file), str(images_dir))
        report.problems.append(Problem("malformed_json", str(ann_file), None, str(e)))
        return report
    return validate(data, images_dir, ann_file, open_images=open_images, deep=deep)


def find_splits(root: str | os.PathLike[str]) -> list[tuple[str, Path, Path]]:
    """The (split, images_dir, ann_file) triples of a COCO-style layout: every
    ``root/annotations/instances_<split>.json`` with its ``root/<split>/`` image folder (the layout of
    COCO 2017 and of ``hdet data synth``)."""
    root = Path(root)
    out = []
    for ann in sorted((root / "annotations").glob("instances_*.json")):
        split = ann.stem[len("instances_") :]
        out.append((split, root / split, ann))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``hdet data check DIR [--ann FILE] [--images DIR]``: exit 0 when clean, 1 on problems, 2 on usage errors."""
    parser = argparse.ArgumentParser(
        prog="hdet data check",
        description="Validate a COCO-format dataset: every annotations/instances_<split>.json of DIR against "
        "DIR/<split>/, or the one --ann file against --images.",
    )
    parser.add_argument("dir", nargs="?", help="dataset root (COCO 2017 or 'hdet data synth' layout)")
    parser.add_argument("--ann", help="one annotation file to check instead of DIR's splits")
    parser.add_argument(
        "--images", help="image folder of --ann (default: DIR, or the folder named like --ann's split)"
    )
    parser.add_argument(
        "--deep", action="store_true", help="fully decode every image (finds truncated files)"
    )
    parser.add_argument("--limit", type=int, default=50, help="problems listed per split (default 50)")
    args = parser.parse_args(list(argv) if argv is not None else None)

    jobs: list[tuple[str, Path, Path]]
    if args.ann:
        ann = Path(args.ann)
        if args.images:
            images = Path(args.images)
        elif args.dir:
            images = Path(args.dir)
        else:
            images = ann.parent.parent / ann.stem.removeprefix("instances_")
        jobs = [(ann.stem, images, ann)]
    elif args.dir:
        if not Path(args.dir).is_dir():
            print(f"hdet data check: dataset folder not found: {args.dir}", file=sys.stderr)
            return 2
        jobs = find_splits(args.dir)
        if not jobs:
            print(
                f"hdet data check: no annotation files {Path(args.dir) / 'annotations' / 'instances_*.json'}; "
                "pass --ann FILE",
                file=sys.stderr,
            )
            return 2
    else:
        parser.print_usage(sys.stderr)
        print("hdet data check: give DIR or --ann FILE", file=sys.stderr)
        return 2

    bad = False
    for split, images, ann in jobs:
        report = check_dataset(images, ann, deep=args.deep)
        print(f"[{split}] " + report.format(limit=args.limit))
        bad |= not report.ok
    return 1 if bad else 0
