"""`RayEngine`: the per-item functions as Ray tasks (or, `stateful`, on a pool of Ray actors) on a cluster.

`RayEngine(address)` connects to the cluster at `address` (`ray start --head` prints it; `launch/ray.py` starts
one on SLURM nodes or a pod's hosts), or to RAY_ADDRESS, or starts a cluster on this host; a cluster this
process was already connected to (`ray.init` before) is used as it is. Every host of the cluster needs mixlm
installed (the same venv path) and the stage's input and output folders at the same paths (a shared file
system or an object store). A task gets one CPU; `workers` bounds the tasks in flight (0: one per CPU of the
cluster). Tasks are retried by Ray when their worker dies (`max_retries`) or they raise OSError; any other
exception comes back as the stage raised it, without Ray's traceback. Actors (`stateful`) are restarted when
they die and rerun their item. The engine never shuts down a cluster it did not start.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from mixlm.engine.base import (
    RETRYABLE,
    Count,
    Engine,
    EngineError,
    Failed,
    TaskProgress,
    set_worker_threads,
    unwrap,
)
from mixlm.errors import ConfigError


def _run(fn: Callable, item):
    return fn(item)


def _run_parts(fn: Callable, item, buckets: int):
    """A shuffle map task: its `buckets` parts, then their number (a small object the driver waits on, so a
    failed task is named before the reduce without fetching any part)."""
    parts = list(fn(item))
    if len(parts) != buckets:
        raise EngineError(f"a shuffle map task returned {len(parts)} parts for {buckets} buckets")
    return (*parts, len(parts))


def _run_reduce(fn: Callable, bucket: int, *parts):
    return fn((bucket, list(parts)))


class _Worker:
    """A Ray actor: runs items one at a time in one long-lived process (its module caches persist)."""

    def __init__(self, threads: int):
        set_worker_threads(threads)

    def run(self, fn: Callable, item):
        return fn(item)


class RayEngine(Engine):
    name = "ray"

    def __init__(self, address: str | None = None, workers: int = 0, *, progress: bool = True,
                 max_retries: int = 3):
        try:
            import ray
        except ImportError:
            raise ConfigError("--engine ray needs Ray: pip install 'mixlm[ray]' (ray==2.60.0)") from None
        self.ray = ray
        self.progress = progress
        self.max_retries = max_retries
        self._started = False
        if not ray.is_initialized():
            kwargs: dict = {"include_dashboard": False, "log_to_driver": False, "logging_level": "WARNING"}
            if address or os.environ.get("RAY_ADDRESS"):
                kwargs["address"] = address or os.environ["RAY_ADDRESS"]
            else:  # a cluster on this host: its workers import this mixlm, wherever the driver found it
                import mixlm

                root = str(Path(mixlm.__file__).resolve().parents[1])
                path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
                kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
                if workers:
                    kwargs["num_cpus"] = workers
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = kwargs.get("address", "this host")
                raise ConfigError(f"cannot connect to the Ray cluster at {where} ({' '.join(str(e).split())[:300]}); "
                                  "start it (`ray start --head`, or launch/ray.py) or check --ray-address") from None
            self._started = "address" not in kwargs
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = max(1, int(workers) or cpus)
        self._task = ray.remote(_run)
        self._actors: tuple[float, list] | None = None  # (GPUs each, the actors) of the last stateful map

    def describe(self) -> str:
        return f"ray engine, {self.workers} worker{'s' * (self.workers != 1)} " \
               f"({int(self.ray.cluster_resources().get('CPU', 0))} CPUs in the cluster)"

    def gpus(self) -> int:
        return int(self.ray.cluster_resources().get("GPU", 0))

    def close(self) -> None:
        self._release_actors()
        if self._started:
            self.ray.shutdown()
            self._started = False

    # ---- errors ---------------------------------------------------------------------------------------------
    def _get(self, ref, desc: str, i: int, n: int):
        """ray.get(ref), with a task's own exception raised as it was raised (no Ray wrapper or traceback)."""
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(e.cause, BaseException) else None
            if cause is not None and not isinstance(cause, ray.exceptions.RayError):
                raise cause from None
            raise EngineError(f"{desc or 'a task'}: item {i} of {n} failed on the cluster: "
                              f"{' '.join(str(cause or e).split())[:500]}") from None
        except ray.exceptions.RayError as e:  # a worker or actor that died on every try, a lost object
            raise EngineError(f"{desc or 'a task'}: item {i} of {n} failed after {self.max_retries + 1} tries on "
                              f"the cluster ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None

    # ---- map ------------------------------------------------------------------------------------------------
    def imap(self, fn: Callable, items: Iterable, *, desc: str = "", count: Count | None = None,
             stateful: bool = False, gpus: float = 0) -> Iterator:
        items = list(items)
        progress = TaskProgress(self.progress, desc, len(items))
        failed = True
        try:
            if stateful:
                yield from self._actor_imap(fn, items, desc, count, progress, gpus)
            else:
                self._release_actors()  # they hold CPUs the tasks need
                task = self._task.options(num_cpus=1, num_gpus=gpus, max_retries=self.max_retries,
                                          retry_exceptions=list(RETRYABLE))
                fn_ref = self.ray.put(fn)
                yield from self._ordered(lambda i: task.remote(fn_ref, items[i]), len(items), desc, count, progress)
            failed = False
        finally:
            progress.close(failed)

    def _ordered(self, submit: Callable, n: int, desc: str, count: Count | None, progress: TaskProgress,
                 release: Callable | None = None) -> Iterator:
        """Submits tasks 0..n-1 (at most `workers` in flight) and yields their results in order."""
        ray = self.ray
        window = self.workers
        running: dict = {}
        results: dict[int, object] = {}
        submitted = yielded = 0
        try:
            while yielded < n:
                stop = min((i for i, r in results.items() if isinstance(r, Failed)), default=n)
                while submitted < stop and len(running) < window:
                    ref = submit(submitted)
                    if ref is None:  # no free actor
                        break
                    running[ref] = submitted
                    submitted += 1
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    i = running.pop(ref)
                    if release is not None:
                        release(ref)
                    try:
                        results[i] = self._get(ref, desc, i, n)
                    except Exception as e:  # noqa: BLE001 - the item's own error: raised when its turn comes
                        results[i] = Failed(e)
                        continue
                    progress.done(count(results[i]) if count else None)
                while yielded in results:
                    yield unwrap(results.pop(yielded))
                    yielded += 1
        finally:
            for ref in running:  # a failed item, or a consumer that stopped early: the rest is not needed
                ray.cancel(ref)

    def _actor_imap(self, fn: Callable, items: list, desc: str, count: Count | None, progress: TaskProgress,
                    gpus: float) -> Iterator:
        """Items on `workers` actors, each running one item at a time. The actors live on for the next stateful
        map (their models stay loaded); since they hold their CPUs (and GPUs), a stateless map releases them."""
        ray = self.ray
        if self._actors is None or self._actors[0] != gpus:
            self._release_actors()
            cls = ray.remote(_Worker).options(num_cpus=1, num_gpus=gpus, max_restarts=self.max_retries,
                                              max_task_retries=self.max_retries)
            self._actors = (gpus, [cls.remote(1) for _ in range(self.workers)])
        idle = list(self._actors[1])
        busy: dict = {}
        fn_ref = ray.put(fn)

        def submit(i: int):
            if not idle:
                return None
            actor = idle.pop()
            ref = actor.run.remote(fn_ref, items[i])
            busy[ref] = actor
            return ref

        yield from self._ordered(submit, len(items), desc, count, progress,
                                 release=lambda ref: idle.append(busy.pop(ref)))

    def _release_actors(self) -> None:
        if self._actors is not None:
            for actor in self._actors[1]:
                self.ray.kill(actor)
            self._actors = None

    # ---- shuffle --------------------------------------------------------------------------------------------
    def shuffle(self, map_fn: Callable, items: Sequence, buckets: int, reduce_fn: Callable, *, desc: str = ""
                ) -> list:
        ray = self.ray
        items = list(items)
        self._release_actors()
        options = {"num_cpus": 1, "max_retries": self.max_retries, "retry_exceptions": list(RETRYABLE)}
        mapper = ray.remote(_run_parts).options(num_returns=buckets + 1, **options)
        reducer = ray.remote(_run_reduce).options(**options)
        fn_ref = ray.put(map_fn)
        parts = []  # parts[i][b]: a reference to map task i's part for bucket b, held in the object store
        progress = TaskProgress(self.progress, f"{desc}: map", len(items))
        failed = True
        try:
            pending = {}
            for i, item in enumerate(items):
                *refs, done = mapper.remote(fn_ref, item, buckets)
                parts.append(refs)
                pending[done] = i
            while pending:  # wait for every map task, so its failure is named before the reduce
                ready, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(ready[0])
                self._get(ready[0], f"{desc}: map", i, len(items))
                progress.done()
            failed = False
        finally:
            progress.close(failed)
        reduce_ref = ray.put(reduce_fn)
        progress = TaskProgress(self.progress, f"{desc}: reduce", buckets)
        failed = True
        try:
            results = list(self._ordered(
                lambda b: reducer.remote(reduce_ref, b, *[p[b] for p in parts]), buckets, f"{desc}: reduce", None,
                progress))
            failed = False
        finally:
            progress.close(failed)
        return results
