"""``hdet eval``: evaluate a COCO results file against COCO-format ground truth.

Prints the COCO suite, the AP at each IoU threshold and per-class AP as a table, or with
``--json`` one JSON object: ``stats``, ``per_class``, ``ap_vs_iou`` (+ ``voc`` with ``--voc``,
+ ``consistency`` with ``--consistency``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from harmonic.eval.coco import STATS_KEYS, evaluate, load_detections, load_ground_truth
from harmonic.eval.voc import evaluate_voc

__all__ = ["main"]

_STATS_HELP = {
    "AP": "AP @ IoU 0.50:0.95",
    "AP50": "AP @ IoU 0.50",
    "AP75": "AP @ IoU 0.75",
    "APs": "AP small (area < 32^2)",
    "APm": "AP medium",
    "APl": "AP large (area > 96^2)",
    "AR1": "AR, maxDets 1",
    "AR10": "AR, maxDets 10",
    "AR100": "AR, maxDets 100",
    "ARs": "AR small",
    "ARm": "AR medium",
    "ARl": "AR large",
}


def _fmt(v: float) -> str:
    return "   n/a" if v < 0 else f"{v:6.4f}"


def format_table(result: dict[str, Any]) -> str:
    """Human-readable table of the JSON produced by ``hdet eval --json``."""
    lines = ["COCO box evaluation"]
    for k in STATS_KEYS:
        lines.append(f"  {k:<6} {_fmt(result['stats'][k])}   {_STATS_HELP[k]}")
    lines.append("")
    lines.append("AP at each IoU threshold")
    lines.append("  " + "  ".join(f"{t:>6}" for t in result["ap_vs_iou"]))
    lines.append("  " + "  ".join(_fmt(v) for v in result["ap_vs_iou"].values()))
    if "voc" in result:
        lines.append("")
        lines.append("VOC protocol (the paper's Table 1; COCO-style AP at IoU 0.50:0.10:0.90)")
        lines.append("  " + "  ".join(f"{k:>6}" for k in result["voc"]))
        lines.append("  " + "  ".join(_fmt(v) for v in result["voc"].values()))
    if "consistency" in result:
        c = result["consistency"]
        lines.append("")
        lines.append("Score/IoU consistency of the detections")
        for k, v in c.items():
            lines.append(f"  {k:<26} {v:.4f}" if isinstance(v, float) else f"  {k:<26} {v}")
    lines.append("")
    lines.append("Per-class AP @ IoU 0.50:0.95")
    width = max([len(n) for n in result["per_class"]] + [5])
    for name, v in result["per_class"].items():
        lines.append(f"  {name:<{width}} {_fmt(v)}")
    return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    """Undefined values (NaN) become ``null``: JSON has no NaN."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="hdet eval",
        description="Evaluate a COCO results file (list of {image_id, category_id, bbox, score}) "
        "against COCO-format ground truth. Numbers equal pycocotools' COCOeval, except that "
        'annotations with "ignore": 1 (VOC difficult) are ignored as VOC does.',
    )
    p.add_argument("--gt", required=True, help="COCO-format ground-truth JSON")
    p.add_argument("--dets", required=True, help="COCO results JSON")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--voc", action="store_true", help="add the paper's VOC protocol (AP50..AP90)")
    p.add_argument(
        "--consistency", action="store_true", help="add the score/IoU consistency report (AIC, Spearman)"
    )
    args = p.parse_args(argv)
    try:
        gt = load_ground_truth(args.gt)
        dets = load_detections(args.dets, gt)
        result: dict[str, Any] = evaluate(gt, dets).to_dict()
        if args.voc:
            result["voc"] = evaluate_voc(gt, dets)
        if args.consistency:
            from harmonic.analysis.consistency import consistency_report

            result["consistency"] = consistency_report(gt, dets)
    except (OSError, ValueError, TypeError) as e:
        print(f"hdet eval: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_json_safe(result), indent=2, allow_nan=False))
    else:
        print(format_table(result))
    return 0
