"""Ctrl-C / SIGTERM as a request to stop at the next safe point, shared by a figure and the runs inside it.

The first SIGINT or SIGTERM sets a flag (`StopRequests.signum`) that the owner polls at points where stopping
loses nothing: the train loop between steps (it then checkpoints), a figure's runner between runs. A second
signal raises KeyboardInterrupt: stop at once (the last checkpoint stays, the work since it is lost).

Requests nest: a figure holds one while it runs its runs, and every train run inside it enters its own. The
inner one starts with any request the outer one already saw (a signal during a run's setup) and passes its
own on to the outer one, so one Ctrl-C stops both the run and the figure, and a second stops at once.
"""
from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """Context manager owning the SIGINT/SIGTERM handlers (main thread only; elsewhere it sees no signal)."""

    def __init__(self, what: str = "finishing the current step, then saving a checkpoint"):
        self.signum: int | None = None
        self._what = what  # how the owner answers the first signal (printed)
        self._previous: dict = {}
        self._outer: StopRequests | None = None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.request(signum)
        print(f"{signal.Signals(signum).name}: {self._what} (send it again to stop at once)", file=sys.stderr,
              flush=True)

    def request(self, signum: int) -> None:
        """Records a stop request (as a signal would), here and in every enclosing StopRequests."""
        self.signum = signum
        if self._outer is not None and self._outer.signum is None:
            self._outer.request(signum)

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process the signal ended (130 SIGINT, 143 SIGTERM)."""
        return 128 + (self.signum or 0)

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                previous = signal.signal(sig, self._handle)
                self._previous[sig] = previous
                outer = getattr(previous, "__self__", None)
                if isinstance(outer, StopRequests):
                    self._outer = outer
                    self.signum = self.signum or outer.signum  # a signal before this owner took over
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
