"""`LocalEngine`: the per-item functions in this process (1 worker) or in spawned worker processes.

The worker processes live as long as the engine (so a model a function caches is loaded once per process for
every stage that uses the engine), each with an equal share of the host's CPU threads. A worker that dies
(killed, out of memory) breaks the pool: it is started again and the items that were running are retried, up
to `max_retries` times each; an item that raises OSError is retried the same way.
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool

from mixlm.engine.base import (
    RETRYABLE,
    Count,
    Engine,
    EngineError,
    Failed,
    TaskProgress,
    cpu_count,
    set_worker_threads,
    unwrap,
)


def _start_worker(threads: int) -> None:
    set_worker_threads(threads)


class LocalEngine(Engine):
    name = "local"

    def __init__(self, workers: int = 1, *, progress: bool = True, max_retries: int = 3):
        self.workers = max(1, int(workers))
        self.progress = progress
        self.max_retries = max_retries
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            threads = max(1, cpu_count() // self.workers)
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"),  # no fork of a process with threads
                initializer=_start_worker, initargs=(threads,))
        return self._pool

    def _drop_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def imap(self, fn: Callable, items: Iterable, *, desc: str = "", count: Count | None = None,
             stateful: bool = False, gpus: float = 0) -> Iterator:
        items = list(items)
        progress = TaskProgress(self.progress, desc, len(items))
        failed = True
        try:
            if self.workers <= 1 or len(items) <= 1:
                for item in items:
                    result = self._call_here(fn, item, desc)
                    progress.done(count(result) if count else None)
                    yield result
            else:
                yield from self._pool_imap(fn, items, desc, count, progress)
            failed = False
        finally:
            progress.close(failed)

    def _call_here(self, fn: Callable, item, desc: str):
        for attempt in range(self.max_retries + 1):
            try:
                return fn(item)
            except RETRYABLE:
                if attempt == self.max_retries:
                    raise
        raise AssertionError("unreachable")

    def _pool_imap(self, fn: Callable, items: list, desc: str, count: Count | None, progress: TaskProgress
                   ) -> Iterator:
        """Items on the pool, at most 2 x workers queued, results in order. When a worker dies the pool breaks
        and takes every running item with it; those items then run again one at a time, so the one that kills
        its worker is known and charged a try (the others are not)."""
        window = 2 * self.workers  # enough queued that no worker idles, few enough to bound the results held
        attempts = [0] * len(items)
        waiting = collections.deque(range(len(items)))
        suspects: collections.deque[int] = collections.deque()  # lost in a break: rerun alone
        running: dict[concurrent.futures.Future, int] = {}
        results: dict[int, object] = {}
        yielded = 0
        try:
            while yielded < len(items):
                if suspects:
                    if not running:
                        i = suspects.popleft()
                        running[self._executor().submit(fn, items[i])] = i
                else:
                    stop = min((i for i, r in results.items() if isinstance(r, Failed)), default=len(items))
                    while waiting and waiting[0] < stop and len(running) < window:
                        i = waiting.popleft()
                        running[self._executor().submit(fn, items[i])] = i
                done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                broken = False
                for future in done:
                    i = running[future]
                    try:
                        results[i] = future.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    except RETRYABLE as e:
                        attempts[i] += 1
                        del running[future]
                        if attempts[i] > self.max_retries:
                            results[i] = Failed(e)
                        else:
                            (suspects if suspects else waiting).appendleft(i)
                        continue
                    except Exception as e:  # noqa: BLE001 - the item's own error: raised when its turn comes
                        del running[future]
                        results[i] = Failed(e)
                        continue
                    del running[future]
                    progress.done(count(results[i]) if count else None)
                if broken:
                    lost = sorted(running.values())
                    running.clear()
                    self._drop_pool()
                    if len(lost) == 1:  # it ran alone: it killed its worker
                        attempts[lost[0]] += 1
                        if attempts[lost[0]] > self.max_retries:
                            results[lost[0]] = Failed(EngineError(
                                f"{desc or 'a task'}: item {lost[0]} of {len(items)} failed {attempts[lost[0]]} "
                                "times: its worker process died each time (out of memory? killed?)"))
                            lost = []
                    suspects.extendleft(reversed(lost))
                while yielded in results:
                    yield unwrap(results.pop(yielded))
                    yielded += 1
        finally:
            for future in running:
                future.cancel()
