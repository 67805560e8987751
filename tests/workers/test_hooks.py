"""The training loop's hooks (workers.hooks): loaded by name from HDET_TRAIN_HOOKS, dispatched by
method, and how the benchmarks' marks plug in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from workers import hooks, timeline


class _Held:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def phase(self, label: str) -> None:
        self.calls.append(("phase", label))

    def step_end(self, epoch: int, seconds: float, images: int, *, last: bool) -> bool:
        self.calls.append(("step", (epoch, images, last)))
        return last


def test_hooks_are_called_by_the_methods_they_have() -> None:
    held, other = _Held(), _Held()
    h = hooks.TrainHooks([held, other, object()])
    h.phase("data_ready")
    h.train_start()  # nobody has it: a no-op
    assert h.on_steps
    assert h.step_end(1, 0.5, 4, last=False) is False
    assert h.step_end(1, 0.5, 4, last=True) is True  # one hook held the worker
    assert (
        held.calls
        == other.calls
        == [("phase", "data_ready"), ("step", (1, 4, False)), ("step", (1, 4, True))]
    )
    assert not hooks.TrainHooks().on_steps


def test_the_timeline_marks_a_workers_phases_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(timeline.ENV, raising=False)
    assert not hooks.load("run-a", timeline.HOOK)._phase  # no file named: no hook
    path = tmp_path / "timeline.jsonl"
    monkeypatch.setenv(timeline.ENV, str(path))
    hooks.load("run-a", timeline.HOOK).phase("worker_start")
    (mark,) = timeline.read(path)
    assert (mark["label"], mark["key"], mark["pid"]) == ("worker_start", "run-a", os.getpid())


@pytest.mark.parametrize("names", ["workers.timeline", "no.such.module:hook", "workers.timeline:nothing"])
def test_a_bad_hook_name_is_refused_naming_the_variable(names: str) -> None:
    with pytest.raises(ValueError, match="HDET_TRAIN_HOOKS"):
        hooks.load("run", names)


def test_installed_adds_an_entry_for_the_block_and_restores_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(hooks.ENV, "a:b")
    with hooks.installed(timeline.HOOK):
        assert os.environ[hooks.ENV] == f"a:b,{timeline.HOOK}"
    assert os.environ[hooks.ENV] == "a:b"
    monkeypatch.delenv(hooks.ENV)
    with hooks.installed(timeline.HOOK):
        assert os.environ[hooks.ENV] == timeline.HOOK
    assert hooks.ENV not in os.environ
