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


def test_training_costs_are_the_marks_spans_within_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "timeline.jsonl"
    monkeypatch.setenv(marks.ENV, str(path))
    labels = ("trainer_fit", "worker_start", "data_ready", "model_ready", "epochs_start", "first_step",
              "epochs_done", "training_end", "fit_end")  # fmt: skip
    for start, key in ((10.0, "a-seed0"), (12.0, "a-seed1")):
        # 1 s between marks but 20 s of epochs (epochs_start -> epochs_done)
        at = start
        for label in labels:
            marks.mark(label, key, t=at)
            at += 20.0 if label in ("epochs_start", "first_step") else 1.0
    marks.mark("trainer_fit", "other-seed0", t=500.0)  # another comparison: outside the window
    marks.mark("fit_end", "other-seed0", t=560.0)
    costs = timeline.training_costs(timeline.read(path), 5.0, 60.0)
    assert costs["fits"] == 2
    expected = {name: 1.0 for name, _, _ in timeline.COSTS} | {"data and model": 2.0}
    assert costs["per_training"] == pytest.approx(expected)
    # a task: worker_start 11 -> training_end 55 (44 s), of which 40 s of epochs
    assert costs["occupied_s"] == pytest.approx(2 * 44.0) and costs["epochs_s"] == pytest.approx(2 * 40.0)
    assert costs["fixed_s"] == pytest.approx(2 * 4.0)
    assert costs["start_s"] == pytest.approx(11.0 - 5.0)  # to the first task's start
    assert costs["end_s"] == pytest.approx(60.0 - 57.0)  # from the last task's end
