"""Where the per-document stages run: this host's processes (`LocalEngine`) or a Ray cluster (`RayEngine`).

Every stage that reads documents (`prepare`, `tokenizer train`'s sampling, `select signals|rate|dsir|classifier
score|dedup|pick|run`) is written as per-item functions (an input file, a shard to write, a table to read) that
an engine runs. Both engines run the same functions on the same items and hand the results back in the items'
order, so the bytes a stage writes do not depend on the engine, the worker count or the order tasks finish in.

    engine.imap(fn, items)     fn(item) for every item, results in the items' order, a bounded number in flight;
                               `stateful=True` keeps one long-lived worker per slot (a Ray actor) so a model a
                               function loads (cached per process) is loaded once per worker, not per item
    engine.map(fn, items)      the same, as a list
    engine.shuffle(m, items, buckets, r)   a keyed shuffle: m(item) -> one part per bucket, r(bucket, parts) ->
                               a result per bucket (parts in the items' order); on Ray the parts stay in the
                               cluster's object store, never on the driver

Faults: a worker process that dies, or a function that raises OSError (a flaky read, a lost connection), is
retried up to `max_retries` times; any other exception is the stage's own error and is raised as it is (one line,
no Ray traceback). Resuming is the stages' own: each item's function writes its output atomically with a
completion marker and returns early when the marker is there (Ray has no pipeline checkpointing), so a rerun
after a killed driver redoes only unfinished items. Progress (tasks done, documents/s, ETA) is drawn on the
driver's stderr.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from mixlm.engine.base import RETRYABLE, Engine, EngineError, worker_threads
from mixlm.engine.local import LocalEngine

ENGINES = ("local", "ray")


def make_engine(kind: str = "local", *, workers: int = 1, address: str | None = None, progress: bool = True,
                max_retries: int = 3) -> Engine:
    """An engine by name: 'local' (`workers` processes; 1: this process) or 'ray' (the cluster at `address`, or
    RAY_ADDRESS, or a new one on this host; at most `workers` tasks at once, 0: one per cluster CPU).
    Raises ConfigError for an unknown name, a missing Ray install or a cluster it cannot reach."""
    from mixlm.errors import ConfigError

    if kind == "local":
        if address:
            raise ConfigError("--ray-address applies only to --engine ray")
        return LocalEngine(workers, progress=progress, max_retries=max_retries)
    if kind == "ray":
        from mixlm.engine.ray_engine import RayEngine

        return RayEngine(address, workers, progress=progress, max_retries=max_retries)
    raise ConfigError(f"engine {kind!r}: use one of {', '.join(ENGINES)}")


@contextlib.contextmanager
def engine_or_local(engine: Engine | None, workers: int = 1, progress: bool = True) -> Iterator[Engine]:
    """`engine` as it is, or a LocalEngine of `workers` processes made (and closed) for the block."""
    if engine is not None:
        yield engine
        return
    with LocalEngine(workers, progress=progress) as own:
        yield own


__all__ = ["ENGINES", "RETRYABLE", "Engine", "EngineError", "LocalEngine", "engine_or_local", "make_engine", "worker_threads"]
