"""A training run's folder, local or on an object store, and the one reader of each file in it.

    RUN/config.yaml      the resolved config the run trains (every field, the mixture inlined)
    RUN/metrics.jsonl    one JSON object per logged step and per evaluation ({"step": n, ...})
    RUN/result.json      written once, when the run reached train.steps and its final evaluation is logged
                         (or when a swarm member failed): the one answer to "is this run done?"
    RUN/checkpoints/     Orbax steps (mixlm.checkpoint)
    RUN/tensorboard/     event files (logging.tensorboard)

    run = RunDir("gs://bucket/sweep/runs/0007")
    run.result()          # {'status': 'finished', 'step': 1000, 'eval': {'val_loss': ...}, ...} or None
    run.metrics()         # the rows of metrics.jsonl; a torn last line (a killed writer) is skipped

Sweeps, plots, `mixlm eval` on a run folder and the trainer itself read runs through this class only.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import warnings
from typing import Any

from mixlm import storage

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
RESULT = "result.json"
CHECKPOINTS = "checkpoints"
RESULT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class MetricsRows:
    """metrics.jsonl parsed: the rows, and how many lines were not JSON objects with a numeric step
    (`torn_tail`: the last line was cut short, as a writer killed mid-line leaves it)."""

    rows: list[dict]
    bad_lines: int = 0
    torn_tail: bool = False


def parse_metrics(text: str) -> MetricsRows:
    """The rows of a metrics.jsonl text: every line that is a JSON object with a numeric `step`."""
    rows, bad, torn = [], 0, False
    lines = text.split("\n")
    last = len(lines) - 1
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and not isinstance(row["step"], bool):
            rows.append(row)
        elif i == last:  # no newline after it: the writer stopped mid-line
            torn = True
        else:
            bad += 1
    return MetricsRows(rows, bad, torn)


class RunDir:
    """The folder of one training run (`train.output_dir`, a sweep's `runs/<index>/`)."""

    def __init__(self, path):
        self.path = storage.location(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    @property
    def config_file(self):
        return self.path / CONFIG

    @property
    def metrics_file(self):
        return self.path / METRICS

    @property
    def result_file(self):
        return self.path / RESULT

    @property
    def checkpoints(self):
        return self.path / CHECKPOINTS

    def exists(self) -> bool:
        return self.path.exists()

    # ---- metrics.jsonl -------------------------------------------------------------------------------------

    def read_metrics(self) -> MetricsRows:
        """metrics.jsonl parsed (no file: no rows). Lines that are not JSON objects with a step are skipped;
        one in the middle of the file (not a torn last line) is also warned about, once per read."""
        if not storage.is_file(self.metrics_file):  # never read a device (metrics.jsonl -> /dev/full)
            return MetricsRows([])
        parsed = parse_metrics(self.metrics_file.read_text())
        if parsed.bad_lines:
            warnings.warn(f"{self.metrics_file}: skipped {parsed.bad_lines} line(s) that are not JSON rows with a "
                          "step", stacklevel=2)
        return parsed

    def metrics(self) -> list[dict]:
        return self.read_metrics().rows

    def final_eval(self, step: int | None = None) -> dict[str, float] | None:
        """The `val_loss*` values of the newest row that has `val_loss` (at `step` when given), else None."""
        found = None
        for row in self.metrics():
            if "val_loss" in row and (step is None or row["step"] == step):
                found = {k: v for k, v in row.items() if k.startswith("val_loss")}
        return found

    def trim_metrics(self, last_step: int) -> None:
        """Keeps the rows up to `last_step` (and drops a torn last line), so that a resumed run continues the
        file instead of repeating the steps it redoes. Call it on the writing process only. A log that is not a
        regular file (a pipe, a device such as /dev/full) is left alone: it cannot be rewritten, only appended to."""
        if not storage.is_file(self.metrics_file):
            return
        kept = []
        for line in self.metrics_file.read_text().splitlines():
            rows = parse_metrics(line).rows
            if rows and rows[0]["step"] <= last_step:
                kept.append(line)  # verbatim
        # written whole (storage.write_atomic): a full disk fails the write, never the log
        storage.write_atomic(self.metrics_file, "".join(line + "\n" for line in kept))

    # ---- result.json ---------------------------------------------------------------------------------------

    def result(self) -> dict[str, Any] | None:
        """The run's result.json (see write_result), or None while the run has not finished."""
        if not self.result_file.exists():
            return None
        try:
            doc = storage.read_json(self.result_file)
        except ValueError:
            return None  # not ours, or never finished writing (only possible on a local disk without rename)
        return doc if isinstance(doc, dict) and doc.get("version") == RESULT_VERSION else None

    def is_done(self) -> bool:
        return self.result() is not None

    def write_result(self, *, step: int, eval: dict[str, float], status: str = "finished", reason: str = "",
                     tokens_seen: dict[str, int] | None = None, extra: dict | None = None) -> dict:
        """Writes result.json atomically: status 'finished' (with the final evaluation) or 'failed' (with
        `reason`). Returns the document."""
        doc = {"version": RESULT_VERSION, "status": status, "step": int(step),
               "eval": {k: float(v) for k, v in eval.items()},
               "tokens_seen": dict(tokens_seen or {}),
               "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        if reason:
            doc["reason"] = reason
        doc.update(extra or {})
        storage.write_json(self.result_file, doc)
        return doc

    def clear_result(self) -> None:
        if self.result_file.exists():
            self.result_file.unlink()
