"""The CPU sampler of ``hdet bench train``: a busy process whose command line names a Ray Train
worker is counted as the worker, at about one core, also when it took that name after it started
(Ray starts idle workers ahead of need); nothing else is counted as the worker."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from workers.cpu_share import OTHER, WORKER, CpuSampler

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


def test_the_named_process_is_the_worker() -> None:
    # the plain loop's side: the sampling process itself trains
    with CpuSampler(interval=0.1, worker_pid=os.getpid()) as cpu:
        t0 = time.time()
        while time.time() - t0 < 1.5:
            pass
        t1 = time.time()
        proc = subprocess.Popen([sys.executable, "-c", BUSY.replace("2.0", "1.0"), "ray::RayTrainWorker"])
        proc.wait(timeout=30)
        t2 = time.time()
    busy = cpu.cores_used(t0 + 0.2, t1)
    assert 0.3 < busy[WORKER] <= 1.15, busy
    # another process, whatever its name, is "other" then
    assert cpu.cores_used(t1 + 0.3, t2 - 0.2)[WORKER] < 0.2
