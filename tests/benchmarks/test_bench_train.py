"""``hdet bench train`` end to end on a real local Ray, on a tiny setting: the three sides train in
turns, every timed epoch prints its rates and ratios, and the summary's median, interval and verdict
follow from them; the cores each side used are printed."""

from __future__ import annotations

import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.pace import Turn
from benchmarks.train import Side

ROOT = Path(__file__).resolve().parents[2]
NUM = r"([\d.]+)"


def test_bench_train_prints_each_epochs_ratios_their_interval_and_verdict(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "workers.cli", "bench", "train", "--images", "8", "--image-size", "48",
         "--batch-size", "4", "--epochs", "7", "--repeats", "1", "--turn-steps", "2", "--backbone", "resnet18_fpn"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "HDET_HOME": str(tmp_path)},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = re.findall(
        rf"epoch (\d+): plain {NUM}, bare actor {NUM}, Ray Train worker {NUM}: {NUM}, {NUM}, {NUM}",
        out.stdout,
    )
    assert [int(r[0]) for r in rows] == [2, 3, 4, 5, 6, 7], out.stdout  # every epoch but the first is timed
    worker_plain = []
    for _, *values in rows:
        plain, actor, worker, wp, ap, wa = map(float, values)
        assert min(plain, actor, worker) > 0
        # each ratio is that of the rates, within what printing them to 2 (the ratio to 3) decimals moves it
        for ratio, a, b in ((wp, worker, plain), (ap, actor, plain), (wa, worker, actor)):
            assert abs(ratio - a / b) <= ratio * (0.005 / a + 0.005 / b) + 0.0005 + 1e-9, values
        worker_plain.append(wp)
    summary = re.search(
        rf"Ray Train worker / plain loop, per epoch: median {NUM} \(range {NUM}-{NUM}, 6 epochs; estimate {NUM}, "
        rf"95% interval {NUM}-{NUM}\)", out.stdout,
    )  # fmt: skip
    assert summary, out.stdout
    median, low_r, high_r, estimate, low, high = map(float, summary.groups())
    assert abs(median - statistics.median(worker_plain)) <= 0.0015
    assert (low_r, high_r) == (min(worker_plain), max(worker_plain))
    assert low <= estimate <= high
    # 6 pairs: the exact signed-rank test's 95% interval runs from the smallest to the largest ratio
    assert math.isclose(low, low_r, abs_tol=0.0011) and math.isclose(high, high_r, abs_tol=0.0011)
    verdict = re.search(r"target >= 0.95: (met|not met|not resolved) ", out.stdout)
    assert verdict, out.stdout
    expected = "met" if low >= 0.95 else "not met" if high < 0.95 else "not resolved"
    # (the printed bounds are rounded: a bound within 0.0005 of the target could go either way)
    assert verdict.group(1) == expected or min(abs(low - 0.95), abs(high - 0.95)) <= 0.0005
    assert re.search(r"of which any Ray process \(bare actor / plain loop\): median [\d.]+ ", out.stdout)
    assert re.search(
        r"Ray Train and the worker loop \(Ray Train worker / bare actor\): median [\d.]+ ", out.stdout
    )
    cores = re.search(
        rf"cores used while each trained: plain loop {NUM} \(every other process {NUM}\), bare actor {NUM} "
        rf"\({NUM}\), Ray Train worker {NUM} \({NUM}\)", out.stdout,
    )  # fmt: skip
    assert cores, out.stdout
    # each side's trainer used a share of the cores the bench gave it (2 threads, or 1 on a 1-core machine)
    plain_c, _, actor_c, _, worker_c, _ = map(float, cores.groups())
    assert min(plain_c, actor_c, worker_c) > 0.3, cores.group(0)
    # each side's niceness, read from the process: the plain loop's is the bench's own
    nice = re.search(
        r"niceness: plain loop (-?\d+), bare actor (-?\d+), Ray Train worker (-?\d+)", out.stdout
    )
    assert nice, out.stdout
    assert int(nice.group(1)) == os.nice(0)
    slow = re.search(
        rf"a turn's first step / its other steps \(median\): plain loop {NUM}, bare actor {NUM}, Ray Train worker {NUM}",
        out.stdout,
    )
    assert slow, out.stdout
    assert all(0 < float(v) < 100 for v in slow.groups()), slow.group(0)


def test_a_turns_first_step_is_compared_with_its_other_steps_per_image() -> None:
    side = Side("plain loop", baton=None, alive=lambda: True, cpu=None)  # type: ignore[arg-type]
    # (epoch, steps, seconds, images, start, end, the first step's seconds and images)
    side.turns = [
        Turn(2, 4, 2.0, 16, 0.0, 2.0, 0.8, 4),  # first 0.2 s/image, the others 1.2 s / 12 images: 2.0
        Turn(2, 2, 1.0, 7, 2.0, 3.0, 0.5, 4),  # 0.125 s/image against 0.5 s / 3 images: 0.75
        Turn(3, 3, 1.5, 12, 3.0, 4.5, 0.5, 4),  # 0.125 against 1.0 s / 8 images: 1.0
        Turn(3, 1, 0.5, 4, 4.5, 5.0, 0.5, 4),  # one step: nothing to compare it with
    ]
    assert math.isclose(side.first_step_slowdown(), 1.0)
    side.turns = side.turns[-1:]
    assert math.isnan(side.first_step_slowdown())
