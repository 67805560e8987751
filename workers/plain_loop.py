"""The baselines of ``hdet bench train``: a plain PyTorch training loop on a worker's model, data,
sampler and optimizer, in a fresh Python process or in a bare Ray actor, with the cores used.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["PlainRun", "plain_loop_images_per_s", "actor_loop_images_per_s", "train"]


class PlainRun(NamedTuple):
    """The plain loop's side of ``hdet bench train``."""

    rate: float  # images/s over every epoch but the first
    median_rate: float  # batch size / the median step time of those epochs
    cores: dict[str, float]  # cores used over those epochs: this process (worker), every other one


def plain_loop_images_per_s(spec_dict: dict[str, Any], threads: int) -> PlainRun:
    """Images/s of a plain PyTorch training loop (no Ray) over every epoch but the first, from
    the epochs and from their median step time, and the cores used meanwhile (the loop's process,
    and every other one: sampled as on the Ray side, so that both sides pay the sampler alike).

    The loop runs in a fresh Python process, as a Ray Train worker does, so that neither side
    inherits the other's heap or threads (the bench's driver has built several models and been a
    Ray driver). The model, data, sampler and optimizer are a worker's (:mod:`workers.recipe`);
    the step has no AMP, clipping, schedule or diagnostics."""
    import json
    import subprocess

    from workers.cpu_share import CpuSampler

    code = "from workers.plain_loop import main; main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    with CpuSampler(worker_pid=proc.pid) as cpu:
        out, _ = proc.communicate(json.dumps(spec_dict))
    if proc.returncode != 0:
        raise RuntimeError(f"bench train: the plain loop's process failed (exit {proc.returncode})")
    got = json.loads(out.strip().splitlines()[-1])
    return PlainRun(got["rate"], got["median_rate"], cpu.cores_used(*got["window"]))


def actor_loop_images_per_s(spec_dict: dict[str, Any], threads: int) -> PlainRun:
    """:func:`plain_loop_images_per_s` with the loop in a bare Ray actor of the running Ray (no Ray
    Train, none of the worker loop), in a second thread as Ray Train runs a worker's function: what
    any Ray worker process gets of the machine, to tell it from what Ray Train and the worker loop
    cost."""
    import ray

    from workers.cpu_share import CpuSampler

    actor = ray.remote(num_cpus=threads)(_BareActor).remote()
    try:
        pid = ray.get(actor.pid.remote())
        with CpuSampler(worker_pid=pid) as cpu:
            got = ray.get(actor.train.remote(spec_dict, threads))
    finally:
        ray.kill(actor)
    return PlainRun(got["rate"], got["median_rate"], cpu.cores_used(*got["window"]))


class _BareActor:
    def pid(self) -> int:
        import os

        return os.getpid()

    def train(self, spec_dict: dict[str, Any], threads: int) -> dict[str, Any]:
        import threading

        got: dict[str, Any] = {}

        def run() -> None:
            try:
                got.update(train(spec_dict, threads))
            except BaseException as e:  # raised again in the actor's own thread, so Ray reports it
                got["error"] = e

        thread = threading.Thread(target=run, name="TrainingThread")
        thread.start()
        thread.join()
        if "error" in got:
            raise got["error"]
        return got


def main() -> None:
    """The plain loop's process: the spec on stdin, the thread count in argv; prints one JSON line."""
    import json

    print(json.dumps(train(json.loads(sys.stdin.read()), int(sys.argv[1]))), flush=True)


def train(spec_dict: dict[str, Any], threads: int) -> dict[str, Any]:
    """Train the plain loop; its images/s over every epoch but the first (``rate``), batch size /
    median step time of those epochs (``median_rate``) and their wall-clock ``window``."""
    import torch

    from workers import recipe
    from workers.spec import Spec

    spec = Spec.parse(spec_dict)
    t = spec.train
    torch.set_num_threads(threads)
    recipe.seed_everything(t.seed)
    ds = recipe.train_dataset(spec)
    model = recipe.build_model(spec, ds.num_classes)
    model.train()
    # The same sampler stack as a worker of a one-worker run.
    loader, sampler, _ = recipe.train_loader(
        ds, batch_size=t.batch_size, aspect_ratio_groups=t.aspect_ratio_groups, seed=t.seed,
        data_workers=t.data_workers,
    )  # fmt: skip
    opt = recipe.make_optimizer(model, spec)
    images, seconds, step_times, window = 0, 0.0, [], [math.inf, 0.0]
    for epoch in range(1, t.epochs + 1):
        sampler.set_epoch(epoch)
        n, t0 = 0, time.perf_counter()
        if epoch == 2:
            window[0] = time.time()
        t_step = t0
        for imgs, targets in loader:
            loss = sum(model(list(imgs), list(targets)).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(imgs)
            now = time.perf_counter()
            if epoch > 1:
                step_times.append(now - t_step)
            t_step = now
        if epoch > 1:
            images, seconds = images + n, seconds + time.perf_counter() - t0
    window[1] = time.time()
    median_rate = t.batch_size / statistics.median(step_times)
    return {"rate": images / seconds, "median_rate": median_rate, "window": window}
