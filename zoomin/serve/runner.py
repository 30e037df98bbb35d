"""The images waiting for the engine, and the lanes that run them.

A request's images become Jobs in one bounded queue (full: QueueFull, which the service answers 429). Each lane is
a thread owning one detector; a lane takes the oldest job, runs the whole ZoomIn job on it and resolves its future
exactly once. A job whose deadline passed while it waited is not started; one that passes it while running stops
at its next decode step (ZoomIn.detect's `deadline`). `close` stops taking jobs and finishes every job already
taken, so a graceful shutdown loses nothing.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zoomin.runtime.pipeline import DeadlineExceeded, DetectResult


class QueueFull(RuntimeError):
    """No room for more jobs; `retry_after_s` estimates when there will be."""

    def __init__(self, depth: int, retry_after_s: float):
        super().__init__(f"the queue is full ({depth} images waiting)")
        self.retry_after_s = retry_after_s


class ShuttingDown(RuntimeError):
    """The service is draining and takes no new jobs."""


@dataclass
class Job:
    image: np.ndarray  # decoded RGB
    name: str
    options: dict[str, Any]  # ZoomIn.detect keyword arguments (regions, zoom_regions, max_new_tokens)
    deadline: float  # time.monotonic()
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)


Detector = Any  # anything with ZoomIn.detect's signature
JobHook = Callable[[Job, DetectResult | None, BaseException | None], None]


class Runner:
    def __init__(self, detectors: Sequence[Detector], *, max_queue: int, on_done: JobHook | None = None):
        self._queue: collections.deque[Job] = collections.deque()
        self._max_queue = max_queue
        self._cond = threading.Condition()
        self._closing = False
        self._running = 0
        self._on_done = on_done
        self._job_s = collections.deque(maxlen=32)  # recent job durations, for Retry-After
        self._lanes = [threading.Thread(target=self._lane, args=(d,), name=f"zoomin-lane-{i}", daemon=True)
                       for i, d in enumerate(detectors)]
        for t in self._lanes:
            t.start()

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return self._running

    def submit_all(self, jobs: Sequence[Job]) -> None:
        """Queue all of `jobs` or none of them (a request's images are admitted together)."""
        with self._cond:
            if self._closing:
                raise ShuttingDown("the service is shutting down")
            if len(self._queue) + len(jobs) > self._max_queue:
                raise QueueFull(len(self._queue), self.retry_after_s())
            self._queue.extend(jobs)
            self._cond.notify_all()

    def retry_after_s(self) -> float:
        """Seconds the lanes need to work off today's queue, from recent job durations (at least 1)."""
        mean = sum(self._job_s) / len(self._job_s) if self._job_s else 1.0
        return max(1.0, mean * len(self._queue) / len(self._lanes))

    def close(self, timeout: float | None = None) -> bool:
        """Take no more jobs, finish the queued and running ones; True when every lane ended within `timeout`."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        end = None if timeout is None else time.monotonic() + timeout
        for t in self._lanes:
            t.join(None if end is None else max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in self._lanes)

    def _next(self) -> Job | None:
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            self._running += 1
            return self._queue.popleft()

    def _lane(self, detector: Detector) -> None:
        while (job := self._next()) is not None:
            result, error = None, None
            start = time.monotonic()
            try:
                if start > job.deadline:
                    raise DeadlineExceeded("deadline passed while queued")
                result = detector.detect(job.image, deadline=job.deadline, **job.options)
            except BaseException as e:  # resolved on the future; the lane goes on
                error = e
            finally:
                with self._cond:
                    self._running -= 1
            self._job_s.append(time.monotonic() - start)
            if self._on_done is not None:
                self._on_done(job, result, error)
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
