"""The interface both engines implement, the progress line they draw, and what counts as a transient fault."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

# Exceptions worth another try: a read or write that failed for a reason outside the data (a flaky disk, an
# object store's dropped connection). Every other exception is deterministic (bad input, a bug) and is raised.
RETRYABLE: tuple[type[BaseException], ...] = (OSError,)

Count = Callable[[Any], int]  # a result -> the documents it covers (for documents/s)


class EngineError(RuntimeError):
    """A task failed for a reason outside the stage: its worker died on every try, or the cluster went away."""


_THREADS: list[int] = []  # set in a worker process: its share of the host's CPU threads


def set_worker_threads(threads: int) -> None:
    _THREADS.append(max(1, int(threads)))


def worker_threads() -> int | None:
    """This worker's share of CPU threads (for torch.set_num_threads), or None in the driver process."""
    return _THREADS[-1] if _THREADS else None


class Failed:
    """An item's exception, held until the items before it are yielded: a map raises the error of the first
    failing item in order, whichever finished first."""

    def __init__(self, error: BaseException):
        self.error = error


def unwrap(result):
    """The result, or raises the exception a `Failed` holds."""
    if isinstance(result, Failed):
        raise result.error
    return result


class TaskProgress:
    """A tqdm line on stderr over tasks: done / total, ETA, and documents/s when results count documents."""

    def __init__(self, enabled: bool, desc: str, total: int):
        self.bar = None
        self.documents, self.start = 0, time.perf_counter()
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(desc=desc, total=total, unit="task", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def done(self, documents: int | None = None) -> None:
        if self.bar is None:
            return
        if documents:
            self.documents += documents
            rate = self.documents / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{self.documents:,} documents, {rate:,.0f}/s", refresh=False)
        self.bar.update(1)

    def close(self, failed: bool = False) -> None:
        if self.bar is not None:
            if failed:
                self.bar.leave = False  # the error is the one line left on stderr
            self.bar.close()


class Engine:
    """Runs per-item functions (module-level, picklable; items of plain data) somewhere; see mixlm.engine."""

    name = "engine"
    workers = 1  # tasks at once
    progress = True

    def imap(self, fn: Callable, items: Iterable, *, desc: str = "", count: Count | None = None,
             stateful: bool = False, gpus: float = 0) -> Iterator:
        """fn(item) per item, yielded in the items' order. `count(result)` -> documents, for the progress
        line; `stateful`: one long-lived worker per slot (models cached per process load once per worker);
        `gpus`: GPUs each such worker holds (Ray; ignored locally)."""
        raise NotImplementedError

    def map(self, fn: Callable, items: Iterable, **kwargs) -> list:
        """`imap` as a list."""
        return list(self.imap(fn, items, **kwargs))

    def shuffle(self, map_fn: Callable, items: Sequence, buckets: int, reduce_fn: Callable, *, desc: str = ""
                ) -> list:
        """A keyed shuffle: map_fn(item) -> a sequence of `buckets` parts (part b holds the keys that hash to
        bucket b); reduce_fn((b, [part b of every item, in the items' order])) -> the result of bucket b.
        Returns the results in bucket order."""
        parts = self.map(map_fn, items, desc=f"{desc}: map")
        for i, p in enumerate(parts):
            if len(p) != buckets:
                raise EngineError(f"{desc}: map task {i} returned {len(p)} parts for {buckets} buckets")
        return self.map(reduce_fn, [(b, [p[b] for p in parts]) for b in range(buckets)], desc=f"{desc}: reduce")

    def gpus(self) -> int:
        """GPUs the engine can hand to workers (`imap(gpus=...)`): the cluster's for Ray; 0 locally, where a
        model's own `device` setting picks the GPU."""
        return 0

    def close(self) -> None:
        """Releases the workers (a cluster this engine connected to keeps running)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> str:
        return f"{self.name} engine, {self.workers} worker{'s' * (self.workers != 1)}"


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
