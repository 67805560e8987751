"""``hdet bench train`` end to end on a real local Ray, on a tiny setting: both sides train, every
repeat prints its ratio and the cores each side used, and the summary gives median and range."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_train_prints_each_ratio_and_the_cores_of_each_side(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "workers.cli", "bench", "train", "--images", "8", "--image-size", "48",
         "--batch-size", "4", "--epochs", "2", "--repeats", "1", "--backbone", "resnet18_fpn"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "HDET_HOME": str(tmp_path)},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ratio = re.search(
        r"repeat 1: plain ([\d.]+) / ([\d.]+) img/s .* worker ([\d.]+) img/s .*ratio ([\d.]+)", out.stdout
    )
    assert ratio, out.stdout
    plain_before, plain_after, worker, r = map(float, ratio.groups())
    assert min(plain_before, plain_after, worker) > 0
    # the ratio of the unrounded rates: within what printing each to 2 (the ratio to 3) decimals moves it
    mean = (plain_before + plain_after) / 2
    assert abs(r - worker / mean) <= r * (0.005 / worker + 0.005 / mean) + 0.0005 + 1e-9
    cores = re.search(r"cores used: plain loop ([\d.]+) \(every other process ([\d.]+)\); Ray Train worker ([\d.]+)",
                      out.stdout)  # fmt: skip
    assert cores, out.stdout
    # each side's trainer used a share of the cores the bench gave it (2 threads, or 1 on a 1-core machine)
    assert float(cores.group(1)) > 0.3 and float(cores.group(3)) > 0.3, cores.group(0)
    assert re.search(r"median [\d.]+ over the epochs \(range [\d.]+-[\d.]+, 1 repeats\)", out.stdout), (
        out.stdout
    )
    # the plain loop also trained in a bare Ray actor; the two ratios it splits the gap into agree
    # with the rates printed
    actor = re.search(r"bare Ray actor ([\d.]+) img/s: bare actor / plain ([\d.]+), Ray Train worker / bare actor "
                      r"([\d.]+)", out.stdout)  # fmt: skip
    assert actor, out.stdout
    a, a_plain, w_a = map(float, actor.groups())
    assert a > 0
    assert abs(a_plain - a / mean) <= a_plain * (0.005 / a + 0.005 / mean) + 0.0005 + 1e-9
    assert abs(w_a - worker / a) <= w_a * (0.005 / a + 0.005 / worker) + 0.0005 + 1e-9
    assert re.search(r"of which any Ray process .*: median [\d.]+ \(range [\d.]+-[\d.]+\); Ray Train and the "
                     r"worker loop .*: median [\d.]+", out.stdout), out.stdout  # fmt: skip
