"""``hdet bench train``'s turns: each side's training loop reports every few steps and waits for the
bench's go (:class:`Pacer`, the side's end; :class:`Baton`, the bench's), and the process control
around them (:class:`Freezer` stops the others' processes for a turn; :func:`pids_named`).

The bench runs the sides a few steps at a time, in turns, on the same batches, so that a drift of
the machine's speed hits every side alike.

Off unless asked: a worker gets a :class:`Pacer` through its training hooks (:mod:`workers.training.hooks`,
entry :data:`HOOK`) only when ``HDET_BENCH_PACE`` names a directory (the bench sets both for its own
local Ray, whose processes inherit them). The two ends talk
through two named pipes in that directory: ``ready`` (the side reports the turn it ended) and
``go`` (the bench writes a byte); ``turn_steps`` holds the steps of a turn. A side that waits
blocks in a read and uses no CPU.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from workers.procfs import command_line, descendants, stat_fields

__all__ = [
    "ENV",
    "HOOK",
    "Pacer",
    "Baton",
    "Turn",
    "Freezer",
    "pids_named",
    "niceness",
    "RAY_TRAIN_PROCESSES",
]

ENV = "HDET_BENCH_PACE"
#: the entry of ``HDET_TRAIN_HOOKS`` (:mod:`workers.training.hooks`) that gives a worker its :class:`Pacer`.
HOOK = "benchmarks.pace:hook"


class Turn(NamedTuple):
    """What a side reports at the end of a turn (epoch 0: it is ready to start)."""

    epoch: int
    steps: int
    seconds: float  # the turn's steps, each timed as the side times its steps
    images: int
    start: float  # wall clock: the first step's start, the last step's end
    end: float
    first_seconds: float  # the turn's first step (the side has just been let go)
    first_images: int


class Pacer:
    """The side's end of a :class:`Baton`'s pipes in ``directory`` (the bench has created them)."""

    def __init__(self, directory: str | Path):
        d = Path(directory)
        self.turn_steps = int((d / "turn_steps").read_text())
        # The bench holds both pipes open for reading and writing, so neither open blocks.
        self._ready = open(d / "ready", "wb", buffering=0)  # noqa: SIM115 - lives as long as the side
        self._go = open(d / "go", "rb", buffering=0)  # noqa: SIM115
        self._steps, self._seconds, self._images, self._start = 0, 0.0, 0, 0.0  # the turn so far
        self._first: tuple[float, int] = (0.0, 0)

    @classmethod
    def from_env(cls) -> Pacer | None:
        """The worker's pacer if ``HDET_BENCH_PACE`` is set, else None (the loop then waits for nothing)."""
        directory = os.environ.get(ENV)
        return cls(directory) if directory else None

    def start(self) -> None:
        """Tell the bench this side is ready to train, and wait for its go."""
        self._report(Turn(0, 0, 0.0, 0, 0.0, 0.0, 0.0, 0))

    def step(self, epoch: int, seconds: float, images: int, *, last: bool) -> bool:
        """Count a training step of ``seconds``; at the end of a turn (``turn_steps`` steps, or the
        epoch's ``last`` step), report it and wait for the go. True when it waited: the caller's
        clock for its next step starts again then."""
        now = time.time()
        if self._steps == 0:
            self._start = now - seconds
            self._first = (seconds, images)
        self._steps += 1
        self._seconds += seconds
        self._images += images
        if self._steps < self.turn_steps and not last:
            return False
        turn = Turn(epoch, self._steps, self._seconds, self._images, self._start, now, *self._first)
        self._steps, self._seconds, self._images = 0, 0.0, 0
        self._report(turn)
        return True

    def _report(self, turn: Turn) -> None:
        self._ready.write((" ".join(repr(v) for v in turn) + "\n").encode())
        if not self._go.read(1):
            raise RuntimeError("hdet bench train: the bench closed its pipe")


class _PacerHook:
    """The training loop's hook (:mod:`workers.training.hooks`): the bench's turns, on the worker's side."""

    def __init__(self, pacer: Pacer):
        self.pacer = pacer

    def train_start(self) -> None:
        self.pacer.start()

    def step_end(self, epoch: int, seconds: float, images: int, *, last: bool) -> bool:
        return self.pacer.step(epoch, seconds, images, last=last)


def hook(run_key: str, rank: int) -> _PacerHook | None:
    """Rank 0's hook when ``HDET_BENCH_PACE`` names the bench's directory (None otherwise)."""
    pacer = Pacer.from_env() if rank == 0 else None
    return _PacerHook(pacer) if pacer is not None else None


class Baton:
    """The bench's end: makes one side's pipes in ``directory``, which must not exist."""

    def __init__(self, directory: Path, turn_steps: int):
        directory.mkdir(parents=True)
        (directory / "turn_steps").write_text(str(turn_steps))
        os.mkfifo(directory / "ready")
        os.mkfifo(directory / "go")
        self.directory = directory
        # Read and write ends in one descriptor each: opening never blocks, and the side's opens
        # do not either (a pipe with a reader and a writer).
        self._ready = os.open(directory / "ready", os.O_RDWR | os.O_NONBLOCK)
        self._go = os.open(directory / "go", os.O_RDWR)
        self._buffer = b""

    def next_turn(self, alive: Callable[[], bool]) -> Turn | None:
        """The side's report once it waits again, or None once it has ended (``alive()`` false)
        without one."""
        while b"\n" not in self._buffer:
            readable, _, _ = select.select([self._ready], [], [], 0.5)
            if readable:
                self._buffer += os.read(self._ready, 4096)
                continue
            if not alive():
                try:  # what it wrote just before it ended
                    self._buffer += os.read(self._ready, 4096)
                except BlockingIOError:
                    pass
                if b"\n" not in self._buffer:
                    return None
        line, self._buffer = self._buffer.split(b"\n", 1)
        e, s, sec, i, a, b, fs, fi = line.split()
        return Turn(int(e), int(s), float(sec), int(i), float(a), float(b), float(fs), int(fi))

    def go(self) -> None:
        """Let the side train its next turn."""
        os.write(self._go, b"g")

    def close(self) -> None:
        os.close(self._ready)
        os.close(self._go)


class Freezer:
    """Stops (SIGSTOP) the processes ``pids`` for a while and lets them go on (SIGCONT) after it:
    the local Ray's, while the plain loop trains as if no Ray were there."""

    def __init__(self, pids: set[int]):
        self.pids = pids
        self.stopped: list[int] = []

    def __enter__(self) -> Freezer:
        import signal

        for pid in sorted(self.pids):
            try:
                os.kill(pid, signal.SIGSTOP)
                self.stopped.append(pid)
            except ProcessLookupError:
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for pid in self.stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.stopped = []


#: The processes of a Ray Train run besides the local Ray's own (their command lines, as Ray sets them).
RAY_TRAIN_PROCESSES = ("ray::RayTrainWorker", "ray::TrainController", "ray::SynchronizationActor")


def pids_named(names: tuple[str, ...]) -> set[int]:
    """This process's descendants whose command line starts with one of ``names``."""
    return {pid for pid in descendants(os.getpid()) if command_line(pid).startswith(names)}


def niceness(pid: int) -> str:
    """The niceness of ``pid`` (from ``/proc``), or ``?``."""
    fields = stat_fields(pid)
    return "?" if fields is None else fields[16]
