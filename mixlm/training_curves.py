"""Training curves of one or more runs as PNGs (`mixlm plot RUN_DIR... --out DIR`), runs side by side:

    train_loss.png   train loss against step, one line per run
    val_loss.png     validation loss against step, one panel per domain (val_loss/<domain>) plus the total
    mixture.png      each run's mixture: one stacked bar per run when every mixture is fixed; else the weights
                     in force stacked against step, one panel per run (config stages, or mixture updates saved
                     in its newest checkpoint's data state; for online mixing the `mixture/<domain>` rows of
                     metrics.jsonl, the sampling or objective weights its strategy set)

Many runs (a sweep's proxies) stay readable: every run has its own colour and linestyle (run_styles), legends sit
outside the axes, short series get markers, and when each run has only its final eval the validation panels are
bars of the final values.

Everything comes from the run folder: metrics.jsonl (rows of {"step", "loss", "val_loss/<domain>", ...}),
config.yaml (data.mixture and its stages) and checkpoints/<step>/data (mixture updates made during the run).
(mixlm/mixing/plots.py draws the regression plots of a mixture sweep; this module draws single runs.)
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from mixlm import storage
from mixlm.run_dir import RunDir


class PlotError(RuntimeError):
    """A run folder that cannot be plotted; the message names the folder and what is missing."""


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of <run_dir>/metrics.jsonl (lines that are not JSON objects are skipped). Raises PlotError."""
    run = RunDir(run_dir)
    if not run.metrics_file.exists():
        raise PlotError(f"{run_dir}: no metrics.jsonl (is it a training run's output folder, train.output_dir?)")
    return run.metrics()


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


def _checkpoint_updates(run_dir) -> list[tuple[int, dict[str, float]]]:
    """Mixture updates (step, weights) in the newest checkpoint's data state; [] when there are none."""
    checkpoints = run_dir / "checkpoints"
    steps = sorted((int(p.name) for p in checkpoints.iterdir() if p.name.isdigit() and (p / "data").is_dir()),
                   reverse=True) if checkpoints.is_dir() else []
    if not steps:
        return []
    import orbax.checkpoint as ocp

    try:
        with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:  # a JSON item: epath reads any store
            state = ckptr.restore(checkpoints / str(steps[0]) / "data")
    except Exception as e:  # noqa: BLE001 - a plot without the updates beats no plot
        warnings.warn(f"{checkpoints / str(steps[0])}: cannot read its data state ({type(e).__name__}); "
                      "mixture updates not plotted", stacklevel=2)
        return []
    return [(int(step), {d: float(w) for d, w in weights.items()})
            for step, weights in _find_key(state, "mixture_updates") or []]


def online_weights(rows: list[dict]) -> list[tuple[int, dict[str, float]]]:
    """[(first step, weights)] of an online mixing run's decisions: a `mixture/<domain>` row at step s holds
    the weights of steps s+1.. (a decision before the first step has s = 0); [] for a run without them."""
    out = []
    for row in rows:
        weights = {k.split("/", 1)[1]: float(v) for k, v in row.items() if k.startswith("mixture/")}
        if weights:
            out.append((int(row["step"]), weights))
    return out


def online_label(run_dir: str | Path) -> str:
    """'doremi, objective weights' from config.yaml's mixing section; '' for a run without online mixing."""
    from mixlm.config import read_yaml_file

    config = storage.location(run_dir) / "config.yaml"
    mixing = ((read_yaml_file(config) or {}).get("mixing") or {}) if config.is_file() else {}
    kind = mixing.get("kind", "static")
    if kind == "static":
        return ""
    apply = mixing.get("apply") or ("objective" if kind == "doremi" else "sampling")
    return f"{kind}, {apply} weights"


def mixture_schedule(run_dir: str | Path, rows: list[dict] | None = None) -> list[tuple[int, dict[str, float]]]:
    """[(first step, normalised weights)] in force over the run: config.yaml's data.mixture (and stages),
    then the mixture updates saved in the newest checkpoint; with online mixing, the decisions in `rows`
    (metrics.jsonl; read when not given) after the configured weights. [] when the run has no config.yaml or
    mixture."""
    from mixlm.config import read_yaml_file

    run_dir = storage.location(run_dir)
    if not storage.is_remote(run_dir):
        run_dir = storage.location(Path(str(run_dir)).absolute())  # Orbax reads absolute paths only
    config = run_dir / "config.yaml"
    if not config.is_file():
        return []
    raw = (read_yaml_file(config) or {}).get("data", {}).get("mixture") or {}
    if not raw:
        return []
    decisions = online_weights(read_metrics(run_dir) if rows is None else rows)
    if decisions:
        first = [] if decisions[0][0] == 0 else _configured_stages(raw, config)[:1]
        return first + decisions
    schedule = _configured_stages(raw, config)
    if not schedule:
        return []
    for step, weights in _checkpoint_updates(run_dir):
        total = sum(weights.values()) or 1.0
        schedule.append((step, {d: w / total for d, w in weights.items()}))
    return sorted(schedule, key=lambda s: s[0])


def _configured_stages(raw, config: Path) -> list[tuple[int, dict[str, float]]]:
    """The stages of config.yaml's data.mixture, normalised; [] (with a warning) when it does not parse."""
    from mixlm.data.mixture import parse_mixture
    from mixlm.errors import ConfigError

    try:
        mixture = parse_mixture(raw, where=f"{config}: data.mixture")
    except ConfigError as e:
        warnings.warn(str(e), stacklevel=2)
        return []
    return [(int(stage.start_step), dict(stage.weights)) for stage in mixture.stages]


# Up to 10 runs take matplotlib's default colours; more take tab20, then evenly spaced turbo colours, and
# every 10 runs change linestyle, so no two of up to 40 runs look alike.
LINESTYLES = ("-", "--", ":", "-.")
FEW_POINTS = 20  # a line with this many points or fewer also gets markers (one eval point is then visible)


def run_styles(names: list[str]) -> dict[str, dict]:
    """{run name: {'color', 'linestyle'}}: one style per run, the same in every figure."""
    from matplotlib import colormaps

    n = len(names)
    if n <= 10:
        colors = [f"C{i}" for i in range(n)]
    elif n <= 20:
        colors = [colormaps["tab20"](i) for i in range(n)]
    else:
        colors = [colormaps["turbo"](0.05 + 0.9 * i / (n - 1)) for i in range(n)]
    return {name: {"color": colors[i], "linestyle": LINESTYLES[(i // 10) % len(LINESTYLES)]}
            for i, name in enumerate(names)}


LABELLED_RUNS = 40  # more runs than this: no legend, and every k-th run named on a per-run axis


def _legend(fig, axes, count: int) -> None:
    """One legend for the figure, outside the axes on the right (never over the lines), in columns of 20."""
    handles, labels = axes[0].get_legend_handles_labels()
    if 1 < count <= LABELLED_RUNS and handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=7 if count > 10 else 8,
                   ncols=-(-count // 20), title="run")


def _runs_axis(ax, names: list[str]) -> None:
    """A y axis of one row per run, the first on top; with many runs every k-th is named."""
    every = -(-len(names) // LABELLED_RUNS)
    ax.set_yticks(range(0, len(names), every), names[::every], fontsize=7 if len(names) > 10 else 8)
    ax.set_ylim(len(names) - 0.5, -0.5)


def _runs_height(count: int) -> float:
    return 0.25 * min(count, LABELLED_RUNS) + 1.4


def _line(ax, steps: list[float], values: list[float], name: str, style: dict) -> None:
    marker = {"marker": "o", "markersize": 3} if len(steps) <= FEW_POINTS else {}
    ax.plot(steps, values, label=name, linewidth=1.2, **style, **marker)


def load_runs(run_dirs: list[str | Path]) -> dict[str, tuple[Path, list[dict]]]:
    """{run name (its folder's name; a repeated name gets a '): (folder, metrics rows)}. Raises PlotError."""
    runs = {}
    for run_dir in run_dirs:
        folder = storage.location(run_dir)
        name = folder.name if storage.is_remote(folder) else Path(str(folder)).resolve().name
        while name in runs:
            name += "'"
        runs[name] = (folder, read_metrics(run_dir))
    return runs


def train_loss_figure(runs: dict[str, tuple[Path, list[dict]]]):
    """Train loss against step, one line per run (a Figure; legend outside the axes when several runs)."""
    from matplotlib.figure import Figure

    styles = run_styles(list(runs))
    fig = Figure(figsize=(7 + (1.5 if len(runs) > 1 else 0), 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name, (_, rows) in runs.items():
        steps, values = series(rows, "loss")
        if steps:
            _line(ax, steps, values, name, styles[name])
    title = f"train loss: {next(iter(runs))}" if len(runs) == 1 else "train loss"
    if len(runs) > LABELLED_RUNS:
        title += f" ({len(runs)} runs, coloured in order)"
    ax.set(xlabel="step", ylabel="train loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    _legend(fig, [ax], len(runs))
    return fig


def val_loss_figure(runs: dict[str, tuple[Path, list[dict]]]):
    """One panel per validation key (val_loss/<domain>, then the total): lines against step, one per run; when
    no run has more than one eval point (a sweep's proxies: only the final eval), each run's
    final value instead (a dot per run). None when no run has validation losses."""
    from matplotlib.figure import Figure

    domains = list(dict.fromkeys(d for _, rows in runs.values() for d in val_domains(rows)))
    keys = [f"val_loss/{d}" for d in domains] + (["val_loss"] if any(series(r, "val_loss")[0]
                                                                       for _, r in runs.values()) else [])
    if not keys:
        return None
    styles = run_styles(list(runs))
    finals_only = all(len(series(rows, key)[0]) <= 1 for _, rows in runs.values() for key in keys)
    cols = min(3, len(keys))
    nrows = -(-len(keys) // cols)
    height = _runs_height(len(runs)) if finals_only else 3.5
    fig = Figure(figsize=(4.5 * cols + (1.5 if len(runs) > 1 and not finals_only else 0), height * nrows),
                 layout="constrained")
    axes = [fig.add_subplot(nrows, cols, i + 1) for i in range(len(keys))]
    for ax, key in zip(axes, keys):
        title = key if key != "val_loss" else "val_loss (total)"
        if finals_only:
            names = list(runs)
            points = [series(rows, key) for _, rows in runs.values()]
            values = [v[0] if v else float("nan") for _, v in points]
            steps = sorted({int(s[0]) for s, _ in points if s})
            # dots, not bars: the axis is zoomed to the values, where a bar's length would mislead
            ax.scatter(values, range(len(names)), c=[styles[n]["color"] for n in names], s=36, zorder=3)
            _runs_axis(ax, names)
            finite = [v for v in values if math.isfinite(v)]
            if finite:  # zoomed to the values: the differences between runs are what matters
                lo, hi = min(finite), max(finite)
                pad = 0.1 * (hi - lo) or 0.05 * abs(hi) or 0.1
                ax.set_xlim(lo - pad, hi + pad)
            at = f", step {steps[0]}" if len(steps) == 1 else ""
            ax.set(xlabel="nats/token", title=f"{title} (final{at})")
            ax.grid(alpha=0.3)
        else:
            for name, (_, rows) in runs.items():
                steps, values = series(rows, key)
                if steps:
                    _line(ax, steps, values, name, styles[name])
            ax.set(xlabel="step", ylabel="nats/token", title=title)
            ax.grid(alpha=0.3)
    if not finals_only:
        _legend(fig, axes, len(runs))
    return fig


def _stage_end(schedule: list[tuple[int, dict[str, float]]], rows: list[dict]) -> float:
    return max([s for s, _ in schedule] + series(rows, "loss")[0] + [1.0])


def mixture_figure(runs: dict[str, tuple[Path, list[dict]]], schedules: dict[str, list]):
    """The mixture of every run that has one: when none changes, one stacked horizontal bar per run (its
    domains' shares); else one panel per run, the weights stacked against step. None when no run has one."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    shown = {name: s for name, s in schedules.items() if s}
    if not shown:
        return None
    domains = list(dict.fromkeys(d for s in shown.values() for _, w in s for d in w))
    palette = colormaps["tab20"] if len(domains) > 10 else None
    colors = {d: palette(i) if palette else f"C{i}" for i, d in enumerate(domains)}
    if all(len(s) == 1 for s in shown.values()):
        fig = Figure(figsize=(8, _runs_height(len(shown))), layout="constrained")
        ax = fig.add_subplot()
        names = list(shown)
        left = [0.0] * len(names)
        for d in domains:
            widths = [shown[n][0][1].get(d, 0.0) for n in names]
            ax.barh(range(len(names)), widths, left=left, color=colors[d], label=d)
            left = [a + b for a, b in zip(left, widths)]
        _runs_axis(ax, names)
        ax.set(xlim=(0, 1), xlabel="weight (fixed for the whole run)", title="mixture")
        fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8, title="domain")
        return fig
    cols = min(4, len(shown))
    nrows = -(-len(shown) // cols)
    fig = Figure(figsize=(4.5 * cols + 1.5, 3.4 * nrows), layout="constrained")
    axes = []
    for i, (name, schedule) in enumerate(shown.items()):
        ax = fig.add_subplot(nrows, cols, i + 1)
        axes.append(ax)
        last = _stage_end(schedule, runs[name][1])
        xs = [step for i, (start, _) in enumerate(schedule)
              for step in (start, schedule[i + 1][0] if i + 1 < len(schedule) else last)]
        ys = [[w.get(d, 0.0) for _, w in schedule for _ in (0, 1)] for d in domains]
        ax.stackplot(xs, ys, labels=domains, colors=[colors[d] for d in domains])
        label = online_label(runs[name][0])
        ax.set(xlabel="step", ylabel="weight", title=f"mixture: {name}" + (f"\n({label})" if label else ""),
               ylim=(0, 1), xlim=(xs[0], xs[-1]))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8, title="domain")
    return fig


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path, log=None) -> list[Path]:
    """Writes train_loss.png, val_loss.png (when any run has validation losses) and mixture.png (when any run
    has a mixture in its config.yaml) into `out_dir`; returns the files written. `log` (a str -> None) hears
    why a figure is not written or which runs it leaves out. Raises PlotError for a folder without metrics."""
    say = log or (lambda _text: None)
    runs = load_runs(run_dirs)
    out = storage.location(out_dir) if storage.is_remote(out_dir) else Path(out_dir)  # local: pathlib, as before
    storage.make_dirs(out)
    written = []

    def save(fig, filename: str) -> None:
        with storage.atomic_writer(out / filename) as f:  # a local folder or a bucket
            fig.savefig(f, dpi=110, format="png")
        written.append(out / filename)

    save(train_loss_figure(runs), "train_loss.png")
    fig = val_loss_figure(runs)
    if fig is None:
        say("val_loss.png not written: no run has validation losses (val_loss rows) in its metrics.jsonl")
    else:
        save(fig, "val_loss.png")
    schedules = {name: mixture_schedule(run_dir, rows) for name, (run_dir, rows) in runs.items()}
    missing = [name for name, s in schedules.items() if not s]
    fig = mixture_figure(runs, schedules)
    if fig is None:
        say("mixture.png not written: no run has a data.mixture in its config.yaml (synthetic data, or not a "
            "training run's folder)")
    else:
        save(fig, "mixture.png")
        if missing:
            say(f"mixture.png leaves out {', '.join(missing)}: no data.mixture in their config.yaml")
    return written
