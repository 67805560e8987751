"""The baselines of ``hdet bench train``: a plain PyTorch training loop on a worker's model, data,
sampler and optimizer, in a fresh Python process or in a bare Ray actor, in turns on the bench's go.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["start_process", "process_result", "start_bare_actor", "train"]


def start_process(spec_dict: dict[str, Any], threads: int, pace: Path) -> subprocess.Popen[str]:
    """Start the plain loop (no Ray) in a fresh Python process, as a Ray Train worker is one, so
    that neither side inherits the other's heap or threads. The model, data, sampler and optimizer
    are a worker's (:mod:`workers.training.recipe`); the step has no AMP, clipping, schedule or diagnostics.
    Read its result with :func:`process_result`."""
    import json

    code = "from benchmarks.plain_loop import main; main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(threads), str(pace)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec_dict))
    proc.stdin.close()
    return proc


def process_result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """What :func:`train` returned in the process of :func:`start_process` (waits for its end)."""
    import json

    assert proc.stdout is not None
    out = proc.stdout.read()
    if proc.wait() != 0:
        raise RuntimeError(f"bench train: the plain loop's process failed (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def start_bare_actor(spec_dict: dict[str, Any], threads: int, pace: Path) -> tuple[Any, int, Any]:
    """Start the plain loop in a bare Ray actor of the running Ray (no Ray Train, none of the worker
    loop), in a second thread as Ray Train runs a worker's function: what any Ray worker process
    gets of the machine, to tell it from what Ray Train and the worker loop cost. Returns the actor,
    its pid and the reference to :func:`train`'s result. It reserves no CPU (the Ray Train worker
    holds them; the two never train at once) and gets the worker's OpenMP thread count."""
    import ray

    actor = ray.remote(num_cpus=0, runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}})(
        _BareActor
    ).remote()
    pid = ray.get(actor.pid.remote())
    return actor, pid, actor.train.remote(spec_dict, threads, str(pace))


class _BareActor:
    def pid(self) -> int:
        import os

        return os.getpid()

    def train(self, spec_dict: dict[str, Any], threads: int, pace: str) -> dict[str, Any]:
        import threading

        got: dict[str, Any] = {}

        def run() -> None:
            try:
                got.update(train(spec_dict, threads, pace))
            except BaseException as e:  # raised again in the actor's own thread, so Ray reports it
                got["error"] = e

        thread = threading.Thread(target=run, name="TrainingThread")
        thread.start()
        thread.join()
        if "error" in got:
            raise got["error"]
        return got


def main() -> None:
    """The plain loop's process: the spec on stdin, the thread count and the pace directory in argv;
    prints one JSON line."""
    import json

    print(json.dumps(train(json.loads(sys.stdin.read()), int(sys.argv[1]), sys.argv[2])), flush=True)


def train(spec_dict: dict[str, Any], threads: int, pace: str | None = None) -> dict[str, Any]:
    """Train the plain loop, in turns on the bench's go when ``pace`` names a :class:`Baton`'s
    directory. Returns ``rate`` (images/s over every epoch but the first, from its step times)."""
    import torch

    from benchmarks.pace import Pacer
    from harmonic.step import optimizer_step, total_loss
    from workers.spec import Spec
    from workers.training import recipe

    spec = Spec.parse(spec_dict)
    t = spec.train
    torch.set_num_threads(threads)
    recipe.seed_everything(t.seed)
    ds = recipe.train_dataset(spec)
    model = recipe.build_model(spec, ds.num_classes)
    model.train()
    # The same sampler stack as a worker of a one-worker run: the same batches in the same order.
    loader, sampler, iters = recipe.train_loader(
        ds, batch_size=t.batch_size, aspect_ratio_groups=t.aspect_ratio_groups, seed=t.seed,
        data_workers=recipe.loading(spec, "cpu").data_workers,
    )  # fmt: skip
    opt = recipe.make_optimizer(model, spec)
    pacer = Pacer(pace) if pace else None
    if pacer is not None:
        pacer.start()
    images, seconds = 0, 0.0
    for epoch in range(1, t.epochs + 1):
        sampler.set_epoch(epoch)
        t_step = time.perf_counter()
        for step, (imgs, targets) in enumerate(loader):
            optimizer_step(total_loss(model(list(imgs), list(targets))), opt)
            now = time.perf_counter()
            if epoch > 1:
                images, seconds = images + len(imgs), seconds + now - t_step
            if pacer is not None and pacer.step(epoch, now - t_step, len(imgs), last=step == iters - 1):
                now = time.perf_counter()
            t_step = now
    return {"rate": images / seconds if seconds else float("nan")}
