"""`mixlm eval compare`: several results side by side as Markdown, CSV and a grouped bar chart.

    compare([results_a, "runs/b/eval_regmix.json"], "eval_compare")   # eval_compare.md, .csv, .png
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mixlm.eval.errors import EvalError
from mixlm.eval.report import format_score, is_percent, table_rows
from mixlm.eval.results import load_results
from mixlm.eval.scoring import LOWER_IS_BETTER


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
        best = (min if metric.removeprefix("centered_") in LOWER_IS_BETTER else max)(numbers) if len(numbers) > 1 else None
        cells = [format_score(v, pct, bold=v is not None and v == best) for v in values]
        lines.append(f"| {label} | {metric} | " + " | ".join(cells) + " |")
    suites = sorted({d.get("suite", "") for d in docs})
    return "\n".join(lines) + f"\n\nScores in % except perplexity / bits per byte; best per row in bold. Suite: " \
        f"{', '.join(suites)}.\n"


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


def compare_bar_chart(docs: Sequence[dict], path: str | Path) -> Path:
    """A grouped bar chart PNG of the accuracy-like rows (tasks, groups, average), one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    header, rows = compare_rows(docs)
    rows = [r for r in rows if is_percent(r[1])]
    if not rows:
        raise EvalError("nothing to plot: no accuracy-like scores in these results")
    names = header[2:]
    x = np.arange(len(rows))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) * max(1, len(names)) ** 0.5 + 2), 4.5))
    for i, name in enumerate(names):
        heights = [100 * r[2 + i] if r[2 + i] is not None else np.nan for r in rows]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, heights, width, label=name)
    ax.set_xticks(x, [r[0] for r in rows], rotation=45, ha="right")
    ax.set_ylabel("score (%)")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_title(f"mixlm eval compare: {', '.join(sorted({d.get('suite', '') for d in docs}))}")
    ax.legend(fontsize="small")
    fig.tight_layout()
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

