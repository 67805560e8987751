"""The CPU sampler of ``hdet bench train``: a busy process whose command line names a Ray Train
worker is counted as the worker, at about one core, also when it took that name after it started
(Ray starts idle workers ahead of need); nothing else is counted as the worker; a process given a
group by pid is counted in it."""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks.cpu_share import OTHER, WORKER, CpuSampler

BUSY = "import time\nt = time.time()\nwhile time.time() - t < 2.0:\n    pass\n"


def test_a_busy_worker_process_uses_about_one_core() -> None:
    assert CpuSampler.available()
    with CpuSampler(interval=0.1) as cpu:
        proc = subprocess.Popen([sys.executable, "-c", BUSY, "ray::RayTrainWorker"])
        t0 = time.time()
        proc.wait(timeout=30)
        t1 = time.time()
    used = cpu.cores_used(t0 + 0.3, t1 - 0.2)  # python's start and exit left out
    # one busy thread: one core at most; at least a share of one even on a loaded 2-core machine
    assert 0.3 < used[WORKER] <= 1.15, used
    assert used[OTHER] >= 0.0


def test_no_worker_no_worker_cpu() -> None:
    with CpuSampler(interval=0.1) as cpu:
        proc = subprocess.Popen([sys.executable, "-c", BUSY.replace("2.0", "0.8")])
        t0 = time.time()
        proc.wait(timeout=30)
        t1 = time.time()
    used = cpu.cores_used(t0, t1)
    assert used[WORKER] == 0.0
    assert used[OTHER] > 0.2, used


def test_a_process_that_becomes_the_worker_is_counted_as_the_worker_from_then_on() -> None:
    # an idle worker Ray started ahead of need, sampled under its first name; then, same pid, the worker
    becomes = (
        "import os, sys, time\n"
        "time.sleep(1.0)\n"
        f"os.execv(sys.executable, [sys.executable, '-c', {BUSY!r}, 'ray::RayTrain' + 'Worker'])\n"
    )
    with CpuSampler(interval=0.1) as cpu:
        proc = subprocess.Popen([sys.executable, "-c", becomes, "ray::IDLE"])
        t0 = time.time()
        proc.wait(timeout=30)
        t1 = time.time()
    used = cpu.cores_used(t0 + 1.3, t1 - 0.2)
    assert 0.3 < used[WORKER] <= 1.15, used


def test_a_named_process_is_counted_in_its_own_group() -> None:
    # hdet bench train names the plain loop's process and the bare actor's; the names may come later
    names: dict[int, str] = {}
    with CpuSampler(interval=0.1, names=names) as cpu:
        proc = subprocess.Popen([sys.executable, "-c", BUSY, "ray::RayTrainWorker"])
        names[proc.pid] = "plain"
        t0 = time.time()
        proc.wait(timeout=30)
        t1 = time.time()
    used = cpu.cores_used(t0 + 0.3, t1 - 0.2)
    assert 0.3 < used["plain"] <= 1.15, used
    assert used[WORKER] == 0.0, used  # its name is not what counts
