"""Long work off the GUI thread: a job runs on a worker thread and the GUI polls it.

The Slicer panel reads its inputs from the scene on the main thread, starts a
:class:`BackgroundJob` whose function touches no MRML node (model build, download, encoding,
seed search, walk), polls :meth:`BackgroundJob.snapshot` from a timer, and writes the result
nodes on the main thread when the job has finished.  The pipeline reports after every encoded
or decoded slice, so the job's state is never more than one slice old and a cancel costs at
most one slice of work.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass
class JobState:
    done: int = 0
    total: int = 0
    message: str = ""
    finished: bool = False
    cancelled: bool = False
    error: BaseException | None = None
    reports: int = 0  # progress reports received (the GUI gets a turn after each)
    longest_gap_s: float = 0.0  # longest time between two reports


class BackgroundJob:
    """``fn(job)`` on a daemon thread; ``job.progress`` / ``job.is_cancelled`` are the callbacks
    to hand to the library."""

    def __init__(self, fn, name: str = "FoBSegment"):
        self._fn = fn
        self._lock = threading.Lock()
        self._state = JobState()
        self._cancel = threading.Event()
        self._last = None
        self.result = None
        self.name = name
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "BackgroundJob":
        self._last = time.perf_counter()
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.result = self._fn(self)
        except BaseException as exc:  # handed to the GUI thread, which shows it
            with self._lock:
                self._state.error = exc
        finally:
            with self._lock:
                self._state.finished = True
                self._state.cancelled = self._cancel.is_set()

    # -------------------------------------------------------------- callbacks for the library
    def progress(self, done: int, total, message: str | None = None) -> None:
        now = time.perf_counter()
        with self._lock:
            s = self._state
            s.done, s.total = int(done), int(total or 0)
            if message is not None:
                s.message = message
            s.reports += 1
            if self._last is not None:
                s.longest_gap_s = max(s.longest_gap_s, now - self._last)
            self._last = now

    def set_message(self, message: str) -> None:
        with self._lock:
            self._state.message = message

    def is_cancelled(self) -> bool:
        return self._cancel.is_set()

    # -------------------------------------------------------------- GUI side
    def cancel(self) -> None:
        self._cancel.set()

    def snapshot(self) -> JobState:
        with self._lock:
            return JobState(**vars(self._state))

    def wait(self, timeout: float | None = None) -> JobState:
        self._thread.join(timeout)
        return self.snapshot()
