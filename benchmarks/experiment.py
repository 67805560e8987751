"""``hdet bench experiment``: how much of an experiment's wall time its trainings spend training.

A demo-shaped comparison (``configs/demo.yaml``'s detector, data, pretrained body and recipe, the
standard loss against the paper's defaults, no search) runs through :func:`workers.search.run_search`
on a local Ray, as ``hdet run`` runs it. Its efficiency is

    sum of its trainings' times alone / (its wall time x the trainings that can run at once)

where a training's time is its own work (every epoch's training and evaluation: the sum of its
``epoch_time_s``), measured for one seed of each arm run alone just before, and the trainings that
can run at once are the local Ray's CPUs over one training's. 1.0 means the experiment did nothing
but train, side by side, as fast as alone; what it loses is the fixed cost of each training (Ray
Train's processes, imports, the model's build), the trainings slowing each other on shared cores,
and the gaps between them. Each run prints its ratio; the summary gives their minimum, median and
maximum.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "comparison_spec", "training_times"]

DEMO_SPEC = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def comparison_spec(
    args: argparse.Namespace, root: Path, name: str, seeds: list[int], arms: tuple[str, ...]
) -> dict[str, Any]:
    """The demo's comparison on fewer images and epochs: ``arms`` of baseline / confirmatory.
    The baseline alone is the confirmatory arm of the standard loss (the same training: a spec
    must compare its own loss)."""
    import yaml

    if not DEMO_SPEC.is_file():
        raise SystemExit(f"hdet bench experiment: {DEMO_SPEC} not found (run it from the repository)")
    demo = yaml.safe_load(DEMO_SPEC.read_text())
    dataset = {**demo["dataset"], "root": str(root / "data"), "train": args.images}
    if args.image_size:
        dataset["image_size"] = args.image_size
    detector = {**demo["detector"], **({"image_size": args.image_size} if args.image_size else {})}
    return {
        "name": name,
        "dataset": dataset,
        "pretrain": demo["pretrain"],
        "detector": detector,
        "loss": {"kind": "standard"} if arms == ("baseline",) else demo["loss"],
        "eval": demo["eval"],
        "train": {**demo["train"], "epochs": args.epochs},
        "scaling": {**demo["scaling"], "cpus_per_worker": args.cpus_per_training, "max_failures": 0,
                    "trainer": getattr(args, "trainer", "auto")},
        "search": {"space": {}, "seeds": seeds, "baseline": "baseline" in arms and "confirmatory" in arms,
                   "confirmatory": True},
        "tracking": {"experiment": name},
    }  # fmt: skip


def training_times(tracking_uri: str, parent_run_id: str) -> dict[str, list[float]]:
    """arm -> each of its trainings' own time (the sum of its epochs' ``epoch_time_s``), from MLflow."""
    from workers.tracking import Tag, child_runs, client

    c = client(tracking_uri)
    runs = child_runs(c, c.get_run(parent_run_id).info.experiment_id, parent_run_id)
    out: dict[str, list[float]] = {}
    for run in runs:
        history = c.get_metric_history(run.info.run_id, "epoch_time_s")
        out.setdefault(run.data.tags.get(Tag.ARM, "?"), []).append(sum(m.value for m in history))
    return out


def _run(spec_dict: dict[str, Any], root: Path) -> tuple[float, dict[str, list[float]], Any, float]:
    """Run one comparison as ``hdet run`` does; its wall time, trainings' times, summary and start."""
    from workers.search import run_search
    from workers.spec import Spec
    from workers.tracking import open_parent_run
    from workers.training.weights import resolve_start_weights

    uri = f"sqlite:///{root / 'mlflow.db'}"
    spec = resolve_start_weights(Spec.parse(spec_dict), uri, say=lambda _: None)
    t0 = time.time()
    ctx = open_parent_run(spec, uri)
    summary = run_search(spec, ctx, str(root / "storage"), verbose=0, print_table=False)
    wall = time.time() - t0
    return wall, training_times(uri, ctx.parent_run_id), summary, t0


def _where(row: dict[str, Any], at_once: int) -> str:
    """Where the comparison's wall x trainings at once went: its trainings' epochs, their fixed
    costs inside their tasks (medians per training), the experiment's start and end, and the
    slots' idle time between trainings (tasks starting, returning, the search between them)."""
    c = row["costs"]
    if not c["fits"]:
        return "    where the time went: no marks (the local Ray was started before this benchmark)"
    cap = row["wall_s"] * at_once
    edges = (c["start_s"] + c["end_s"]) * at_once
    between = cap - c["occupied_s"] - edges
    per = ", ".join(f"{name} {s:.2f}" for name, s in c["per_training"].items())
    return (f"    where wall x {at_once} ({cap:.0f} s) went: epochs {c['epochs_s'] / cap:.0%}; fixed "
            f"costs in the trainings' tasks {c['fixed_s'] / cap:.0%} (medians of {c['fits']}, s: {per}); "
            f"the experiment's start {c['start_s']:.1f} s and end {c['end_s']:.1f} s, x {at_once}: "
            f"{edges / cap:.0%}; slots idle between trainings {between / cap:.0%}")  # fmt: skip


def _spread(values: list[float]) -> str:
    vals = sorted(v for v in values if v == v)
    if not vals:
        return "n/a"
    return f"median {statistics.median(vals):.3f} (min {vals[0]:.3f}, max {vals[-1]:.3f}, {len(vals)} runs)"


def main(argv: list[str] | None = None) -> int:
    """``hdet bench experiment``: the efficiency of a demo-shaped comparison, over ``--runs`` runs."""
    p = argparse.ArgumentParser(
        prog="hdet bench experiment",
        description="Efficiency of a demo-shaped comparison: its trainings' times alone / (wall x trainings at once).",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3: 6 trainings)")
    p.add_argument("--images", type=int, default=320, help="training images (default 320)")
    p.add_argument("--epochs", type=int, default=2, help="epochs (default 2)")
    p.add_argument("--image-size", type=int, help="image size (default: the demo's)")
    p.add_argument("--cpus-per-training", type=float, default=1.0)
    p.add_argument("--num-cpus", type=int, help="the local Ray's CPUs (default: this machine's cores)")
    p.add_argument("--runs", type=int, default=3, help="measurements (default 3)")
    p.add_argument(
        "--trainer",
        choices=("auto", "pooled", "ray_train"),
        default="auto",
        help="scaling.trainer of every training (default auto: pooled on CPU)",
    )
    p.add_argument("--json", help="write the numbers to this JSON file too")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.runs < 1 or args.epochs < 1 or args.images < 1:
        p.error("--seeds, --runs, --epochs and --images must be at least 1")

    from benchmarks import timeline
    from harmonic.data import build_dataset
    from workers.env import init_local_ray, local_ray_cpus, shutdown_local_ray
    from workers.pretrain import ensure_pretrained
    from workers.search.slots import warm_pool_for
    from workers.spec import Spec
    from workers.training import hooks as train_hooks

    cpus = local_ray_cpus(args.num_cpus, reserved=0.0, least=args.cpus_per_training)
    at_once = min(int(cpus // args.cpus_per_training), 2 * args.seeds)
    seeds = list(range(args.seeds))
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hdet-bench-experiment-") as tmp:
        root = Path(tmp)
        full = comparison_spec(args, root, "bench-experiment", seeds, ("baseline", "confirmatory"))
        parsed = Spec.parse(full)
        build_dataset(parsed.dataset.build_config(), "train")  # generated outside the timings
        if parsed.pretrain is not None:  # trained (or found in the cache) outside the timings too
            ensure_pretrained(parsed)
        d = parsed.dataset
        print(f"bench experiment: {args.seeds} seeds x 2 arms of {parsed.detector.arch} on {d.train} images of "
              f"{d.image_size} px, {args.epochs} epochs; local Ray of {cpus} CPUs, {args.cpus_per_training:g} per "
              f"training: {at_once} at once; trainer {args.trainer}", flush=True)  # fmt: skip
        started = False
        import ray

        marks_file = root / "timeline.jsonl"
        if not ray.is_initialized():
            # the trainings mark their phases (their processes inherit both variables from Ray)
            os.environ[timeline.ENV] = str(marks_file)
            with train_hooks.installed(timeline.HOOK):
                init_local_ray(num_cpus=cpus)
            started = True
            warm_pool_for(parsed, str(root / "storage"))  # as hdet run does
        try:
            for i in range(args.runs):
                alone: dict[str, float] = {}
                for arm in ("baseline", "confirmatory"):
                    one = comparison_spec(args, root, f"bench-alone-{arm}", [seeds[0]], (arm,))
                    _, times, _, _ = _run(one, root)
                    alone[arm] = times["confirmatory"][0]  # (the baseline alone: see comparison_spec)
                wall, times, summary, t0 = _run(full, root)
                n = {arm: len(v) for arm, v in times.items()}
                if n != {"baseline": args.seeds, "confirmatory": args.seeds} or not summary.complete:
                    raise SystemExit(f"hdet bench experiment: the comparison did not complete ({n})")
                sum_alone = sum(alone[arm] * args.seeds for arm in alone)
                sum_inside = sum(sum(v) for v in times.values())
                row = {
                    "wall_s": wall,
                    "alone_s": alone,
                    "sum_alone_s": sum_alone,
                    "sum_inside_s": sum_inside,
                    "efficiency": sum_alone / (wall * at_once),
                    "busy_share": sum_inside / (wall * at_once),
                    "slowdown_side_by_side": sum_inside / sum_alone,
                }
                row["costs"] = timeline.training_costs(timeline.read(marks_file), t0, t0 + wall)
                runs.append(row)
                print(f"  run {i + 1}: wall {wall:.1f} s; a training alone: baseline {alone['baseline']:.1f} s, "
                      f"HarmonicDet {alone['confirmatory']:.1f} s; trainings alone {sum_alone:.0f} s -> efficiency "
                      f"{row['efficiency']:.3f}; side by side they took {row['slowdown_side_by_side']:.2f}x their "
                      f"time alone and were busy {row['busy_share']:.0%} of wall x {at_once}", flush=True)  # fmt: skip
                print(_where(row, at_once), flush=True)
        finally:
            if started:
                shutdown_local_ray("hdet bench experiment")
                os.environ.pop(timeline.ENV, None)
    eff = [r["efficiency"] for r in runs]
    print(f"efficiency, trainings alone / (wall x {at_once}): {_spread(eff)} (goal >= 0.9)")
    print(f"side by side / alone, per training: {_spread([r['slowdown_side_by_side'] for r in runs])}")
    print(f"busy share of wall x {at_once}: {_spread([r['busy_share'] for r in runs])}")
    if args.json:
        out = {"trainer": args.trainer, "seeds": args.seeds, "images": args.images, "epochs": args.epochs, "cpus": cpus, "at_once": at_once,
               "runs": runs, "efficiency_median": statistics.median(eff), "host_cores": os.cpu_count()}  # fmt: skip
        Path(args.json).write_text(json.dumps(out, indent=2, default=lambda v: None if v != v else v))
    return 0 if all(math.isfinite(e) for e in eff) else 1
