"""``hdet predict``: draw a trained run's detections on images (and two runs side by side, paper Fig. 6).

The model is a plain torchvision detector: the checkpoint a run logs to MLflow (``checkpoint/``:
``model.pt``, a torchvision ``state_dict``, and ``model.json``, its arch, classes, backbone and
image size) loads strictly into :func:`harmonic.detectors.build_torchvision_detector`. Nothing of
the training loss is needed to use it.

For each image, ``OUT/<name>.png`` has the boxes drawn and ``OUT/<name>.json`` lists the
detections (``box`` x1 y1 x2 y2 in pixels, ``score``, ``label``, ``category``, ``category_id``).
With ``--compare``, ``OUT/<name>.compare.png`` holds both runs' drawings side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from workers.train import BEST_ARTIFACT_DIR, MODEL_FILE, MODEL_INFO_FILE

__all__ = ["LoadedModel", "load_checkpoint", "load_run", "predict", "main"]


@dataclass
class LoadedModel:
    """A plain torchvision detector in eval mode and what its checkpoint says about it."""

    model: nn.Module
    info: dict[str, Any]
    source: str

    @property
    def name(self) -> str:
        return str(self.info.get("run_name") or self.source)

    def category(self, label: int) -> tuple[str, int | None]:
        cats = self.info.get("categories") or []
        name = cats[label - 1] if 0 < label <= len(cats) else str(label)
        cat_id = (self.info.get("label_to_cat_id") or {}).get(str(label))
        return name, (int(cat_id) if cat_id is not None else None)


def load_checkpoint(path: str | Path, device: str = "cpu") -> LoadedModel:
    """Load ``model.pt`` + ``model.json`` (a folder holding both, or the ``model.pt`` file) strictly.

    Raises:
        FileNotFoundError: naming the missing file.
    """
    from harmonic.detectors import build_torchvision_detector

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    weights = p if p.is_file() else folder / MODEL_FILE
    info_file = folder / MODEL_INFO_FILE
    for f in (weights, info_file):
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint file {f} does not exist")
    info = json.loads(info_file.read_text())
    model = build_torchvision_detector(
        info["arch"],
        int(info["num_classes"]),
        backbone=info.get("backbone"),
        image_size=int(info["image_size"]),
    )
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval().to(device)
    return LoadedModel(model, info, str(path))


def load_run(run_id: str, tracking_uri: str | None = None, device: str = "cpu") -> LoadedModel:
    """Download a run's best checkpoint from MLflow and load it (see :func:`load_checkpoint`)."""
    from workers.tracking import client, resolve_tracking_uri

    c = client(resolve_tracking_uri(None, tracking_uri))
    run = c.get_run(run_id)
    dst = Path(tempfile.mkdtemp(prefix="hdet-ckpt-"))
    try:
        local = c.download_artifacts(run_id, BEST_ARTIFACT_DIR, str(dst))
    except Exception as e:
        raise FileNotFoundError(f"run {run_id} has no {BEST_ARTIFACT_DIR}/ artifact ({e})") from None
    loaded = load_checkpoint(local, device)
    loaded.info["run_name"] = run.info.run_name
    loaded.info["run_id"] = run_id
    loaded.source = f"run {run_id}"
    return loaded


@torch.no_grad()
def predict(loaded: LoadedModel, image: Tensor, score_thresh: float) -> list[dict[str, Any]]:
    """Detections of one ``[3, H, W]`` image in [0, 1] with ``score >= score_thresh``, best first."""
    device = next(loaded.model.parameters()).device
    out = loaded.model([image.to(device)])[0]
    dets = []
    for box, score, label in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
        if score < score_thresh:
            continue
        name, cat_id = loaded.category(int(label))
        dets.append(
            {"box": [round(v, 2) for v in box], "score": round(float(score), 4), "label": int(label),
             "category": name, "category_id": cat_id}
        )  # fmt: skip
    return sorted(dets, key=lambda d: -d["score"])


def draw(image: Tensor, dets: list[dict[str, Any]], title: str | None = None) -> Tensor:
    """The image (uint8) with the detections drawn and labelled ``category score``."""
    from torchvision.utils import draw_bounding_boxes

    img = (image.clamp(0, 1) * 255).to(torch.uint8)
    if dets:
        boxes = torch.tensor([d["box"] for d in dets], dtype=torch.float32)
        labels = [f"{d['category']} {d['score']:.2f}" for d in dets]
        palette = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"]
        colors = [palette[d["label"] % len(palette)] for d in dets]
        img = draw_bounding_boxes(img, boxes, labels=labels, colors=colors, width=2)
    if title:
        img = _with_title(img, title)
    return img


def _with_title(img: Tensor, title: str) -> Tensor:
    import numpy as np
    from PIL import Image, ImageDraw

    h, w = img.shape[1:]
    canvas = Image.new("RGB", (w, h + 16), "white")
    canvas.paste(Image.fromarray(img.permute(1, 2, 0).numpy()), (0, 16))
    ImageDraw.Draw(canvas).text((2, 2), title[: max(8, w // 6)], fill="black")
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).contiguous()


def side_by_side(a: Tensor, b: Tensor, gap: int = 8) -> Tensor:
    h = max(a.shape[1], b.shape[1])
    out = torch.full((3, h, a.shape[2] + gap + b.shape[2]), 255, dtype=torch.uint8)
    out[:, : a.shape[1], : a.shape[2]] = a
    out[:, : b.shape[1], a.shape[2] + gap :] = b
    return out


def _save_png(img: Tensor, path: Path) -> None:
    from torchvision.io import write_png

    write_png(img.contiguous(), str(path))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hdet predict", description="Draw a run's or checkpoint's detections on images."
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="RUN_ID", help="MLflow run whose best checkpoint to use")
    src.add_argument(
        "--checkpoint", metavar="PATH", help="folder with model.pt + model.json (or the model.pt file)"
    )
    p.add_argument("--compare", metavar="RUN_ID", help="a second run, drawn side by side (paper Fig. 6)")
    p.add_argument("--compare-checkpoint", metavar="PATH", help="a second checkpoint, drawn side by side")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: local store)")
    p.add_argument("--out", default="predictions", help="output folder (default: ./predictions)")
    p.add_argument(
        "--score-thresh", type=float, default=0.5, help="minimum score drawn and listed (default 0.5)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from harmonic.data.coco import load_image

    if not 0 <= args.score_thresh <= 1:
        print(f"hdet predict: --score-thresh must lie in [0, 1], got {args.score_thresh}", file=sys.stderr)
        return 2
    missing = [im for im in args.images if not Path(im).is_file()]
    if missing:
        print(f"hdet predict: image(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        models = [
            load_run(args.run, args.tracking_uri, args.device)
            if args.run
            else load_checkpoint(args.checkpoint, args.device)
        ]
        if args.compare:
            models.append(load_run(args.compare, args.tracking_uri, args.device))
        elif args.compare_checkpoint:
            models.append(load_checkpoint(args.compare_checkpoint, args.device))
    except Exception as e:  # a missing run/artifact/file: one clear line
        print(f"hdet predict: cannot load the model: {e}", file=sys.stderr)
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        image = load_image(path)
        stem = Path(path).stem
        record: dict[str, Any] = {
            "image": str(path),
            "height": int(image.shape[1]),
            "width": int(image.shape[2]),
        }
        drawings = []
        for i, m in enumerate(models):
            dets = predict(m, image, args.score_thresh)
            key = "detections" if i == 0 else "compare_detections"
            record[key] = dets
            record["model" if i == 0 else "compare_model"] = {
                k: m.info.get(k) for k in ("run_id", "run_name", "arch", "loss", "epoch", "AP")
            }
            drawings.append(
                draw(image, dets, title=f"{m.info.get('loss', '')} {m.name}" if len(models) > 1 else None)
            )
        _save_png(drawings[0], out / f"{stem}.png")
        if len(drawings) > 1:
            _save_png(side_by_side(drawings[0], drawings[1]), out / f"{stem}.compare.png")
        (out / f"{stem}.json").write_text(json.dumps(record, indent=2))
        n = ", ".join(str(len(record[k])) for k in ("detections", "compare_detections") if k in record)
        print(f"{path}: {n} detection(s) -> {out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
