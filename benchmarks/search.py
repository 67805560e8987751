"""``hdet bench search``: ASHA + TPE against grid search for the same number of configurations,
and the fixed cost of a trial (its start to its first training step) with where it goes.
(``hdet bench train`` lives in :mod:`benchmarks.train`.)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["search_main"]

#: ``hdet bench search --regime``: what differs between the two regimes (each flag overrides its value).
SEARCH_REGIMES: dict[str, dict[str, Any]] = {
    # the demo's detector, data, pretrained body and recipe (configs/demo.yaml), on fewer images, with a
    # 3x3 grid: the regime the demo's and the benchmark's verdicts come from
    "pretrained": {"arch": "ssdlite", "backbone": None, "images": 320, "val_images": 100, "image_size": 128,
                   "batch_size": 8, "lr": 0.001, "epochs": 6, "side": 3, "grace_period": 1, "reduction_factor": 3},
    # FCOS from scratch on tiny images: cheap, for the fixed cost of a trial (AP 2-3: the ratio is noise)
    "scratch": {"arch": "fcos", "backbone": "resnet18_fpn", "images": 128, "val_images": 32, "image_size": 64,
                "batch_size": 8, "lr": 0.003, "epochs": 6, "side": 2, "grace_period": 2, "reduction_factor": 2},
}  # fmt: skip

DEMO_SPEC = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _search_bench_spec(
    args: argparse.Namespace, root: Path, name: str, search: dict[str, Any]
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "dataset": {"format": "synthetic", "root": str(root / "data"), "train": args.images, "val": args.val_images,
                    "image_size": args.image_size, "seed": 0,
                    "synth": {"max_objects": 2, "min_scale": 0.25, "max_scale": 0.45, "clutter": 0, "occlusion": 0.2,
                              "tail_prob": 0.0}},
        "detector": {"arch": args.arch, "backbone": args.backbone, "image_size": args.image_size},
        "loss": {"kind": "harmonicdet"},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "optimizer": "adamw", "lr": args.lr,
                  "weight_decay": 1e-4, "schedule": "cosine", "warmup": {"iters": 12, "factor": 0.01},
                  "clip_grad_norm": 10.0},
        "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": args.cpus_per_trainer, "max_failures": 0},
        "search": {"seeds": args.seeds, "baseline": False, "max_concurrent": args.max_concurrent, **search},
        "tracking": {"experiment": name},
    }  # fmt: skip
    if args.regime == "pretrained":
        import yaml

        if not DEMO_SPEC.is_file():
            raise SystemExit(
                f"hdet bench search --regime pretrained: {DEMO_SPEC} not found (run it from the repository)"
            )
        demo = yaml.safe_load(DEMO_SPEC.read_text())
        # the demo's images, pretraining (the same definition: its cached body), evaluation and recipe
        spec["dataset"]["synth"] = demo["dataset"]["synth"]
        spec["pretrain"] = demo["pretrain"]
        spec["eval"] = demo["eval"]
        spec["train"] = {**demo["train"], "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr}
    return spec


def _bench_one_search(spec_dict: dict[str, Any], root: Path) -> Any:
    from workers.search import run_search
    from workers.spec import Spec
    from workers.tracking import open_parent_run
    from workers.training.weights import resolve_start_weights

    uri = f"sqlite:///{root / 'mlflow.db'}"
    spec = resolve_start_weights(Spec.parse(spec_dict), uri, say=lambda _: None)
    ctx = open_parent_run(spec, uri)
    return run_search(spec, ctx, str(root / "storage"), verbose=0, print_table=False)


def _median(values: list[float]) -> float:

    vals = [v for v in values if v == v]
    return statistics.median(vals) if vals else float("nan")


def search_main(argv: list[str]) -> int:
    """``hdet bench search``: ASHA + TPE against grid search for the same number of configurations,
    and the fixed cost of a trial (its start to its first training step).

    Grid search trains every configuration of a ``side x side`` grid over alpha and gamma for the
    full schedule (FIFO); ASHA + TPE (Optuna) samples as many configurations from the ranges that
    hold the grid and stops the weak ones early. Printed: the best AP each reached (seed mean),
    the epochs each trained, their ratios, and the fixed cost of a trial with where it goes
    (median over every training run, from :mod:`benchmarks.timeline`).
    """
    p = argparse.ArgumentParser(
        prog="hdet bench search", description="ASHA + TPE against grid search, and the fixed cost of a trial."
    )
    p.add_argument(
        "--regime", choices=sorted(SEARCH_REGIMES), default="pretrained",
        help="pretrained: the demo's SSDlite with its pretrained body (default); scratch: FCOS from scratch, 64 px",
    )  # fmt: skip
    p.add_argument("--arch")
    p.add_argument("--backbone")
    p.add_argument("--images", type=int, help="training images")
    p.add_argument("--val-images", type=int, help="validation images (the searches rank on them)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--side", type=int, help="grid side: side x side configurations")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--grace-period", type=int, help="ASHA's grace period in epochs")
    p.add_argument("--reduction-factor", type=int, help="ASHA's reduction factor")
    p.add_argument("--cpus-per-trainer", type=float, default=1.0)
    p.add_argument("--json", help="write the numbers to this JSON file too")
    args = p.parse_args(argv)
    for key, value in SEARCH_REGIMES[args.regime].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    import json

    import numpy as np
    import ray

    from benchmarks import timeline
    from harmonic.data import build_dataset
    from workers.env import init_local_ray, shutdown_local_ray
    from workers.search import required_cpus
    from workers.spec import Spec
    from workers.training import hooks as train_hooks

    alphas = [round(float(a), 3) for a in np.linspace(0.5, 2.5, args.side)]
    gammas = [round(float(g), 3) for g in np.linspace(0.2, 1.0, args.side)]
    n_configs = args.side * args.side
    out: dict[str, Any] = {
        "regime": args.regime,
        "configs": n_configs,
        "epochs": args.epochs,
        "seeds": args.seeds,
    }
    with tempfile.TemporaryDirectory(prefix="hdet-bench-search-") as tmp:
        root = Path(tmp)
        grid = _search_bench_spec(args, root, "bench-grid", {
            "space": {"alpha": {"grid": alphas}, "gamma": {"grid": gammas}}, "algorithm": "grid", "scheduler": "fifo",
        })  # fmt: skip
        tpe = _search_bench_spec(args, root, "bench-asha-tpe", {
            "space": {"alpha": {"uniform": [alphas[0], alphas[-1]]}, "gamma": {"uniform": [gammas[0], gammas[-1]]}},
            "algorithm": "optuna", "scheduler": "asha", "num_samples": n_configs, "grace_period": args.grace_period,
            "reduction_factor": args.reduction_factor,
        })  # fmt: skip
        build_dataset(Spec.parse(grid).dataset.build_config(), "train")  # generated outside the timings
        if args.regime == "pretrained":  # trained (or found in the cache) outside the timings too
            from workers.pretrain import ensure_pretrained

            ensure_pretrained(Spec.parse(grid))
        # Every process of the local Ray inherits it: where each trial's start-up time goes.
        os.environ[timeline.ENV] = str(root / "timeline.jsonl")
        print(f"bench search ({args.regime}): {n_configs} configurations x {len(args.seeds)} seed(s), {args.epochs} "
              f"epochs, {args.arch}/{args.backbone} on {args.images} images of {args.image_size}px, ASHA grace "
              f"{args.grace_period} reduction {args.reduction_factor}", flush=True)  # fmt: skip
        started = not ray.is_initialized()
        need = max(required_cpus(Spec.parse(spec)) for spec in (grid, tpe))
        with train_hooks.installed(timeline.HOOK):  # the workers mark their phases
            init_local_ray(num_cpus=max(os.cpu_count() or 1, math.ceil(need - 1e-9)))
        try:
            runs = {}
            for label, spec in (("grid", grid), ("asha_tpe", tpe)):
                t0 = time.time()
                summary = _bench_one_search(spec, root)
                best = summary.best
                runs[label] = {
                    "best_AP": best.objective if best else float("nan"),
                    "epochs_used": sum(t.epochs_run for t in summary.trials),
                    "wall_s": time.time() - t0,
                    "trial_start_s": [t.first_step_s for t in summary.trials],
                    "statuses": [t.status for t in summary.trials],
                }
                r = runs[label]
                print(f"  {label:<9} best AP {100 * r['best_AP']:.2f}  epochs {r['epochs_used']}  "
                      f"wall {r['wall_s']:.0f} s  trial start (median) {_median(r['trial_start_s']):.1f} s  "
                      f"{r['statuses']}", flush=True)  # fmt: skip
        finally:
            if started:
                shutdown_local_ray("hdet bench search")
        phases = timeline.phases(timeline.read(root / "timeline.jsonl"))
        os.environ.pop(timeline.ENV, None)
    out.update(runs)
    g, a = runs["grid"], runs["asha_tpe"]
    starts = g["trial_start_s"] + a["trial_start_s"]
    out["trial_start_median_s"] = _median(starts)
    out["phases"] = phases
    out["phase_medians_s"] = {k: _median([p[k] for p in phases]) for k in (phases[0] if phases else {})}
    print(f"best AP, ASHA+TPE / grid: {a['best_AP'] / g['best_AP'] if g['best_AP'] else float('nan'):.3f}  "
          f"(epochs used: {a['epochs_used']} / {g['epochs_used']} = {a['epochs_used'] / max(1, g['epochs_used']):.2f})")  # fmt: skip
    out["ap_diff_points"] = 100 * (a["best_AP"] - g["best_AP"])
    out["epochs_share"] = a["epochs_used"] / max(1, g["epochs_used"])
    print(f"best AP, ASHA+TPE - grid: {out['ap_diff_points']:+.2f} points with {out['epochs_share']:.0%} of the epochs "
          f"(goal: >= -0.5 points with <= 40%; one seed's best of {n_configs} configurations each, on the val split)")  # fmt: skip
    if phases:
        med = out["phase_medians_s"]
        print(f"where a trial's start goes (median of {len(phases)} training runs, s): "
              + ", ".join(f"{k} {v:.2f}" for k, v in med.items() if k != "total"))  # fmt: skip
        print(f"fixed cost of a trial (Tune starts it -> its first training step), median of {len(phases)}: "
              f"{med['total']:.1f} s (target <= 10 s)")  # fmt: skip
    print(f"  as the trials record it (trial function called -> first step, an upper bound: the first "
          f"epoch's start, seen from its report), median of {len(starts)}: {out['trial_start_median_s']:.1f} s")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0
