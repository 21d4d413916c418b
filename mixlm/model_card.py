"""The model card (README.md) of an exported folder.

YAML front matter that the Hub reads (license, datasets, library_name: transformers, pipeline_tag:
text-generation, and a model-index when evaluation scores are given), then Markdown: the architecture
with the exact parameter count, the training mixture, tokens trained, hyper-parameters, hardware and
time when known, and the evaluation table.

    info = CardInfo(name=..., cfg=experiment_config, architecture="LlamaForCausalLM", ...)
    text = render_model_card(info)
    scores = eval_scores_from_json(json.load(open("eval_results.json")))   # lm-eval or mixlm eval output
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from mixlm.config import ExperimentConfig
from mixlm.model_families import get_family


class EvalResultsError(ValueError):
    """Evaluation results in a shape this module does not read; the message says which part."""


@dataclasses.dataclass(frozen=True)
class EvalScore:
    task: str
    metric: str  # e.g. acc_norm, acc, centered_acc
    value: float
    stderr: float | None = None
    shots: int | None = None


@dataclasses.dataclass
class CardInfo:
    """Everything the card says; None / empty fields are left out of the card."""

    name: str
    cfg: ExperimentConfig
    architecture: str  # the transformers class, e.g. LlamaForCausalLM
    total_params: int  # exact, unpadded vocabulary, tied embeddings counted once
    non_embedding_params: int
    dtype: str = "float32"
    step: int | None = None
    tokens_trained: int | None = None
    tokens_by_domain: dict[str, int] = dataclasses.field(default_factory=dict)
    license: str = "apache-2.0"
    datasets: list[str] = dataclasses.field(default_factory=list)
    hardware: str = ""
    train_seconds: float | None = None
    evals: list[EvalScore] = dataclasses.field(default_factory=list)
    source: str = ""  # the checkpoint the folder was exported from
    mixlm_version: str = ""
    git_commit: str = ""


def render_model_card(info: CardInfo) -> str:
    """README.md text: `---` YAML front matter `---` followed by Markdown."""
    return f"---\n{front_matter(info)}---\n\n{body(info)}"


def front_matter(info: CardInfo) -> str:
    """The YAML metadata block (without the `---` fences), built by huggingface_hub so the Hub parses it."""
    from huggingface_hub import EvalResult, ModelCardData

    results = [
        EvalResult(
            task_type="text-generation",
            task_name="Text Generation",
            dataset_type=s.task,
            dataset_name=s.task,
            metric_type=s.metric,
            metric_value=round(float(s.value), 6),
            metric_name=s.metric if s.shots is None else f"{s.metric} ({s.shots}-shot)",
            dataset_args=None if s.shots is None else {"num_few_shot": s.shots},
        )
        for s in info.evals
        if math.isfinite(s.value)
    ]
    data = ModelCardData(
        license=info.license or None,
        datasets=list(info.datasets) or None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["mixlm", "data-mixture", info.cfg.model.family],
        model_name=info.name,
        eval_results=results or None,
    )
    text = data.to_yaml()
    return text if text.endswith("\n") else text + "\n"


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _short(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _count(n: int | None) -> str:
    if n is None:
        return "unknown"
    return f"{n:,} ({_short(n)})" if n >= 1000 else f"{n:,}"


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours >= 1 else f"{seconds / 60:.1f} min"


def architecture_rows(info: CardInfo) -> list[tuple[str, str]]:
    """The architecture table: rows every family has, the family's own rows (`model_card_rows`: they fill
    "MLP dim" and "norm" in place and add the rest, e.g. positions, after them), then the weights dtype."""
    m = info.cfg.model
    family_rows = dict(get_family(m.family).model_card_rows(m))
    rows = [
        ("transformers class", f"`{info.architecture}`"),
        ("parameters", f"{info.total_params:,}"),
        ("non-embedding parameters", f"{info.non_embedding_params:,}"),
        ("layers", str(m.num_layers)),
        ("d_model", str(m.d_model)),
        ("attention heads (kv heads)", f"{m.num_heads} ({m.kv_heads})"),
        ("head dim", str(m.dim_per_head)),
        ("MLP dim", family_rows.pop("MLP dim", str(m.mlp_dim))),
        ("vocabulary", f"{m.vocab_size:,}"),
        ("context length", f"{m.max_seq_len:,}"),
        ("tied embeddings", "yes" if m.tie_embeddings else "no"),
        ("norm", family_rows.pop("norm", f"eps {m.norm_eps:g}")),
    ]
    rows += list(family_rows.items())
    rows.append(("weights dtype", info.dtype))
    return rows


def mixture_rows(info: CardInfo) -> tuple[list[tuple], list[str]]:
    """(rows of domain | weight | tokens trained, notes about stages); empty when no mixture is known."""
    raw = info.cfg.data.mixture
    if not raw:
        domains = sorted(info.tokens_by_domain)
        weight = "100.00%" if len(domains) == 1 else ""  # a single source (e.g. synthetic data)
        return [(d, weight, f"{info.tokens_by_domain[d]:,}") for d in domains], []
    from mixlm.data.mixture import parse_mixture

    mixture = parse_mixture(raw)
    first = mixture.stages[0].weights
    total = sum(info.tokens_by_domain.values())
    rows = []
    for d in mixture.domains:
        seen = info.tokens_by_domain.get(d)
        share = f" ({100 * seen / total:.1f}%)" if seen is not None and total else ""
        rows.append((d, f"{100 * first[d]:.2f}%", "" if seen is None else f"{seen:,}{share}"))
    notes = [
        f"from step {s.start_step:,}: " + ", ".join(f"{d} {100 * w:.1f}%" for d, w in s.weights.items() if w)
        for s in mixture.stages[1:]
    ]
    return rows, notes


def hyperparameter_rows(info: CardInfo) -> list[tuple[str, str]]:
    c = info.cfg
    o, s, t, d = c.optimizer, c.schedule, c.train, c.data
    warmup = s.warmup_steps or round(s.warmup_fraction * t.steps)
    return [
        ("steps", f"{t.steps:,}" + ("" if info.step in (None, t.steps) else f" (this checkpoint: step {info.step:,})")),
        ("batch", f"{t.global_batch_size:,} sequences x {d.seq_len:,} tokens"
         + (f" ({t.grad_accum_steps} accumulation steps)" if t.grad_accum_steps > 1 else "")),
        ("optimizer", f"AdamW (b1 {o.b1:g}, b2 {o.b2:g}, eps {o.eps:g}), weight decay {o.weight_decay:g}"),
        ("learning rate", f"{o.lr:g} peak, {s.kind} schedule to {s.min_lr:g}, {warmup:,} warmup steps"),
        ("gradient clipping", f"{o.clip_norm:g}" if o.clip_norm else "none"),
        ("z-loss", f"{t.z_loss:g}" if t.z_loss else "none"),
        ("training precision", f"{c.model.compute_dtype} compute, float32 master weights"),
        ("seed", str(t.seed)),
    ]


def eval_rows(scores: list[EvalScore]) -> list[tuple]:
    return [
        (s.task, s.metric, "" if s.shots is None else s.shots, f"{s.value:.4f}",
         "" if s.stderr is None else f"± {s.stderr:.4f}")
        for s in scores
    ]


def body(info: CardInfo) -> str:
    """The Markdown after the front matter: blocks separated by blank lines."""
    m = info.cfg.model
    blocks = [f"# {info.name}"]
    blocks.append(f"A {_short(info.total_params)}-parameter {m.family}-family causal language model trained with "
                  f"mixlm (JAX/Flax) and exported to `{info.architecture}`. It loads with plain transformers, "
                  "no remote code:")
    blocks.append(
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{info.name}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{info.name}")\n```'
    )
    blocks += ["## Architecture", _table(("", ""), architecture_rows(info))]

    blocks.append("## Training data")
    blocks.append(f"Tokens trained: **{_count(info.tokens_trained)}**"
                  + (f" (step {info.step:,})" if info.step is not None else "") + ".")
    rows, notes = mixture_rows(info)
    if rows:
        blocks.append(_table(("domain", "weight", "tokens trained"), rows))
        blocks += [f"Mixture stage {note}." for note in notes]
    else:
        blocks.append("The training mixture is not recorded in the checkpoint.")
    if info.datasets:
        blocks.append("Datasets: " + ", ".join(f"`{x}`" for x in info.datasets) + ".")

    blocks += ["## Hyper-parameters", _table(("", ""), hyperparameter_rows(info))]
    compute = []
    if info.hardware:
        compute.append(("hardware", info.hardware))
    if info.train_seconds:
        compute.append(("training time", _duration(info.train_seconds)))
    if compute:
        blocks += ["## Compute", _table(("", ""), compute)]
    if info.evals:
        blocks += ["## Evaluation", _table(("task", "metric", "shots", "value", "stderr"), eval_rows(info.evals))]
    provenance = [f"exported from `{info.source}`" if info.source else "",
                  f"mixlm {info.mixlm_version}" if info.mixlm_version else "",
                  f"commit `{info.git_commit}`" if info.git_commit else ""]
    provenance = [x for x in provenance if x]
    if provenance:
        blocks += ["## Provenance", "; ".join(provenance) + "."]
    return "\n\n".join(b.rstrip("\n") for b in blocks) + "\n"


# --- evaluation results -------------------------------------------------------------------------------

_METRIC_ORDER = ("acc_norm", "acc", "centered_acc", "exact_match", "f1", "mcc", "perplexity", "word_perplexity")


def _split_metric(key: str) -> str:
    return key.split(",", 1)[0]  # lm-eval writes "acc_norm,none"


def _scores_of_task(task: str, metrics: dict, shots: int | None) -> list[EvalScore]:
    values, errors = {}, {}
    for key, value in metrics.items():
        name = _split_metric(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if name.endswith("_stderr"):
            errors[name[: -len("_stderr")]] = float(value)
        elif name not in ("alias", "samples", "num_fewshot"):
            values[name] = float(value)
    shots = metrics.get("num_fewshot", shots) if isinstance(metrics.get("num_fewshot", shots), int) else shots
    ordered = [m for m in _METRIC_ORDER if m in values] + sorted(set(values) - set(_METRIC_ORDER))
    return [EvalScore(task, m, values[m], errors.get(m), shots) for m in ordered]


def eval_scores_from_json(data: Any) -> list[EvalScore]:
    """Scores from evaluation output: lm-eval's `{"results": {task: {"acc,none": v, "acc_stderr,none": s}},
    "n-shot": {task: k}}`, a list of `{"task", "metric", "value"[, "stderr", "shots"]}` rows, or a plain
    `{task: {metric: value}}` / `{task: value}` (metric "score"). Raises EvalResultsError on anything else."""
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        data = data["rows"]
    if isinstance(data, list):
        out = []
        for i, row in enumerate(data):
            if not isinstance(row, dict) or not {"task", "metric", "value"} <= set(row):
                raise EvalResultsError(f"eval results row {i}: expected keys task, metric, value; got {row!r}")
            out.append(EvalScore(str(row["task"]), str(row["metric"]), float(row["value"]),
                                 None if row.get("stderr") is None else float(row["stderr"]),
                                 None if row.get("shots") is None else int(row["shots"])))
        return out
    if not isinstance(data, dict):
        raise EvalResultsError(f"eval results: expected a JSON object or list, got {type(data).__name__}")
    results = data.get("results", data)
    n_shot = data.get("n-shot", {}) if isinstance(data.get("n-shot"), dict) else {}
    if not isinstance(results, dict):
        raise EvalResultsError("eval results: 'results' must map task names to metrics")
    out = []
    for task, metrics in results.items():
        shots = n_shot.get(task) if isinstance(n_shot.get(task), int) else None
        if isinstance(metrics, (int, float)) and not isinstance(metrics, bool):
            out.append(EvalScore(task, "score", float(metrics), None, shots))
        elif isinstance(metrics, dict):
            out.extend(_scores_of_task(task, metrics, shots))
        else:
            raise EvalResultsError(f"eval results: task {task!r} has {metrics!r}, expected a number or metrics")
    if not out:
        raise EvalResultsError("eval results: no numeric scores found")
    return out
