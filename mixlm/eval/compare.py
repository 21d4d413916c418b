"""`mixlm eval compare`: several results side by side as Markdown, CSV and a grouped bar chart.

    compare([results_a, "runs/b/eval_regmix.json"], "eval_compare")   # eval_compare.md, .csv, .png
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mixlm.errors import EvalError
from mixlm.eval.report import format_score, is_percent, table_rows
from mixlm.eval.results import load_results
from mixlm.eval.task_scores import lower_is_better


def _unique_names(docs: Sequence[dict]) -> list[str]:
    """Column names: the runs' names; where two share one, the results file's stem, else a number."""
    names = [d.get("name") or f"run{i}" for i, d in enumerate(docs)]
    names = [n if names.count(n) == 1 or not d.get("_file") else Path(d["_file"]).stem
             for n, d in zip(names, docs)]
    return [n if names.count(n) == 1 else f"{n} ({i + 1})" for i, n in enumerate(names)]


def compare_rows(docs: Sequence[dict]) -> tuple[list[str], list[list]]:
    """(header, rows) of the side-by-side table: one row per task / group / average label (first-seen order),
    one score column per run (None where a run lacks the row)."""
    names = _unique_names(docs)
    order: list[tuple[str, str, str]] = []  # (kind, label, metric)
    scores: dict[tuple[str, str], list] = {}
    for i, doc in enumerate(docs):
        for row in table_rows(doc):
            key = (row["kind"], row["label"])
            if key not in scores:
                scores[key] = [None] * len(docs)
                order.append((row["kind"], row["label"], row["metric"]))
            scores[key][i] = row["score"]
    kinds = {"task": 0, "group": 1, "overall": 2}
    order.sort(key=lambda r: kinds[r[0]])
    return ["task", "metric", *names], [[label, metric, *scores[(kind, label)]] for kind, label, metric in order]


def compare_markdown(docs: Sequence[dict]) -> str:
    header, rows = compare_rows(docs)
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for label, metric, *values in rows:
        pct = is_percent(metric)
        numbers = [v for v in values if v is not None]
        best = (min if lower_is_better(metric) else max)(numbers) if len(numbers) > 1 else None
        cells = [format_score(v, pct, bold=v is not None and v == best) for v in values]
        lines.append(f"| {label} | {metric} | " + " | ".join(cells) + " |")
    suites = sorted({d.get("suite", "") for d in docs})
    return "\n".join(lines) + "\n\nAccuracies in %, losses / perplexities / bits per byte as they are; best per " \
        f"row in bold (lowest for losses, perplexities, bits per byte). Suite: {', '.join(suites)}.\n"


def compare_csv(docs: Sequence[dict]) -> str:
    import csv
    import io

    header, rows = compare_rows(docs)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for label, metric, *values in rows:
        writer.writerow([label, metric, *["" if v is None else f"{v:.6g}" for v in values]])
    return buffer.getvalue()


def _chart_panels(rows: list[list]) -> list[tuple[str, list[list], bool]]:
    """(y-axis label, rows, percent) per panel: the accuracies together in %, each other metric on its own axis."""
    panels = [("score (%, higher is better)", [r for r in rows if is_percent(r[1])], True)]
    for metric in dict.fromkeys(r[1] for r in rows if not is_percent(r[1])):
        direction = "lower" if lower_is_better(metric) else "higher"
        panels.append((f"{metric} ({direction} is better)", [r for r in rows if r[1] == metric], False))
    return [p for p in panels if p[1]]


def compare_figure(docs: Sequence[dict]):
    """A matplotlib Figure of grouped bars, one bar per run: accuracies (tasks, groups, average) in % on one
    axis, each other metric (NLL, perplexity, bits per byte) on an axis of its own, in its own unit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    header, rows = compare_rows(docs)
    panels = _chart_panels(rows)
    if not panels:
        raise EvalError("nothing to plot: no scores in these results")
    names = header[2:]
    width = 0.8 / len(names)
    widths = [max(3.0, 0.6 * len(p[1]) * max(1, len(names)) ** 0.5 + 1.5) for p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths) + 2, 4.5), squeeze=False, layout="constrained",
                             gridspec_kw={"width_ratios": widths})
    for ax, (label, panel_rows, percent) in zip(axes[0], panels):
        x = np.arange(len(panel_rows))
        scale = 100 if percent else 1
        for i, name in enumerate(names):
            heights = [scale * r[2 + i] if r[2 + i] is not None else np.nan for r in panel_rows]
            ax.bar(x + (i - (len(names) - 1) / 2) * width, heights, width, label=name)
        ax.set_xticks(x, [r[0] for r in panel_rows], rotation=45, ha="right")
        ax.set_ylabel(label)
        ax.axhline(0, color="black", linewidth=0.6)
    fig.suptitle(f"mixlm eval compare: {', '.join(sorted({d.get('suite', '') for d in docs}))}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize="small", loc="outside right upper")
    return fig


def compare_bar_chart(docs: Sequence[dict], path: str | Path) -> Path:
    """Writes compare_figure(docs) as a PNG at `path`; returns the path."""
    import matplotlib.pyplot as plt

    fig = compare_figure(docs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(paths_or_docs: Sequence[str | Path | dict], out_prefix: str | Path) -> dict[str, Path]:
    """Writes <prefix>.md, <prefix>.csv and <prefix>.png for several results; returns the three paths."""
    docs = [d if isinstance(d, dict) else load_results(d) for d in paths_or_docs]
    prefix = Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md, csv_path = prefix.with_name(prefix.name + ".md"), prefix.with_name(prefix.name + ".csv")
    md.write_text(compare_markdown(docs))
    csv_path.write_text(compare_csv(docs))
    png = compare_bar_chart(docs, prefix.with_name(prefix.name + ".png"))
    return {"markdown": md, "csv": csv_path, "png": png}

