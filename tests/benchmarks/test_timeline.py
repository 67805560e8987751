"""``hdet bench search``'s start-up timeline: the marks the search and the workers write
(workers.marks) read back as each training run's phases, from Tune's start of its trial to its
first step; nothing is written unless ``HDET_TIMELINE`` names a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import timeline
from workers import marks


def test_timeline_phases_follow_a_trial_to_its_first_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "timeline.jsonl"
    monkeypatch.setenv(marks.ENV, str(path))
    marks.mark("trial_start", "t1", t=100.0)
    marks.mark("trial_fn", "t1", t=101.0)
    for i, label in enumerate(timeline.PHASES[2:], start=2):
        marks.mark(label, "t1-seed0", t=100.0 + i)
    marks.mark("first_step", "t1-seed0", t=200.0)  # (a later epoch's first step)
    marks.mark("worker_start", "baseline-seed0", t=50.0)  # no trial_start: left out
    (row,) = timeline.phases(timeline.read(path))
    assert row["total"] == pytest.approx(len(timeline.PHASES) - 1)
    assert row["trial_start->trial_fn"] == row["trial_fn->trainer_fit"] == pytest.approx(1.0)
    monkeypatch.delenv(marks.ENV)
    assert not marks.enabled()
    marks.mark("ignored", "t1")
    assert len(timeline.read(path)) == len(timeline.PHASES) + 2  # nothing added once unset
