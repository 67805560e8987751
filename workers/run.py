"""``python -m workers.run SPEC`` (= ``hdet run SPEC``): train a spec end to end on Ray, tracked in MLflow.

The one entrypoint used by the service, by ``ray job submit`` and by the local CLI. In order:

1. validate the spec (a clear error naming the field before anything starts);
2. check the dataset (generate the synthetic one first): a broken dataset is refused with the
   check's report, unless ``dataset.skip_bad`` is set, in which case the skipped annotations are
   counted and logged;
3. resolve the starting weights (:mod:`workers.training.weights`): find the ``pretrain`` section's backbone
   pretraining in the cache, else join or start Ray (step 4) and run it as a Ray task with one
   training worker's resources (:func:`workers.pretrain.pretrain_on_ray`); download ``runs:/``
   references, check that the files fit the detector; the spec every training and trial receives
   names the local files;
4. join Ray (``--address`` or ``RAY_ADDRESS``) or start a local one on 127.0.0.1;
5. open the MLflow parent run (``--tracking-uri``, else the spec's, else ``MLFLOW_TRACKING_URI``,
   else the local sqlite store under ``$HDET_HOME``);
6. train once (no ``search`` section) or run the Tune search (:mod:`workers.search`);
7. print the final table and the command that opens the MLflow UI.

``--resume`` continues the latest run of the spec's name: the same parent and child runs, from
the last checkpoint.

Exit codes: 0 done, 1 training failed, 2 bad spec or dataset, 130 / 143 stopped by SIGINT /
SIGTERM. A stop (Ctrl-C, ``ray job stop``, ``docker stop``, the REST service's cancel) ends the
parent run and every child run still running ``KILLED`` with ``hdet.error`` naming the signal; a
stopped search can be continued with ``--resume``. SIGTERM is handled as SIGINT: during a Tune
search, Tune's own handler stops the trials (their trainers are aborted); elsewhere the training
is interrupted at once. A second signal during that clean-up is ignored.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from workers.env import cpus_argument
from workers.signals import Stop, ignore_signals, stop_on_signals
from workers.spec import Spec, SpecError

__all__ = ["main", "check_dataset", "format_table", "single_run"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hdet run", description="Train a HarmonicDet experiment spec on Ray.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "spec",
        nargs="?",
        help="experiment spec (YAML or JSON); a YAML file of several documents is a suite, run in turn",
    )
    source.add_argument(
        "--spec-json",
        metavar="TEXT",
        help="the spec itself as JSON text, instead of a file (how the REST service submits a job)",
    )
    p.add_argument(
        "--tag",
        action="append",
        default=[],
        type=_tag,
        metavar="KEY=VALUE",
        help="a tag of the MLflow parent run, e.g. hdet.experiment_id=<id> (repeatable)",
    )
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: the spec's, else a local sqlite store)"
    )
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument(
        "--resume", action="store_true", help="continue the latest run of this spec from its checkpoint"
    )
    p.add_argument(
        "--retry-failed", action="store_true", help="with --resume: run a search's failed trials again"
    )
    p.add_argument("--storage-path", help="Ray Train/Tune storage (default: $HDET_HOME/ray_results)")
    p.add_argument("--dashboard", action="store_true", help="start the Ray dashboard with a local Ray")
    p.add_argument(
        "--num-cpus",
        type=cpus_argument,
        help="cores the trainings of a local Ray may use (default: this machine's; the trainings that do "
        "not fit in them at once, at scaling.cpus_per_worker each, wait their turn)",
    )
    return p


def _tag(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` of ``--tag``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key.strip(), value


def _load(args: argparse.Namespace) -> list[Spec]:
    """The experiments to run: the spec file's documents, or the one spec of ``--spec-json``."""
    if args.spec_json is None:
        return Spec.suite_from_file(args.spec)
    import json

    try:
        data = json.loads(args.spec_json)
    except json.JSONDecodeError as e:
        raise SpecError([("", f"cannot parse: {e}")], "--spec-json") from None
    return [Spec.parse(data, source="--spec-json")]


def check_dataset(spec: Spec) -> dict[str, int]:
    """Generate the synthetic set if needed and load each split's annotations once (train, val and
    the held-out test split when the dataset has one).

    Returns:
        ``{"train": n, "val": n[, "test": n]}`` annotations skipped (``dataset.skip_bad``).

    Raises:
        harmonic.data.DatasetError: the dataset has problems and ``skip_bad`` is off (the message
            is the check's report), or it cannot be used at all.
    """
    from harmonic.data import build_dataset
    from workers.training.recipe import dataset_config

    cfg = dataset_config(spec)
    skipped = {}
    for split in ("train", "val", "test") if spec.dataset.has_test() else ("train", "val"):
        ds: Any = build_dataset(cfg, split, skip_bad=spec.dataset.skip_bad)
        skipped[split] = int(getattr(ds, "skipped", 0) or 0)
        if len(ds) == 0:
            from harmonic.data import DatasetError

            raise DatasetError(f"dataset {split} split has no images")
    return skipped


def _start_ray(spec: Spec, args: argparse.Namespace) -> bool:
    """Join or start Ray; returns True when this process started a local Ray (and must stop it)."""
    import ray

    from workers.env import init_local_ray, local_ray_cpus

    if ray.is_initialized():
        return False
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return False
    from workers.search import least_cpus, trial_cpus

    # The cores for the trainings (those that do not fit wait for one to end, which runs faster
    # than every seed of every arm at once, and fits in memory), room for the trials' reservations.
    cpus = local_ray_cpus(args.num_cpus, reserved=trial_cpus(spec), least=least_cpus(spec))
    init_local_ray(num_cpus=cpus, dashboard=args.dashboard)
    return True


def format_table(history: list[dict[str, Any]], best: dict[str, Any] | None = None) -> str:
    """The per-epoch table printed at the end of a run."""
    cols = [
        ("epoch", "{:>5}", "epoch"),
        ("loss", "{:>7.3f}", "loss"),
        ("AP", "{:>6.1f}", "AP"),
        ("AP50", "{:>6.1f}", "AP50"),
        ("AP75", "{:>6.1f}", "AP75"),
        ("AP90", "{:>6.1f}", "AP90"),
        ("aic", "{:>6.3f}", "AIC"),
        ("train_aic", "{:>9.3f}", "train_AIC"),
        ("images_per_s", "{:>7.1f}", "img/s"),
    ]
    widths = [max(len(h), len(f.format(1.0 if k != "epoch" else 1))) for k, f, h in cols]
    head = "  ".join(h.rjust(w) for (_, _, h), w in zip(cols, widths))
    lines = [head, "-" * len(head)]
    for row in history:
        cells = []
        for (k, f, _), w in zip(cols, widths):
            v = row.get(k)
            if v is None or (isinstance(v, float) and not math.isfinite(v)):
                cells.append("-".rjust(w))
                continue
            if k in ("AP", "AP50", "AP75", "AP90"):
                v = v * 100
            cells.append(f.format(int(v) if k == "epoch" else v).rjust(w))
        lines.append("  ".join(cells))
    if best and best.get("epoch"):
        lines.append(f"best: epoch {best['epoch']}, AP {100 * best['AP']:.1f}")
    return "\n".join(lines)


def single_run(spec: Spec, ctx: Any, storage_path: str, *, resume: bool) -> dict[str, Any]:
    """Train ``spec`` once under the parent run ``ctx``; returns the run's summary (rank 0's return)."""
    from workers.tracking import client
    from workers.training.pooled import make_training

    c = client(ctx.tracking_uri)
    parent = c.get_run(ctx.parent_run_id)
    run_name = parent.data.tags.get("hdet.run_name") if resume else None
    if not run_name:
        # A fresh name: Ray Train resumes a run whose name already has checkpoints in storage.
        run_name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        c.set_tag(ctx.parent_run_id, "hdet.run_name", run_name)
    trainer = make_training(spec, run_name=run_name, storage_path=storage_path, tracking=ctx)
    print(f"training {run_name}: MLflow run {trainer.mlflow_run_id} (parent {ctx.parent_run_id})", flush=True)
    result = trainer.fit()
    summary = dict(result.return_value or {})
    summary.setdefault("run_id", trainer.mlflow_run_id)
    best = summary.get("best") or {}
    # The parent run carries the outcome too, so an experiment list shows it without opening children.
    from workers.tracking import log_metrics

    history = summary.get("history") or []
    if history:
        by_epoch = {int(h["epoch"]): h for h in history}
        best_row = by_epoch.get(int(best.get("epoch", 0)), history[-1])
        log_metrics(c, ctx.parent_run_id, {f"best_{k}": v for k, v in best_row.items()}, step=0)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        suite = _load(args)
    except SpecError as e:
        print(f"hdet run: {e}", file=sys.stderr)
        return 2
    if len(suite) == 1:
        return _run_one(suite[0], args)
    # A suite (several YAML documents): every dataset is checked before the first experiment starts,
    # then the experiments run one after the other; the exit code is the worst of theirs.
    from harmonic.data import DatasetError

    for spec in suite:
        try:
            check_dataset(spec)
        except DatasetError as e:
            print(f"hdet run: {spec.name}: dataset refused:\n{e}", file=sys.stderr)
            return 2
    rcs = []
    for i, spec in enumerate(suite, start=1):
        print(f"\n== experiment {i}/{len(suite)}: {spec.name}", flush=True)
        rcs.append(_run_one(spec, args))
    print(
        f"\nsuite {args.spec}: " + ", ".join(f"{s.name} exit {rc}" for s, rc in zip(suite, rcs)), flush=True
    )
    return max(rcs)


def _run_one(spec: Spec, args: argparse.Namespace) -> int:
    """One experiment of ``hdet run`` (a training run, a search or a comparison); its exit code."""
    from harmonic.data import DatasetError
    from workers.env import hdet_home

    # Paths are resolved here, in the driver, once: trials and workers run in directories of their own.
    os.environ["HDET_HOME"] = str(hdet_home())
    spec = spec.with_resolved_paths()

    try:
        skipped = check_dataset(spec)
    except DatasetError as e:
        print(f"hdet run: dataset refused:\n{e}", file=sys.stderr)
        return 2
    if any(skipped.values()):
        print(
            f"dataset: skipped bad annotations (dataset.skip_bad): train {skipped['train']}, val {skipped['val']}"
        )

    from workers.env import storage_dir
    from workers.tracking import client, log_metrics, open_parent_run, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(spec.tracking.tracking_uri, args.tracking_uri)
    storage_path = args.storage_path or os.environ.get("HDET_STORAGE_PATH") or str(storage_dir())
    if "://" not in storage_path:
        Path(storage_path).mkdir(parents=True, exist_ok=True)

    # Pretraining and runs:/ references before the parent run: bad weights leave nothing behind. A
    # pretraining not in the cache yet is a Ray task (workers.pretrain.pretrain_on_ray): Ray first.
    from workers.pretrain import cached_pretraining, pretrain_on_ray
    from workers.training.errors import DeviceMismatchError
    from workers.training.weights import resolve_start_weights

    started = False
    try:
        pretrained = None
        if spec.pretrain is not None and cached_pretraining(spec) is None:
            started = _start_ray(spec, args)
            pretrained = pretrain_on_ray(spec, tracking_uri=tracking_uri)
        spec = resolve_start_weights(spec, tracking_uri, pretrained=pretrained)
    except BaseException as e:
        if started:
            from workers.env import shutdown_local_ray

            shutdown_local_ray("hdet run")
        if isinstance(e, SpecError):
            print(f"hdet run: {e}", file=sys.stderr)
            return 2
        if isinstance(e, DatasetError):
            print(f"hdet run: pretraining images refused (pretrain):\n{e}", file=sys.stderr)
            return 2
        if isinstance(e, DeviceMismatchError):
            print(f"hdet run: pretraining failed: {e}", file=sys.stderr)
            return 1
        raise

    for warning in spec.design_warnings():
        print(f"hdet run: warning: {warning}", file=sys.stderr)
    started = _start_ray(spec, args) or started
    if started:  # this process's own Ray: its trainings' processes start while the run is prepared
        from workers.search.slots import warm_pool_for

        warm_pool_for(spec, storage_path)
    ctx = open_parent_run(spec, tracking_uri, resume=args.resume, extra_tags=dict(args.tag))
    c = client(tracking_uri)
    if any(skipped.values()):
        log_metrics(c, ctx.parent_run_id, {f"dataset_skipped_{k}": v for k, v in skipped.items()}, step=0)
    print(
        f"experiment {spec.tracking.experiment!r}: parent run {ctx.parent_run_id} ({tracking_uri})",
        flush=True,
    )
    status, rc, error = "FINISHED", 0, None
    stop = Stop()
    try:
        with stop_on_signals(stop):
            return_code = _train(spec, args, ctx, storage_path)
        if return_code:
            status, rc = return_code
            if status == "KILLED" and stop.signal:  # Tune stopped the search on SIGTERM
                error = f"stopped by {stop.signal}"
                rc = stop.exit_code()
            elif status == "KILLED":  # Tune's own handler stopped it (SIGINT)
                error = "the search was interrupted"
    except KeyboardInterrupt:
        ignore_signals()
        error = f"stopped by {stop.signal or 'SIGINT'}"
        print(
            f"hdet run: {error}; the runs still running end KILLED (continue with --resume)", file=sys.stderr
        )
        status, rc = "KILLED", stop.exit_code()
    except Exception as e:
        from ray.train import TrainingFailedError

        from workers.training.controller_hooks import is_deterministic_error

        if not (isinstance(e, TrainingFailedError) or is_deterministic_error(e)):
            c.set_terminated(ctx.parent_run_id, status="FAILED")
            raise
        print(f"hdet run: training failed: {e}", file=sys.stderr)
        status, rc = "FAILED", 1
    finally:
        if started:
            from workers.env import shutdown_local_ray

            shutdown_local_ray("hdet run")
    if status == "KILLED":
        # What a stopped trainer or trial had no time to close (Ray stopped it first).
        from workers.tracking import close_running_runs

        close_running_runs(c, ctx.experiment_id, ctx.parent_run_id, "KILLED", error)
    c.set_terminated(ctx.parent_run_id, status=status)
    if tracking_uri.startswith("sqlite:"):
        print(f"\nMLflow UI: mlflow ui --backend-store-uri {tracking_uri}")
    else:
        print(f"\nMLflow: {tracking_uri} (experiment {spec.tracking.experiment!r})")
    return rc


def _train(spec: Spec, args: argparse.Namespace, ctx: Any, storage_path: str) -> tuple[str, int] | None:
    """Train the experiment: None when it is done, else the parent run's status and the exit code."""
    if spec.search is None:
        summary = single_run(spec, ctx, storage_path, resume=args.resume)
        print()
        print(format_table(summary.get("history") or [], summary.get("best")))
        return None
    from workers.search import run_search  # prints its own table at the end
    from workers.summary import BASELINE_ID, CONFIRMATORY_ID

    search_summary = run_search(spec, ctx, storage_path, resume=args.resume, retry_failed=args.retry_failed)
    if not search_summary.complete:
        print("hdet run: the search was interrupted; continue it with --resume", file=sys.stderr)
        return "KILLED", 1
    listed = {r.trial_id: r for r in search_summary.arms}
    arms = (
        (BASELINE_ID, spec.search.baseline, search_summary.baseline),
        (CONFIRMATORY_ID, spec.search.confirmatory, search_summary.confirmatory),
        *((name, True, listed.get(name)) for name in spec.search.arms),
    )
    failed = [
        f"{name}: "
        + (rec.status if rec else "no training run")
        + (f" ({rec.error.splitlines()[0][:300]})" if rec and rec.error else "")
        for name, asked, rec in arms
        if asked and (rec is None or rec.status != "completed")
    ]
    if failed:
        # Without both sides of a comparison (or with an arm of the family missing) the experiment failed;
        # the evidence of the arms that trained is in the parent run all the same.
        print(f"hdet run: the comparison has no result: {'; '.join(failed)}", file=sys.stderr)
        return "FAILED", 1
    return None


if __name__ == "__main__":
    sys.exit(main())
