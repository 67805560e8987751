"""``hdet bench train``: training images/s of one Ray Train worker (the real per-worker loop of
:mod:`workers.training.worker_loop`: model preparation, diagnostics, loss bookkeeping, per-epoch report and
checkpoint) / images/s of a plain PyTorch loop, on the same model, data, batch size, sampler and
thread count, each side in a fresh process.

The sides train in turns of a few steps (plain loop, a bare Ray actor running the plain loop, the
worker; then the other way round; :mod:`benchmarks.pace`), on the same batches, so that the machine's
drift in speed, which moves a single epoch by 10% and more, hits each side alike; each trains as if
alone (the others' processes are stopped meanwhile). Every epoch but the first is timed, from the
sides' step times. Printed: each epoch's ratios, their median, range and 95% interval, whether the
target (>= 0.95) is met, the cores each side and every other process used, each side's niceness,
and each side's first step of a turn against its other steps (a stopped side that paid for it when
let go would show a slow first step). The bare actor splits the ratio into what any Ray process
gets (bare actor / plain) and what Ray Train and the worker loop cost (worker / bare actor).
``--repeats`` runs it again with fresh processes and a fresh Ray.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import pace
from benchmarks.cpu_share import WORKER, CpuSampler
from benchmarks.pace import RAY_TRAIN_PROCESSES, Baton, Freezer, Turn, niceness, pids_named
from workers.procfs import descendants
from workers.training import hooks as train_hooks

__all__ = ["train_main", "bench_spec"]


def bench_spec(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """The spec both sides train: synthetic data, one worker, no warm-up or decay."""
    return {
        "name": "bench-train",
        "dataset": {"format": "synthetic", "root": str(root / "data"), "train": args.images, "val": 4,
                    "image_size": args.image_size, "seed": 0},
        "detector": {"arch": args.arch, "backbone": args.backbone, "image_size": args.image_size},
        "loss": {"kind": args.loss},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": 0.005, "schedule": "constant",
                  "warmup": {"iters": 0}, "seed": 0},
        "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": args.threads, "max_failures": 0},
        "tracking": {"experiment": "bench-train"},
    }  # fmt: skip


class Side:
    """One side of ``hdet bench train``: its :class:`~benchmarks.pace.Baton`, how to tell it still runs,
    and the turns it reported (every epoch's but the first's)."""

    def __init__(self, label: str, baton: Baton, alive: Callable[[], bool], cpu: CpuSampler):
        self.label = label
        self.baton = baton
        self.alive = alive
        self.cpu = cpu
        self.ended = False
        self.turns: list[Turn] = []

    def ready(self) -> None:
        """Wait until the side is ready to train."""
        if self.baton.next_turn(self.alive) is None:
            raise RuntimeError(f"bench train: the {self.label} ended before it trained")

    def turn(self) -> None:
        """Let the side train a turn and wait until it waits again (or has ended): its work between
        epochs (a worker's evaluation, report, checkpoint) is then done too."""
        self.cpu.sample()  # the edges of the side's turn: its cores are not mixed with another's
        self.baton.go()
        got = self.baton.next_turn(self.alive)
        self.cpu.sample()
        if got is None:
            self.ended = True
        elif got.epoch > 1:
            self.turns.append(got)

    def epochs(self) -> dict[int, float]:
        """images/s of each timed epoch, from its steps' times."""
        seconds: dict[int, float] = {}
        images: dict[int, int] = {}
        for t in self.turns:
            seconds[t.epoch] = seconds.get(t.epoch, 0.0) + t.seconds
            images[t.epoch] = images.get(t.epoch, 0) + t.images
        return {e: images[e] / seconds[e] for e in sorted(seconds)}

    def first_step_slowdown(self) -> float:
        """Median over the turns of: the turn's first step / the mean of its other steps (per image)."""
        slow = [
            (t.first_seconds / t.first_images) / ((t.seconds - t.first_seconds) / (t.images - t.first_images))
            for t in self.turns
            if t.steps >= 2
        ]
        return statistics.median(slow) if slow else float("nan")


def _stopped_for(side: str, plain_pid: int, actor_pid: int) -> set[int]:
    """What stops while ``side`` trains, so that each side runs as if alone: for the plain loop,
    every process of the local Ray; for the bare actor, the Ray Train run's; for the worker, the
    bare actor."""
    if side == "plain loop":
        return descendants(os.getpid()) - {plain_pid}
    if side == "bare actor":
        return pids_named(RAY_TRAIN_PROCESSES)
    return {actor_pid}


def _cores(cpu: CpuSampler, side: Side, group: str) -> tuple[float, float]:
    """Cores ``group`` used while ``side`` trained its timed turns, and every other process together."""
    windows = [(t.start, t.end) for t in side.turns]
    used = [cpu.cores_used(a, b) for a, b in windows]
    seconds = sum(b - a for a, b in windows)
    if not used or seconds <= 0:
        return float("nan"), float("nan")
    mine = sum(u.get(group, 0.0) * (b - a) for u, (a, b) in zip(used, windows, strict=True)) / seconds
    total = sum(sum(u.values()) * (b - a) for u, (a, b) in zip(used, windows, strict=True)) / seconds
    return mine, total - mine


def _log_interval(ratios: list[float]) -> tuple[float, float, float]:
    """The 95% interval and the estimate of the ratio: Hodges-Lehmann on the log ratios, which
    inverts the exact Wilcoxon signed-rank test (NaN bounds with too few ratios)."""
    from workers.evidence.paired import hodges_lehmann_interval

    low, high, estimate, _ = hodges_lehmann_interval([math.log(r) for r in ratios])
    return math.exp(low), math.exp(high), math.exp(estimate)


def _interval(ratios: list[float]) -> str:
    """Median, range and :func:`_log_interval` of the ratio, as one phrase."""
    low, high, estimate = _log_interval(ratios)
    text = f"median {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}, {len(ratios)} epochs"
    if math.isnan(low):
        return text + "; too few epochs for a 95% interval)"
    return text + f"; estimate {estimate:.3f}, 95% interval {low:.3f}-{high:.3f})"


def _verdict(ratios: list[float], target: float) -> str:
    """Met only if the whole 95% interval of :func:`_log_interval` is at or above ``target``."""
    low, high, _ = _log_interval(ratios)
    if math.isnan(low):
        return "too few epochs to tell"
    if low >= target:
        return f"met (the whole interval is >= {target})"
    if high < target:
        return f"not met (the whole interval is below {target})"
    return f"not resolved (the interval holds {target})"


def train_main(argv: list[str]) -> int:
    """``hdet bench train``: print images/s of a Ray Train worker, of a plain loop, and their ratio."""
    p = argparse.ArgumentParser(prog="hdet bench train", description=__doc__.split("\n\n")[1])
    p.add_argument("--arch", default="retinanet")
    p.add_argument("--backbone", default="resnet18_fpn")
    p.add_argument("--loss", default="harmonicdet")
    p.add_argument("--images", type=int, default=96, help="training images (default 96)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=7, help="epochs of each side; all but the first are timed")
    p.add_argument("--turn-steps", type=int, default=4, help="training steps of a side's turn (default 4)")
    p.add_argument("--repeats", type=int, default=2, help="runs, each with fresh processes and a fresh Ray")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of each side")
    args = p.parse_args(argv)
    if args.epochs < 2 or args.repeats < 1 or args.turn_steps < 1:
        p.error("--epochs must be >= 2, --repeats and --turn-steps >= 1")

    from harmonic.data import build_dataset
    from workers.spec import Spec

    ratios: dict[str, list[float]] = {"worker/plain": [], "actor/plain": [], "worker/actor": []}
    cores: dict[str, list[tuple[float, float]]] = {"plain": [], "actor": [], WORKER: []}
    with tempfile.TemporaryDirectory(prefix="hdet-bench-") as tmp:
        root = Path(tmp)
        spec = bench_spec(args, root)
        # Generate the data outside the timings.
        build_dataset(Spec.parse(spec).dataset.build_config(), "train")
        print(f"bench train: {args.arch}/{args.backbone}, {args.images} images of {args.image_size}px, "
              f"batch {args.batch_size}, {args.threads} thread(s), loss {args.loss}, {args.epochs} epochs "
              f"({args.epochs - 1} timed), the sides in turns of {args.turn_steps} steps, {args.repeats} repeat(s)",
              flush=True)  # fmt: skip
        for r in range(1, args.repeats + 1):
            (plain, actor, worker), cpu, nice = _bench_round(
                spec, root / f"repeat-{r}", args.threads, args.turn_steps
            )
            print(f"  repeat {r} (images/s of each timed epoch; worker / plain, bare actor / plain, worker / bare "
                  f"actor):", flush=True)  # fmt: skip
            rates = zip(
                plain.epochs().items(), actor.epochs().values(), worker.epochs().values(), strict=True
            )
            for (k, pr), ar, wr in rates:
                ratios["worker/plain"].append(wr / pr)
                ratios["actor/plain"].append(ar / pr)
                ratios["worker/actor"].append(wr / ar)
                print(f"    epoch {k}: plain {pr:.2f}, bare actor {ar:.2f}, Ray Train worker {wr:.2f}: "
                      f"{wr / pr:.3f}, {ar / pr:.3f}, {wr / ar:.3f}", flush=True)  # fmt: skip
            print(f"    a turn's first step / its other steps (median): plain loop {plain.first_step_slowdown():.3f}, "
                  f"bare actor {actor.first_step_slowdown():.3f}, Ray Train worker {worker.first_step_slowdown():.3f}",
                  flush=True)  # fmt: skip
            for side, group in ((plain, "plain"), (actor, "actor"), (worker, WORKER)):
                cores[group].append(_cores(cpu, side, group))
            print(f"    cores used while each trained: plain loop {cores['plain'][-1][0]:.2f} (every other process "
                  f"{cores['plain'][-1][1]:.2f}), bare actor {cores['actor'][-1][0]:.2f} ({cores['actor'][-1][1]:.2f}), "
                  f"Ray Train worker {cores[WORKER][-1][0]:.2f} ({cores[WORKER][-1][1]:.2f}) of {os.cpu_count()}",
                  flush=True)  # fmt: skip
            print("    niceness: " + ", ".join(f"{k} {v}" for k, v in nice.items()), flush=True)
    print(f"Ray Train worker / plain loop, per epoch: {_interval(ratios['worker/plain'])}")
    print(f"  target >= 0.95: {_verdict(ratios['worker/plain'], 0.95)}")
    print(f"  of which any Ray process (bare actor / plain loop): {_interval(ratios['actor/plain'])}")
    print(
        f"  and Ray Train and the worker loop (Ray Train worker / bare actor): {_interval(ratios['worker/actor'])}"
    )
    med = {g: statistics.median(c[0] for c in v) for g, v in cores.items()}
    other = {g: statistics.median(c[1] for c in v) for g, v in cores.items()}
    print(f"cores used, median over the repeats: plain loop {med['plain']:.2f} (every other process "
          f"{other['plain']:.2f}), bare actor {med['actor']:.2f} ({other['actor']:.2f}), Ray Train worker "
          f"{med[WORKER]:.2f} ({other[WORKER]:.2f}) of {os.cpu_count()}")  # fmt: skip
    return 0


def _bench_round(
    spec: dict[str, Any], root: Path, threads: int, turn_steps: int
) -> tuple[tuple[Side, Side, Side], CpuSampler, dict[str, str]]:
    """One repeat: a fresh local Ray, the plain loop's process, a bare actor and a Ray Train worker,
    each waiting for its turns; a turn is ``turn_steps`` training steps (an epoch's last step ends
    one). The turns go plain, bare actor, worker, then the other way round, so that a drift of the
    machine's speed cancels out; the three train the same batches in the same order. Each trains as
    if alone (:func:`_stopped_for`): while the plain loop trains, every process of the local Ray
    is stopped; while the bare actor trains, the Ray Train run's; while the worker trains, the bare
    actor."""
    import threading

    import ray

    from benchmarks import plain_loop
    from workers.env import init_local_ray, shutdown_local_ray
    from workers.spec import Spec
    from workers.tracking import open_parent_run
    from workers.training.trainer import make_trainer

    root.mkdir(parents=True)
    batons = {name: Baton(root / f"pace-{name}", turn_steps) for name in ("plain", "actor", "worker")}
    # The local Ray's processes inherit it: the worker takes its turns.
    os.environ[pace.ENV] = str(batons["worker"].directory)
    proc = None
    fit: dict[str, Any] = {}
    with train_hooks.installed(pace.HOOK):  # the worker takes its turns through its training hooks
        init_local_ray(num_cpus=threads)
    try:
        proc = plain_loop.start_process(spec, threads, batons["plain"].directory)
        bare, bare_pid, bare_ref = plain_loop.start_bare_actor(spec, threads, batons["actor"].directory)
        parsed = Spec.parse(spec)
        ctx = open_parent_run(parsed, f"sqlite:///{root / 'mlflow.db'}")
        trainer = make_trainer(
            parsed, run_name=f"bench-{int(time.time() * 1000)}", storage_path=str(root / "storage"),
            tracking=ctx,
        )  # fmt: skip

        def run_fit() -> None:
            try:
                fit["result"] = trainer.fit()
            except BaseException as e:  # raised in the bench's thread below
                fit["error"] = e

        fitting = threading.Thread(target=run_fit, name="bench-fit", daemon=True)
        fitting.start()
        names = {proc.pid: "plain", bare_pid: "actor"}
        with CpuSampler(names=names) as cpu:
            plain = Side("plain loop", batons["plain"], lambda: proc.poll() is None, cpu)
            actor = Side("bare actor", batons["actor"], lambda: not ray.wait([bare_ref], timeout=0)[0], cpu)
            worker = Side("Ray Train worker", batons["worker"], fitting.is_alive, cpu)
            try:
                for side in (plain, actor, worker):
                    side.ready()
                workers = pids_named(RAY_TRAIN_PROCESSES[:1])
                nice = {plain.label: niceness(proc.pid), actor.label: niceness(bare_pid)}
                nice[worker.label] = ",".join(sorted(niceness(pid) for pid in workers)) or "?"
                n = 0
                while not (plain.ended or actor.ended or worker.ended):
                    n += 1
                    for side in (plain, actor, worker) if n % 2 else (worker, actor, plain):
                        with Freezer(_stopped_for(side.label, proc.pid, bare_pid)):
                            side.turn()
                if not (plain.ended and actor.ended and worker.ended):
                    raise RuntimeError(
                        "bench train: the sides did not end together (ended: "
                        + ", ".join(s.label for s in (plain, actor, worker) if s.ended)
                        + ")"
                    )
            except RuntimeError as ended:  # a side ended early: say why, if it said
                if "error" in fit:
                    raise fit["error"] from ended
                if proc.poll() is not None:
                    plain_loop.process_result(proc)  # raises with its exit code
                if ray.wait([bare_ref], timeout=0)[0]:
                    ray.get(bare_ref)  # raises the actor's error
                raise
        fitting.join()
        if "error" in fit:
            raise fit["error"]
        plain_loop.process_result(proc)
        ray.get(bare_ref)
        ray.kill(bare)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        shutdown_local_ray("hdet bench train")
        os.environ.pop(pace.ENV, None)
        for baton in batons.values():
            baton.close()
    return (plain, actor, worker), cpu, nice


if __name__ == "__main__":
    import sys

    sys.exit(train_main(sys.argv[1:]))
