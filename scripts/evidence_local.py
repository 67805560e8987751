"""Run the comparisons of an evidence suite in plain processes on one machine, a GPU when it has one,
without Ray or MLflow, and print their evidence tables.

    python scripts/evidence_local.py configs/evidence-gpu.yaml --jobs 12 --out results.jsonl
    python scripts/evidence_local.py --report results.jsonl

For every document of the suite (a spec with ``search.baseline`` and ``search.confirmatory``), every
training of its comparison, the baseline (``loss.kind: standard``) and the confirmatory arm (the spec's
own ``loss``) on each seed of ``search.seeds``, runs in a process of its own with what a Ray Train worker
uses: the spec's recipe (:mod:`workers.recipe`), the epoch of :func:`workers.epoch_metrics.train_epoch`
(mixed precision by ``train.amp``, non-finite losses stop the training), and the metrics of
:func:`harmonic.analysis.suite.detection_metrics` on the held-out ``test`` split. ``--jobs`` trainings
run at once (on a GPU they share it). Before them, the generated datasets and the ``pretrain``
sections are made (in parallel, cached in ``$HDET_HOME`` as ``hdet run`` caches them).

Every finished training appends one JSON line to ``--out``: an interrupted run keeps what finished and
a rerun with the same ``--out`` trains only what is missing. The tables (``--report``, also printed at
the end) are :func:`workers.evidence.compare_metrics`'s on the test metrics, paired by seed and
Holm-corrected across AP, AP50, AP75, AP90 and AIC, printed as ``hdet run`` prints a comparison.

``--set path=value`` (repeatable) overrides every document (``--set train.epochs=2``); the value is
read as YAML.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.search.runner import FIXED_ARMS  # noqa: E402 - the arms hdet run trains (no Ray imported)

if TYPE_CHECKING:
    from workers.spec import Spec
METRICS = ("AP", "AP50", "AP75", "AP90", "aic")
#: per-epoch training metrics kept in a training's line (the mechanism of the loss).
HISTORY_KEYS = (
    "loss", "train_aic", "train_pushed_down_share", "train_pushed_down_mean_score",
    "train_mean_score", "images_per_s", "step_time_s",
)  # fmt: skip


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here")
    return name


def _key(spec_name: str, arm: str, seed: int) -> str:
    return f"{spec_name}/{arm}/seed{seed}"


def _make_data(cfg: dict[str, Any], jobs: int) -> str:
    """Generate (or find) one synthetic set in ``jobs`` processes; its root."""
    from harmonic.data.factory import ensure_synthetic

    return str(ensure_synthetic(cfg, jobs=jobs))


def _pretrain(spec_data: dict[str, Any], device: str, data_workers: int) -> str:
    from workers.pretrain import ensure_pretrained
    from workers.spec import Spec

    spec = Spec.parse(spec_data, check_paths=False)
    done = ensure_pretrained(
        spec, say=lambda line: print(line, flush=True), device=device, data_workers=data_workers
    )
    return str(done.path)


def train_one(
    spec_data: dict[str, Any], arm: str, seed: int, device_name: str, threads: int
) -> dict[str, Any]:
    """One training of a comparison, in this process; its line for ``--out``."""
    import torch

    from harmonic.analysis.suite import detection_metrics
    from harmonic.detectors import pop_diagnostics
    from workers import recipe
    from workers.epoch_metrics import evaluate_shard, train_epoch, train_metrics
    from workers.errors import NonFiniteLossError
    from workers.spec import Spec
    from workers.train_state import TrainParts

    torch.set_num_threads(threads)
    base = Spec.parse(spec_data, check_paths=False)
    spec = base.with_overrides({**FIXED_ARMS[arm], "train.seed": seed}, check_paths=False)
    t = spec.train
    line: dict[str, Any] = {
        "key": _key(base.name, arm, seed), "spec": base.name, "arch": spec.detector.arch, "arm": arm,
        "seed": seed, "device": device_name,
    }  # fmt: skip
    t_start = time.perf_counter()
    recipe.seed_everything(seed)
    device = torch.device(device_name)
    dtype = recipe.amp_dtype(spec, device.type)
    amp = str(dtype).removeprefix("torch.") if dtype is not None else False  # fp16 / bf16, as recorded
    data = recipe.build_datasets(spec)
    if data.test is None:
        raise SystemExit(f"{base.name}: the dataset has no test split to judge on")
    model = recipe.build_model(spec, data.num_classes).to(device)
    train = recipe.train_loader(
        data.train, batch_size=t.batch_size, aspect_ratio_groups=t.aspect_ratio_groups, seed=seed,
        data_workers=t.data_workers, pin_memory=device.type == "cuda",
        resample=t.resample, resample_fraction=t.resample_fraction,
    )  # fmt: skip
    optimizer = recipe.make_optimizer(model, spec)
    scheduler = recipe.make_scheduler(optimizer, spec, train.iters_per_epoch)
    parts = TrainParts(model, optimizer, scheduler, recipe.grad_scaler(device.type, dtype))
    history: list[dict[str, float]] = []
    try:
        for epoch in range(1, t.epochs + 1):
            t0 = time.perf_counter()
            train.sampler.set_epoch(epoch)
            model.train()
            stats = train_epoch(
                model, train.loader, parts, device, spec, epoch=epoch, rank=0,
                iters_per_epoch=train.iters_per_epoch, use_amp=dtype is not None, amp_dtype=dtype,
                pop_diagnostics=pop_diagnostics,
            )  # fmt: skip
            m = train_metrics([stats], time.perf_counter() - t0)
            history.append({"epoch": epoch, **{k: float(m[k]) for k in HISTORY_KEYS if k in m}})
    except NonFiniteLossError as e:
        return {**line, "status": "failed", "error": str(e), "history": history}
    train_s = time.perf_counter() - t_start
    loader = recipe.eval_loader(data.test, batch_size=t.batch_size, data_workers=t.data_workers)
    dets = evaluate_shard(model, loader, device, data.test.label_to_cat_id, with_pre_nms=False).dets
    metrics = detection_metrics(data.test, dets, spec.dataset.format == "voc")
    return {
        **line, "status": "completed", "amp": amp, "train_s": round(train_s, 1),
        "total_s": round(time.perf_counter() - t_start, 1),
        "test": {k: v for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)},
        "history": history,
    }  # fmt: skip


def _read(path: Path) -> dict[str, dict[str, Any]]:
    """key -> line, the last line of a key winning (a failed training retried)."""
    out: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for raw in path.read_text().splitlines():
            if raw.strip():
                line = json.loads(raw)
                out[line["key"]] = line
    return out


def report(lines: Iterable[dict[str, Any]]) -> str:
    """The evidence table of every suite document in ``lines`` (completed trainings only)."""
    from workers.evidence import compare_metrics
    from workers.report.text import comparison_lines

    by_spec: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
    info: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    for line in lines:
        if line.get("status") != "completed":
            failed.append(f"{line['key']}: {line.get('error', line.get('status'))}")
            continue
        by_spec.setdefault(line["spec"], {}).setdefault(line["arm"], {})[line["seed"]] = line["test"]
        info.setdefault(
            line["spec"], {"arch": line["arch"], "device": line["device"], "amp": line.get("amp"), "s": []}
        )
        info[line["spec"]]["s"].append(line["train_s"])
    out: list[str] = []
    for name, arms in by_spec.items():
        base, conf = arms.get("baseline", {}), arms.get("confirmatory", {})
        seeds = sorted(set(base) & set(conf))
        i = info[name]
        out.append(
            f"{name} ({i['arch']}, {i['device']}, amp {i['amp']}): HarmonicDet (paper defaults) vs baseline "
            f"(standard loss) on the test split, paired over seeds {seeds}; training "
            f"{min(i['s']):.0f}-{max(i['s']):.0f} s each"
        )
        if len(seeds) < 2:
            out.append("  fewer than 2 paired seeds: no comparison")
            continue
        table = compare_metrics(conf, base, METRICS)
        out.extend(comparison_lines(table, "HarmonicDet", "HarmonicDet (paper defaults)", "AP"))
        out.append("")
    if failed:
        out.append("failed trainings:")
        out.extend(f"  {f}" for f in failed)
    return "\n".join(out)


def _documents(path: str, sets: list[str]) -> list[Spec]:
    import yaml

    from workers.spec import Spec

    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    overrides = {}
    for item in sets:
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected path=value")
        overrides[k] = yaml.safe_load(v)
    out = []
    for d in docs:
        spec = Spec.parse(d)
        if overrides:
            spec = spec.with_overrides(overrides)
        if spec.search is None or not (spec.search.baseline and spec.search.confirmatory):
            raise SystemExit(f"{spec.name}: needs search.baseline and search.confirmatory")
        out.append(spec)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("suite", nargs="?", help="an evidence suite (YAML, one or more documents)")
    p.add_argument("--out", default="evidence-local.jsonl", help="the trainings' lines (appended)")
    p.add_argument("--report", metavar="JSONL", help="print the tables of these lines and stop")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--jobs", type=int, default=1, help="trainings at once")
    p.add_argument("--threads", type=int, help="torch threads per training (default: cores / jobs)")
    p.add_argument("--data-workers", type=int, default=0, help="loader processes of a pretraining")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these documents (by name)")
    args = p.parse_args(argv)
    if args.report:
        print(report(_read(Path(args.report)).values()))
        return 0
    if not args.suite:
        p.error("a suite, or --report")
    specs = _documents(args.suite, args.set)
    if args.only:
        unknown = set(args.only) - {s.name for s in specs}
        if unknown:
            p.error(f"--only: no document named {', '.join(sorted(unknown))}")
        specs = [s for s in specs if s.name in args.only]
    device = _device(args.device)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    out = Path(args.out)
    done = {k for k, v in _read(out).items() if v.get("status") == "completed"}
    import multiprocessing

    from workers.pretrain import pretrain_key

    ctx = multiprocessing.get_context("spawn")
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        sets: dict[str, dict[str, Any]] = {}
        for s in specs:
            cfg = s.dataset.build_config()
            if s.dataset.format == "synthetic":
                sets[str(cfg["root"])] = cfg
            if s.pretrain is not None:
                pcfg = s.pretrain.dataset_spec(s.pretrain_image_size()).build_config()
                sets[str(pcfg["root"])] = pcfg
        cores = os.cpu_count() or 1
        for made in [pool.submit(_make_data, cfg, max(1, cores // len(sets))) for cfg in sets.values()]:
            made.result()
        print(f"datasets ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        keys: dict[str, Spec] = {}
        for s in specs:
            if s.pretrain is not None:
                keys.setdefault(pretrain_key(s), s)
        paths = {
            k: pool.submit(_pretrain, s.model_dump(mode="json"), device, args.data_workers)
            for k, s in keys.items()
        }
        docs = [
            s.with_overrides(
                {"detector.pretrained_backbone": paths[pretrain_key(s)].result()}, check_paths=False
            )
            if s.pretrain is not None
            else s
            for s in specs
        ]
        print(f"pretrained bodies ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        todo = [
            (d, arm, seed)
            for d in docs
            for seed in d.search.seeds  # type: ignore[union-attr]
            for arm in FIXED_ARMS
            if _key(d.name, arm, seed) not in done
        ]
        running: dict[Future[dict[str, Any]], tuple[str, str, int]] = {
            pool.submit(train_one, d.model_dump(mode="json"), arm, seed, device, threads): (d.name, arm, seed)
            for d, arm, seed in todo
        }
        with out.open("a") as fh:
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in finished:
                    name, arm, seed = running.pop(f)
                    key = _key(name, arm, seed)
                    try:
                        line = f.result()
                    except Exception as e:  # the training's process broke: say so, keep the others
                        line = {"key": key, "spec": name, "arm": arm, "seed": seed, "status": "failed",
                                "error": f"{type(e).__name__}: {e}"}  # fmt: skip
                    fh.write(json.dumps(line) + "\n")
                    fh.flush()
                    ap = line.get("test", {}).get("AP")
                    said = (
                        f"AP {100 * ap:.1f} in {line['train_s']:.0f} s"
                        if ap is not None
                        else line.get("error")
                    )
                    print(f"{key}: {line['status']}, {said} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(report(_read(out).values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
