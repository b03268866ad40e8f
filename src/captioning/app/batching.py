"""Dynamic batching: requests that arrive together are decoded together.

Beam search over a batch reads the decoder's weights once per step for every image in it, so
16 images cost far less than 16 searches one after another (benchmarks/beam_search.py). The
server's requests each hold one image, so a `Batcher` gathers them: the first request to come
opens a window of `wait_s`; whatever arrives in it (and whatever queued while the model was busy)
is decoded as one batch, up to `max_batch` images. With one client the window costs its length
in latency and nothing else.

Each image's beams depend on that image alone (`decoding.beam_search`), so a request gets the
caption it would get alone; only float rounding in the batched matmuls differs (~1e-8).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class Job:
    """One image's features, waiting for a batch; `future` gets its beams."""

    feats: Tensor  # (1, N, D)
    beam_size: int
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.perf_counter)
    started: float = 0.0  # when its batch began decoding
    batch_size: int = 0  # images decoded in that batch


class Batcher:
    """A thread that runs `run(jobs)` on batches of jobs gathered from many request threads.

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
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, feats: Tensor, beam_size: int) -> Job:
        """Queue one image; `job.future.result()` waits for its beams."""
        if not self._thread.is_alive():
            raise RuntimeError("the batcher has been closed")
        job = Job(feats, beam_size)
        self._queue.put(job)
        return job

    def close(self) -> None:
        """Finish the queued jobs, then stop the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _gather(self, first: Job) -> tuple[list[Job], bool]:
        """`first` plus what arrives within the window (queued jobs join without waiting)."""
        jobs, deadline = [first], time.perf_counter() + self.wait_s
        while len(jobs) < self.max_batch:
            left = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            jobs, stop = self._gather(first)
            by_beam: dict[int, list[Job]] = {}
            for job in jobs:  # one beam size per search; mixed sizes run one after another
                by_beam.setdefault(job.beam_size, []).append(job)
            for group in by_beam.values():
                started = time.perf_counter()
                for job in group:
                    job.started, job.batch_size = started, len(group)
                try:
                    results = self.run(group)
                except Exception as e:  # every waiting request hears of it, not just one
                    for job in group:
                        job.future.set_exception(e)
                    continue
                for job, result in zip(group, results, strict=True):
                    job.future.set_result(result)
