"""Test helper: real faults for the engines (a worker process that dies, a task that raises OSError), each
injected once per function by a marker file, so the retry is what makes the stage finish; and a driver that
kills itself after a number of finished tasks (run as a subprocess: `python tests/engine_faults.py ...`).
Imported by Ray workers too (the tests put tests/ on their PYTHONPATH)."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path


def _name(fn) -> str:
    inner = fn.func if isinstance(fn, functools.partial) else fn
    return f"{inner.__module__}.{getattr(inner, '__qualname__', type(inner).__name__)}"


class FailOnce:
    """fn, but its first call anywhere (any worker, any item) dies (`how="die"`: os._exit, as an OOM kill
    would end it) or raises OSError (`how="raise"`); the marker file says it happened."""

    def __init__(self, fn, folder: str, how: str):
        self.fn, self.folder, self.how = fn, folder, how

    def __call__(self, item):
        marker = Path(self.folder) / f"{self.how}-{_name(self.fn)}"
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # exactly one caller wins
        except FileExistsError:
            return self.fn(item)
        os.close(fd)
        if self.how == "die":
            os._exit(3)
        raise OSError(f"injected I/O error in {_name(self.fn)}")


class FaultyEngine:
    """An engine whose every map (and shuffle map and reduce) function fails once, as `FailOnce` says."""

    def __init__(self, engine, folder: str | Path, how: str):
        self.engine, self.folder, self.how = engine, str(folder), how
        Path(folder).mkdir(parents=True, exist_ok=True)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def imap(self, fn, items, **kwargs):
        return self.engine.imap(FailOnce(fn, self.folder, self.how), items, **kwargs)

    def map(self, fn, items, **kwargs):
        return list(self.imap(fn, items, **kwargs))

    def shuffle(self, map_fn, items, buckets, reduce_fn, **kwargs):
        return self.engine.shuffle(FailOnce(map_fn, self.folder, self.how), items, buckets,
                                   FailOnce(reduce_fn, self.folder, self.how), **kwargs)

    def fired(self) -> list[str]:
        return sorted(p.name for p in Path(self.folder).iterdir())


class DieAfter:
    """An engine (over another) whose driver process kills itself (SIGKILL: no cleanup, no finally) once
    `after` tasks of maps whose description starts with `desc` have finished."""

    def __init__(self, engine, desc: str, after: int):
        self.engine, self.desc, self.after, self.seen = engine, desc, after, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def imap(self, fn, items, **kwargs):
        for result in self.engine.imap(fn, items, **kwargs):
            yield result
            if kwargs.get("desc", "").startswith(self.desc):
                self.seen += 1
                if self.seen >= self.after:
                    print(f"killing the driver after {self.seen} tasks", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)

    def map(self, fn, items, **kwargs):
        return list(self.imap(fn, items, **kwargs))


def _prepare_then_die(args: dict) -> None:
    """A driver: `mixlm prepare` of `args["domains"]` on the Ray cluster at `args["address"]`, killed after
    `args["after"]` tasks of the map `args["desc"]`."""
    import ray

    from mixlm.data.prepare import PrepareOptions, prepare_domains
    from mixlm.engine import make_engine

    ray.init(address=args["address"], log_to_driver=False, logging_level="WARNING")
    engine = DieAfter(make_engine("ray", workers=2, progress=False), args["desc"], args["after"])
    prepare_domains(args["domains"], args["out"], PrepareOptions(**args["options"]), engine)


if __name__ == "__main__":
    _prepare_then_die(json.loads(sys.argv[1]))


class RecordLoads:
    """fn, then one line `pid classifier-loads-so-far` appended to `log` (from whatever process ran the item)."""

    def __init__(self, fn, log: str):
        self.fn, self.log = fn, log

    def __call__(self, item):
        from mixlm.selection import signal_tables

        result = self.fn(item)
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {signal_tables._load_classifier.cache_info().misses}\n")
        return result


class LoadRecordingEngine:
    """An engine whose stateful maps record, per item, the process and its classifier loads so far."""

    def __init__(self, engine, log: str | Path):
        self.engine, self.log = engine, str(log)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def imap(self, fn, items, **kwargs):
        return self.engine.imap(RecordLoads(fn, self.log) if kwargs.get("stateful") else fn, items, **kwargs)

    def map(self, fn, items, **kwargs):
        return list(self.imap(fn, items, **kwargs))
