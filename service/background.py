"""Where the reconciler and the submitter run: in a process of their own (the default), or as
threads of the API process (``HDET_BACKGROUND=thread``).

A process of their own (``multiprocessing``'s spawn, started and stopped with the app's lifespan, on
the same database) keeps their work off the API process's GIL: a reconciler pass parses Ray's whole
job list (2 MB at 800 jobs) in one call no request can interrupt, and the submitter's Ray client
and writes take a tenth of a core at 25 submissions a second. The API process shares three small
things with it: whether the reconciler's first pass is done (readiness), a wake-up for
the submitter (a record was accepted) and the submitter's last Ray error (what an accepted record
waits for). It ends with the API: when asked, and when the API process is gone.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Any, Protocol

from service.reconciler import Reconciler
from service.settings import Settings
from service.submitter import Submitter, waiting_for

__all__ = ["Background", "InThreads", "InProcess", "SharedText", "ERROR_BYTES"]

log = logging.getLogger("hdet.service")

#: room for the submitter's last Ray error shared with the API process (longer ones are cut)
ERROR_BYTES = 2048
#: how long the background process has to finish its pass before it is terminated
STOP_WAIT_S = 30.0


class Background(Protocol):
    """What the API process needs of its reconciler and submitter."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def wake(self) -> None:
        """A record was accepted: the submitter sends it now rather than at its next look."""

    def waiting_for(self) -> str | None:
        """What a record accepted now waits for, when that is known already (Ray unreachable)."""

    def readiness(self) -> tuple[bool, str]:
        """Whether the reconciler's first pass is done, and what to say about it."""


def _pass_readiness(done: bool) -> tuple[bool, str]:
    return done, "first pass done" if done else "first pass not done yet"


class InThreads:
    """The reconciler and the submitter as threads of the API process."""

    def __init__(self, reconciler: Reconciler, submitter: Submitter):
        self.reconciler = reconciler
        self.submitter = submitter

    def start(self) -> None:
        self.reconciler.start()
        self.submitter.start()

    def stop(self) -> None:
        self.submitter.stop()
        self.reconciler.stop()

    def wake(self) -> None:
        self.submitter.wake()

    def waiting_for(self) -> str | None:
        return self.submitter.waiting_for()

    def readiness(self) -> tuple[bool, str]:
        return _pass_readiness(self.reconciler.ready.is_set())


class SharedText:
    """A short text one process writes and another reads, with no lock a writer that dies could
    leave held: a read that overlapped a write (its sequence number moved) reads again."""

    def __init__(self, ctx: Any, size: int):
        self.size = size
        self._seq = ctx.RawValue("L", 0)  # odd while a write is under way
        self._length = ctx.RawValue("i", 0)
        self._text = ctx.RawArray("c", size)

    def write(self, text: str | None) -> None:
        raw = (text or "").encode("utf-8")[: self.size]
        self._seq.value += 1
        self._text[: len(raw)] = raw
        self._length.value = len(raw)
        self._seq.value += 1

    def read(self) -> str:
        for _ in range(1000):
            seq = self._seq.value
            if seq % 2 == 0:
                raw = self._text[: self._length.value]
                if self._seq.value == seq:
                    return bytes(raw).decode("utf-8", errors="ignore")
            time.sleep(0)
        return ""


class InProcess:
    """The reconciler and the submitter in a child process of the API (spawn: nothing of the API
    process, its locks and threads included, is copied into it). They share no lock: a pipe carries
    the wake-ups (and its end tells the child to stop: the API closed it, or is gone), shared memory
    the first pass and the last Ray error, so a child that dies leaves nothing the API waits on."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._ctx = multiprocessing.get_context("spawn")
        self._passed = self._ctx.RawValue("b", 0)
        self._error = SharedText(self._ctx, ERROR_BYTES)
        self._wakes: Any = None
        self._process: Any = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        service_log = logging.getLogger("hdet.service")
        formatters = [h.formatter for h in service_log.handlers if h.formatter is not None]
        reader, self._wakes = self._ctx.Pipe(duplex=False)
        os.set_blocking(self._wakes.fileno(), False)  # a wake-up never waits for the child
        self._process = self._ctx.Process(
            target=_run,
            args=(self.settings, reader, self._passed, self._error),
            kwargs={"level": service_log.getEffectiveLevel(), "formatters": formatters},
            name="hdet-background",
            daemon=True,  # ended by multiprocessing when the API process exits without stopping it
        )
        self._process.start()
        reader.close()  # the child's end

    def stop(self) -> None:
        process = self._process
        if process is None:
            return
        self._wakes.close()  # the child's reads end: it stops
        process.join(STOP_WAIT_S)
        if process.is_alive():
            log.warning("the background process did not stop in %.0f s: terminated", STOP_WAIT_S)
            process.terminate()
            process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)

    def wake(self) -> None:
        try:
            os.write(self._wakes.fileno(), b"\0")
        except OSError:  # a full pipe holds a wake-up already; a closed one has no reader
            pass

    def waiting_for(self) -> str | None:
        return waiting_for(self._error.read() or None)

    def readiness(self) -> tuple[bool, str]:
        process = self._process
        if process is None or not process.is_alive():
            code = None if process is None else process.exitcode
            return False, f"the reconciler's process is not running (exit code {code})"
        return _pass_readiness(bool(self._passed.value))


def _run(
    settings: Settings,
    wakes: Any,
    passed: Any,
    error: SharedText,
    *,
    level: int,
    formatters: list[logging.Formatter],
) -> None:
    """The background process: the reconciler and the submitter until the API closes ``wakes``
    (or is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C at the terminal is the API's to handle
    service_log = logging.getLogger("hdet.service")
    service_log.setLevel(level)
    for formatter in formatters:  # its lines as the API's, in the same log
        handler = logging.StreamHandler()
        handler.setFormatter(formatter)
        service_log.addHandler(handler)

    from service.app import build_service

    service = build_service(settings.model_copy(update={"background": "thread"}))
    reconciler, submitter = service.reconciler, service.submitter
    submitter.on_ray_error = error.write
    stop = threading.Event()

    def pass_on_wakes() -> None:
        while True:
            try:
                if not os.read(wakes.fileno(), 4096):
                    break  # the API closed its end, or is gone
            except InterruptedError:
                continue
            submitter.wake()
        stop.set()

    def report_first_pass() -> None:
        reconciler.ready.wait()
        passed.value = 1

    threading.Thread(target=pass_on_wakes, name="hdet-wakes", daemon=True).start()
    threading.Thread(target=report_first_pass, name="hdet-ready", daemon=True).start()
    reconciler.start()
    submitter.start()
    try:
        stop.wait()
    finally:
        submitter.stop()
        reconciler.stop()
        service.store.close()
