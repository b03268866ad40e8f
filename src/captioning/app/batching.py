"""Dynamic batching: requests that arrive together are beam-searched together.

Beam search over a batch reads the decoder's weights once per step for all its images, so 16
images cost far less than 16 searches one after another (benchmarks/beam_search.py). Each
server request holds one image, so a `Batcher` gathers them on one thread: the first job to
arrive waits up to `wait_s` for company, but only while other requests are still on their way
(announced with `expect()` when they reach the server, before their upload is read, until they
submit their image); then everything queued, up to `max_batch` jobs, is searched as one batch.
A lone client therefore never waits, and jobs that queue while the model is busy join the next
batch at once. With 4 clients on a loaded 2-core machine a 5 or 20 ms window made batches of
2-2.6 (the others were still uploading or decoding); 50 ms made them 4.

Each image's beams depend on that image alone (`decoding.beam_search`), so a request gets the
caption it would get alone; only float rounding in the batched matmuls differs (~1e-8).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class Job:
    """One image, waiting for a batch; `future` gets its beams."""

    images: Tensor  # (1, 3, S, S)
    beam_size: int
    future: Future = field(default_factory=Future)
    batch_size: int = 0  # images searched together with this one, itself included


class Batcher:
    """A thread that runs `run(jobs)` on batches of jobs submitted by many request threads.

    `run` receives jobs of one beam size and returns one result per job, in order.
    """

    def __init__(
        self,
        run: Callable[[Sequence[Job]], Sequence[Any]],
        wait_s: float,
        max_batch: int,
        name: str = "caption-batcher",
    ):
        if wait_s <= 0 or max_batch < 1:
            raise ValueError("a Batcher needs wait_s > 0 and max_batch >= 1")
        self.run, self.wait_s, self.max_batch = run, wait_s, max_batch
        self._cv = threading.Condition()
        self._jobs: deque[Job] = deque()
        self._coming = 0  # requests preparing a job (decoding, encoding)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def expect(self) -> Callable[[], None]:
        """Announce a request that will submit a job soon: a batch about to start waits for it.

        Returns the function to call once it has submitted (or given up); calls after the
        first do nothing.
        """
        with self._cv:
            self._coming += 1
        done = threading.Event()

        def arrived() -> None:
            with self._cv:
                if not done.is_set():
                    done.set()
                    self._coming -= 1
                    self._cv.notify_all()

        return arrived

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """`expect()` as a context: announced inside it."""
        arrived = self.expect()
        try:
            yield
        finally:
            arrived()

    def submit(self, images: Tensor, beam_size: int) -> Job:
        """Queue one image; `job.future.result()` waits for its beams."""
        job = Job(images, beam_size)
        with self._cv:
            if self._closed:
                raise RuntimeError("the batcher has been closed")
            self._jobs.append(job)
            self._cv.notify_all()
        return job

    def close(self) -> None:
        """Finish the queued jobs, then stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()

    def _next_batch(self) -> list[Job] | None:
        """The next batch, once the window has passed or no other request is on its way."""
        with self._cv:
            while not self._jobs and not self._closed:
                self._cv.wait()
            if not self._jobs:
                return None  # closed, and nothing left to do
            deadline = time.perf_counter() + self.wait_s
            while len(self._jobs) < self.max_batch and self._coming > 0 and not self._closed:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cv.wait(left)
            n = min(len(self._jobs), self.max_batch)
            return [self._jobs.popleft() for _ in range(n)]

    def _loop(self) -> None:
        while (jobs := self._next_batch()) is not None:
            by_beam: dict[int, list[Job]] = {}
            for job in jobs:  # one beam size per search; mixed sizes run one after another
                by_beam.setdefault(job.beam_size, []).append(job)
            for group in by_beam.values():
                for job in group:
                    job.batch_size = len(group)
                try:
                    results = self.run(group)
                except Exception as e:  # every waiting request hears of it, not just one
                    for job in group:
                        job.future.set_exception(e)
                    continue
                for job, result in zip(group, results, strict=True):
                    job.future.set_result(result)
