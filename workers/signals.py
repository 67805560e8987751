"""How ``hdet run`` stops on a signal: SIGINT and SIGTERM interrupt the experiment, the clean-up
after it runs to its end. Owns the handlers and which signal asked for the stop.

SIGTERM does what SIGINT does: Tune's graceful stop while a search runs (Tune replaces the SIGINT
handler for that time), else a ``KeyboardInterrupt`` in the main thread.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["Stop", "stop_on_signals", "ignore_signals"]


class Stop:
    """Which signal asked this process to stop (``signal``: None while none did)."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process ended by it (130 for SIGINT)."""
        return 128 + int(getattr(signal, self.signal or "SIGINT"))

    def on_sigint(self, signum: int, frame: Any) -> None:
        self.signal = self.signal or "SIGINT"
        raise KeyboardInterrupt

    def on_sigterm(self, signum: int, frame: Any) -> None:
        self.signal = self.signal or "SIGTERM"
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler) and handler != self.on_sigterm:
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt


@contextlib.contextmanager
def stop_on_signals(stop: Stop) -> Iterator[Stop]:
    """SIGINT and SIGTERM interrupt the block, noting the signal in ``stop`` (in the main thread,
    where Python runs handlers; elsewhere nothing changes). The handlers before come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, stop.on_sigint)
    signal.signal(signal.SIGTERM, stop.on_sigterm)
    try:
        yield stop
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def ignore_signals() -> None:
    """For the clean-up after a stop: a second Ctrl-C would leave runs ``RUNNING``."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
