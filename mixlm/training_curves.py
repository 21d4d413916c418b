"""Training curves of one or more runs as PNGs (`mixlm plot RUN_DIR... --out DIR`), runs side by side:

    train_loss.png   train loss against step, one line per run
    val_loss.png     validation loss against step, one panel per domain (val_loss/<domain>) plus the total
    mixture.png      the mixture weights in force against step, one panel per run (only when some run's mixture
                     changes: config stages, or mixture updates saved in its newest checkpoint's data state)

Everything comes from the run folder: metrics.jsonl (rows of {"step", "loss", "val_loss/<domain>", ...}),
config.yaml (data.mixture and its stages) and checkpoints/<step>/data (mixture updates made during the run).
(mixlm/mixing/plots.py draws the regression plots of a mixture sweep; this module draws single runs.)
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path


class PlotError(RuntimeError):
    """A run folder that cannot be plotted; the message names the folder and what is missing."""


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of <run_dir>/metrics.jsonl (lines that are not JSON objects are skipped). Raises PlotError."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir}: no metrics.jsonl (is it a training run's output folder, train.output_dir?)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    return rows


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of every row that has a number under `key`."""
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(float(row["step"]))
            values.append(float(value))
    return steps, values


def val_domains(rows: list[dict]) -> list[str]:
    """Domains with a `val_loss/<domain>` in any row, in first-seen order."""
    return list(dict.fromkeys(k.split("/", 1)[1] for row in rows for k in row if k.startswith("val_loss/")))


def _find_key(tree, key: str):
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for value in tree.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


def _checkpoint_updates(run_dir: Path) -> list[tuple[int, dict[str, float]]]:
    """Mixture updates (step, weights) in the newest checkpoint's data state; [] when there are none."""
    checkpoints = run_dir / "checkpoints"
    steps = sorted((int(p.name) for p in checkpoints.iterdir() if p.name.isdigit() and (p / "data").is_dir()),
                   reverse=True) if checkpoints.is_dir() else []
    if not steps:
        return []
    import orbax.checkpoint as ocp
    from etils import epath

    try:
        with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
            state = ckptr.restore(epath.Path((checkpoints / str(steps[0]) / "data").absolute()))
    except Exception as e:  # noqa: BLE001 - a plot without the updates beats no plot
        warnings.warn(f"{checkpoints / str(steps[0])}: cannot read its data state ({type(e).__name__}); "
                      "mixture updates not plotted", stacklevel=2)
        return []
    return [(int(step), {d: float(w) for d, w in weights.items()})
            for step, weights in _find_key(state, "mixture_updates") or []]


def mixture_schedule(run_dir: str | Path) -> list[tuple[int, dict[str, float]]]:
    """[(first step, normalised weights)] in force over the run: config.yaml's data.mixture (and stages),
    then the mixture updates saved in the newest checkpoint; [] when the run has no config.yaml or mixture."""
    import yaml

    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        return []
    raw = (yaml.safe_load(config.read_text()) or {}).get("data", {}).get("mixture") or {}
    if not raw:
        return []
    from mixlm.config import ConfigError
    from mixlm.data.mixture import parse_mixture

    try:
        mixture = parse_mixture(raw, where=f"{config}: data.mixture")
    except ConfigError as e:
        warnings.warn(str(e), stacklevel=2)
        return []
    schedule = [(int(stage.start_step), dict(stage.weights)) for stage in mixture.stages]
    for step, weights in _checkpoint_updates(run_dir):
        total = sum(weights.values()) or 1.0
        schedule.append((step, {d: w / total for d, w in weights.items()}))
    return sorted(schedule, key=lambda s: s[0])


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Writes train_loss.png, val_loss.png (when any run has validation losses) and mixture.png (when any run's
    mixture changes) into `out_dir`; returns the files written. Raises PlotError for a folder without metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for run_dir in run_dirs:
        name = Path(run_dir).resolve().name
        while name in runs:
            name += "'"
        runs[name] = (Path(run_dir), read_metrics(run_dir))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (_, rows) in runs.items():
        steps, values = series(rows, "loss")
        if steps:
            ax.plot(steps, values, label=name)
    ax.set(xlabel="step", ylabel="train loss (nats/token)", title="train loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "train_loss.png", dpi=110)
    plt.close(fig)
    written.append(out / "train_loss.png")

    domains = list(dict.fromkeys(d for _, rows in runs.values() for d in val_domains(rows)))
    keys = [f"val_loss/{d}" for d in domains] + (["val_loss"] if any(series(r, "val_loss")[0]
                                                                       for _, r in runs.values()) else [])
    if keys:
        cols = min(3, len(keys))
        nrows = -(-len(keys) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.5 * nrows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            for name, (_, rows) in runs.items():
                steps, values = series(rows, key)
                if steps:
                    ax.plot(steps, values, marker="o", markersize=3, label=name)
            ax.set(xlabel="step", ylabel="nats/token", title=key if key != "val_loss" else "val_loss (total)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(keys):]:
            ax.set_visible(False)
        fig.tight_layout()
        fig.savefig(out / "val_loss.png", dpi=110)
        plt.close(fig)
        written.append(out / "val_loss.png")

    schedules = {name: mixture_schedule(run_dir) for name, (run_dir, _) in runs.items()}
    if any(len(s) > 1 for s in schedules.values()):
        shown = {name: s for name, s in schedules.items() if s}
        fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 3.8), squeeze=False)
        for ax, (name, schedule) in zip(axes.flat, shown.items()):
            last = max([s for s, _ in schedule] + series(runs[name][1], "loss")[0] + [1.0])
            for domain in dict.fromkeys(d for _, w in schedule for d in w):
                xs, ys = [], []
                for i, (start, weights) in enumerate(schedule):
                    end = schedule[i + 1][0] if i + 1 < len(schedule) else last
                    xs += [start, end]
                    ys += [weights.get(domain, 0.0)] * 2
                ax.plot(xs, ys, label=domain)
            ax.set(xlabel="step", ylabel="weight", title=f"mixture: {name}", ylim=(0, 1))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "mixture.png", dpi=110)
        plt.close(fig)
        written.append(out / "mixture.png")
    return written
