"""``hdet bench train``'s turns: a side trains a turn of steps (an epoch's last step ends one) on
each go of the bench, reports it, and uses no CPU while it waits; the bench learns when a side has ended; :class:`Freezer` stops the local Ray's
processes (the bench's descendants but the plain loop) for a turn and lets them go on after it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.pace import Baton, Freezer, Pacer
from workers.procfs import cpu_seconds, descendants, stat_fields

ROOT = Path(__file__).resolve().parents[2]


def _cpu_seconds(pid: int) -> float:
    fields = stat_fields(pid)
    assert fields is not None, f"process {pid} is gone"
    return cpu_seconds(fields)


def test_a_side_trains_a_turn_of_steps_on_each_go_and_the_bench_sees_it_end(tmp_path: Path) -> None:
    baton = Baton(tmp_path / "pace", turn_steps=2)
    trained: list[tuple[int, int]] = []
    waited: list[bool] = []

    def side() -> None:  # 2 epochs of 3 steps (0.25, 0.5, 0.75 s; 4 images each): turns of 2, 1, 2, 1 steps
        pacer = Pacer(baton.directory)
        pacer.start()
        for epoch in (1, 2):
            for step in range(3):
                trained.append((epoch, step))
                waited.append(pacer.step(epoch, 0.25 * (step + 1), 4, last=step == 2))

    thread = threading.Thread(target=side, daemon=True)
    thread.start()
    ready = baton.next_turn(thread.is_alive)
    assert ready is not None and ready.epoch == 0  # ready to start
    time.sleep(0.2)
    assert trained == []  # no go yet: it waits
    # (epoch, steps, seconds, the first step's seconds): an epoch's last step ends a turn
    expected = [(1, 2, 0.75, 0.25), (1, 1, 0.75, 0.75), (2, 2, 0.75, 0.25), (2, 1, 0.75, 0.75)]
    for epoch, steps, seconds, first in expected:
        baton.go()
        turn = baton.next_turn(thread.is_alive)
        assert turn is not None
        assert (turn.epoch, turn.steps, turn.images) == (epoch, steps, 4 * steps)
        assert (turn.seconds, turn.first_seconds, turn.first_images) == (seconds, first, 4)
        assert turn.start <= turn.end
    baton.go()
    thread.join()
    assert baton.next_turn(thread.is_alive) is None  # it ended without another turn
    assert len(trained) == 6
    assert waited == [False, True, True, False, True, True]
    baton.close()


def test_a_waiting_side_uses_no_cpu_and_learns_when_the_bench_is_gone(tmp_path: Path) -> None:
    baton = Baton(tmp_path / "pace", turn_steps=1)
    code = "import sys\nfrom benchmarks.pace import Pacer\nPacer(sys.argv[1]).start()\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(baton.directory)], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    ready = baton.next_turn(lambda: proc.poll() is None)
    assert ready is not None and ready.epoch == 0
    before = _cpu_seconds(proc.pid)
    time.sleep(1.0)
    assert _cpu_seconds(proc.pid) - before <= 0.02  # blocked in a read, not polling
    baton.close()  # the bench is gone: the side stops waiting, with a message that says so
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "the bench closed its pipe" in err


def test_the_freezer_stops_the_processes_for_a_turn(tmp_path: Path) -> None:
    busy = "while True:\n    pass\n"
    kept = subprocess.Popen([sys.executable, "-c", busy])
    frozen = subprocess.Popen([sys.executable, "-c", busy])
    try:
        time.sleep(0.3)
        assert {kept.pid, frozen.pid} <= descendants(os.getpid())
        with Freezer({frozen.pid}) as freezer:
            assert freezer.stopped == [frozen.pid]
            a, b = _cpu_seconds(frozen.pid), _cpu_seconds(kept.pid)
            time.sleep(1.0)
            assert _cpu_seconds(frozen.pid) - a <= 0.02
            assert _cpu_seconds(kept.pid) - b > 0.3  # the kept one runs on
        a = _cpu_seconds(frozen.pid)
        time.sleep(1.0)
        assert _cpu_seconds(frozen.pid) - a > 0.3  # going on after the turn
    finally:
        kept.kill()
        frozen.kill()
        kept.wait()
        frozen.wait()
