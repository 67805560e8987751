"""``hdet predict``: draw a trained run's detections on images (and two runs side by side, paper Fig. 6).

``--run`` takes a training (child) run, or the parent run ``hdet run`` prints: for a parent, the
model is the best seed (highest final AP, on ``test`` when there is one) of the search's best
configuration, else of the confirmatory arm, else of any training run below it; the choice is
printed. Without ``--score-thresh`` each image shows what the model found: its detections scored
at least :data:`RELATIVE_THRESH` of its best one, :data:`TOP_K` at most. Images smaller than
:data:`DRAW_SIZE` are enlarged for drawing (the JSON keeps the image's own pixels).

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

from workers.tracking import Artifact, Tag

__all__ = ["LoadedModel", "load_checkpoint", "load_run", "resolve_model_run", "predict", "main"]

#: Without --score-thresh: detections scored >= this fraction of the image's best detection ...
RELATIVE_THRESH = 0.3
#: ... and at most this many per image.
TOP_K = 10
#: Images whose longer side is below this are enlarged (by a whole factor) for drawing.
DRAW_SIZE = 480
BEST_ARTIFACT_DIR = Artifact.CHECKPOINT_DIR
MODEL_FILE = Artifact.MODEL_FILE
MODEL_INFO_FILE = Artifact.MODEL_INFO_FILE


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
        anchor_scale=info.get("anchor_scale"),
    )
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval().to(device)
    return LoadedModel(model, info, str(path))


def _final_ap(run: Any) -> float:
    m = run.data.metrics
    return float(m.get("test_AP", m.get("AP", float("-inf"))))


def resolve_model_run(c: Any, run_id: str) -> tuple[str, str | None]:
    """The training run whose checkpoint ``run_id`` stands for, and why (None: ``run_id`` itself).

    A training run stands for itself. A parent run stands for the best seed of its best
    configuration (the search's ``hdet.best_trial_id``), else of its confirmatory arm, else of
    any finished training run below it.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    run = c.get_run(run_id)
    children = c.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run_id}'",
        max_results=1000,
    )
    if not children:
        return run_id, None
    finished = [r for r in children if r.info.status == "FINISHED"] or children
    best_trial = run.data.tags.get(Tag.BEST_TRIAL_ID)
    for label, pick in (
        (
            f"best configuration {best_trial}",
            lambda r: best_trial and r.data.tags.get(Tag.TRIAL_ID) == best_trial,
        ),
        ("confirmatory arm", lambda r: r.data.tags.get(Tag.ARM) == "confirmatory"),
        ("best training run", lambda r: True),
    ):
        group = [r for r in finished if pick(r)]
        if group:
            best = max(group, key=_final_ap)
            seed = best.data.tags.get(Tag.SEED)
            why = f"{label}, seed {seed}" if seed is not None else label
            return (
                best.info.run_id,
                f"{why}: run {best.info.run_name} ({best.info.run_id}), AP {_final_ap(best):.3f}",
            )
    return run_id, None


def load_run(run_id: str, tracking_uri: str | None = None, device: str = "cpu") -> LoadedModel:
    """Download a run's best checkpoint from MLflow and load it (see :func:`load_checkpoint`);
    a parent run's model is chosen by :func:`resolve_model_run`."""
    from workers.tracking import client, resolve_tracking_uri

    c = client(resolve_tracking_uri(None, tracking_uri))
    model_run, why = resolve_model_run(c, run_id)
    if why:
        print(f"run {run_id} is an experiment's parent run; using its {why}")
    run = c.get_run(model_run)
    # the download lives only while it loads: the model is in memory afterwards
    with tempfile.TemporaryDirectory(prefix="hdet-ckpt-") as dst:
        try:
            local = c.download_artifacts(model_run, BEST_ARTIFACT_DIR, dst)
        except Exception as e:
            raise FileNotFoundError(f"run {model_run} has no {BEST_ARTIFACT_DIR}/ artifact ({e})") from None
        loaded = load_checkpoint(local, device)
    loaded.info["run_name"] = run.info.run_name
    loaded.info["run_id"] = model_run
    loaded.source = f"run {model_run}"
    return loaded


@torch.no_grad()
def predict(loaded: LoadedModel, image: Tensor, score_thresh: float | None = None) -> list[dict[str, Any]]:
    """Detections of one ``[3, H, W]`` image in [0, 1], best first: those with ``score >=
    score_thresh``, or with None what the model found (>= :data:`RELATIVE_THRESH` of the best
    score, :data:`TOP_K` at most)."""
    device = next(loaded.model.parameters()).device
    out = loaded.model([image.to(device)])[0]
    scores = out["scores"].tolist()
    if score_thresh is None:
        top = max(scores, default=0.0)
        keep = sorted(range(len(scores)), key=lambda i: -scores[i])[:TOP_K]
        keep = [i for i in keep if scores[i] >= RELATIVE_THRESH * top]
    else:
        keep = [i for i, s in enumerate(scores) if s >= score_thresh]
    dets = []
    for i in keep:
        box, score, label = out["boxes"][i].tolist(), scores[i], int(out["labels"][i])
        name, cat_id = loaded.category(int(label))
        dets.append(
            {"box": [round(v, 2) for v in box], "score": round(float(score), 4), "label": int(label),
             "category": name, "category_id": cat_id}
        )  # fmt: skip
    return sorted(dets, key=lambda d: -d["score"])


def draw(image: Tensor, dets: list[dict[str, Any]], title: str | None = None) -> Tensor:
    """The image (uint8) with the detections drawn and labelled ``category score``; an image smaller
    than :data:`DRAW_SIZE` is enlarged by a whole factor first, so boxes and labels stay readable."""
    from torchvision.utils import draw_bounding_boxes

    factor = max(1, DRAW_SIZE // max(image.shape[1:]))
    if factor > 1:
        image = torch.nn.functional.interpolate(image[None], scale_factor=factor, mode="nearest")[0]
    img = (image.clamp(0, 1) * 255).to(torch.uint8)
    if dets:
        boxes = torch.tensor([d["box"] for d in dets], dtype=torch.float32) * factor
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
    src.add_argument(
        "--run",
        metavar="RUN_ID",
        help="MLflow run whose best checkpoint to use: a training run, or the parent run hdet run prints",
    )
    src.add_argument(
        "--checkpoint", metavar="PATH", help="folder with model.pt + model.json (or the model.pt file)"
    )
    p.add_argument("--compare", metavar="RUN_ID", help="a second run, drawn side by side (paper Fig. 6)")
    p.add_argument("--compare-checkpoint", metavar="PATH", help="a second checkpoint, drawn side by side")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: local store)")
    p.add_argument("--out", default="predictions", help="output folder (default: ./predictions)")
    p.add_argument(
        "--score-thresh",
        type=float,
        default=None,
        help=(
            f"minimum score drawn and listed (default: what the model found, i.e. >= {RELATIVE_THRESH} x the "
            f"image's best score, {TOP_K} at most)"
        ),
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from harmonic.data.coco import load_image

    if args.score_thresh is not None and not 0 <= args.score_thresh <= 1:
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
