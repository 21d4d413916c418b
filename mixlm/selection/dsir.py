"""DSIR importance weights (Xie et al. 2023, "Data Selection for Language Models via Importance Resampling").

Features: the text lower-cased and split as `signals.raw_words` (runs of word characters and runs of
punctuation: the WordPunct tokenisation DSIR's own code uses), its unigrams and bigrams (`ngrams`=2)
hashed into `num_buckets` buckets (stable BLAKE2b/splitmix64 hashes, `hashing.py`). A bag-of-n-grams model
of a document set is the bucket distribution of all its n-grams, smoothed additively:

    p(b) = (count(b) + smoothing) / (total + smoothing * num_buckets)

and a document's log importance weight for a target is the sum over its n-gram occurrences of
log p_target(b) - log p_raw(b) (the raw model is fitted on the pool being scored, or on `raw_texts`).
DSIR's reference code adds 1e-8 to unsmoothed probabilities instead; additive smoothing keeps a bucket that
a small target set never saw from dominating. Several targets give several columns `dsir_<target>`.

* `fit_dsir(raw_texts, {target: texts}, settings)` → `DSIRModel`; `.log_weights(texts)` → {column: float64 [n]};
  `.save(path)` / `load_dsir_model(path)` (npz, no pickle).
* `score_dsir(inputs, targets, out_dir, ...)` — the CLI path: fits on the input shards, writes a signal folder
  (`score_folder.write_score_folder`) plus `dsir_model.npz`.
* Importance *resampling* (sampling documents without replacement, proportional to exp(log weight), to a
  budget) is `pick.importance_resample` (`select pick --mode dsir-resample`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mixlm.engine import Engine, engine_or_local
from mixlm.selection import SelectionError
from mixlm.selection.hashing import ngram_hashes, word_hashes
from mixlm.selection.signals import raw_words

MODEL_FILE = "dsir_model.npz"
_TARGET_NAME = re.compile(r"[A-Za-z0-9_]+")


@dataclass(frozen=True)
class DSIRSettings:
    num_buckets: int = 10_000
    ngrams: int = 2  # 1 = unigrams; 2 = unigrams + bigrams (DSIR's choice)
    smoothing: float = 1.0  # pseudo-count added to every bucket of every model

    def check(self) -> None:
        if self.num_buckets < 1 or self.ngrams < 1 or not self.smoothing > 0:
            raise SelectionError(f"DSIR settings {asdict(self)}: need num_buckets >= 1, ngrams >= 1, smoothing > 0")


def ngram_buckets(text: str, settings: DSIRSettings) -> np.ndarray:
    """int64 [number of n-gram occurrences]: the bucket of every unigram .. `ngrams`-gram of `text`."""
    hashes = word_hashes(raw_words(text.lower()))
    parts = [ngram_hashes(hashes, n) for n in range(1, settings.ngrams + 1)]
    return (np.concatenate(parts) % np.uint64(settings.num_buckets)).astype(np.int64)


def bucket_counts(texts: Iterable[str], settings: DSIRSettings) -> np.ndarray:
    """int64 [num_buckets]: n-gram counts of all `texts` together."""
    counts = np.zeros(settings.num_buckets, np.int64)
    for text in texts:
        counts += np.bincount(ngram_buckets(text, settings), minlength=settings.num_buckets)
    return counts


def log_probs(counts: np.ndarray, smoothing: float) -> np.ndarray:
    """float64 [B]: log of the additively smoothed bucket distribution of `counts`."""
    counts = np.asarray(counts, np.float64)
    return np.log(counts + smoothing) - np.log(counts.sum() + smoothing * counts.size)


@dataclass
class DSIRModel:
    settings: DSIRSettings
    raw_counts: np.ndarray  # int64 [B]
    target_counts: dict[str, np.ndarray]  # target → int64 [B]

    def __post_init__(self) -> None:
        raw = log_probs(self.raw_counts, self.settings.smoothing)
        self._names = list(self.target_counts)
        self._log_ratio_TxB = np.stack(
            [log_probs(self.target_counts[t], self.settings.smoothing) - raw for t in self._names])

    @property
    def columns(self) -> list[str]:
        return [f"dsir_{t}" for t in self._names]

    def log_weights(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """{dsir_<target>: float64 [n]}: sum over each document's n-grams of log p_target - log p_raw."""
        out = np.zeros((len(self._names), len(texts)))
        for i, text in enumerate(texts):
            out[:, i] = self._log_ratio_TxB[:, ngram_buckets(text, self.settings)].sum(axis=1)
        return {c: out[k] for k, c in enumerate(self.columns)}

    def fingerprint(self) -> str:
        """A short digest of the settings and all counts: equal fingerprints score every text the same."""
        h = hashlib.blake2b(json.dumps(asdict(self.settings), sort_keys=True).encode(), digest_size=12)
        h.update(self.raw_counts.astype(np.int64).tobytes())
        for name in self._names:
            h.update(name.encode())
            h.update(self.target_counts[name].astype(np.int64).tobytes())
        return h.hexdigest()

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez_compressed(f, settings=np.array(json.dumps(asdict(self.settings))),
                                targets=np.array(json.dumps(self._names)), raw_counts=self.raw_counts,
                                target_counts=np.stack([self.target_counts[t] for t in self._names]))
        os.replace(tmp, path)


def load_dsir_model(path: str | Path) -> DSIRModel:
    """The model `DSIRModel.save` wrote (arrays and JSON only; never unpickles)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            settings = DSIRSettings(**json.loads(str(z["settings"])))
            names = json.loads(str(z["targets"]))
            raw, targets = z["raw_counts"], z["target_counts"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SelectionError(f"{path}: not a DSIR model saved by mixlm ({' '.join(str(e).split())}); "
                             "refit it with `mixlm select dsir`") from None
    return DSIRModel(settings, raw, {n: targets[i] for i, n in enumerate(names)})


def fit_dsir(raw_texts: Iterable[str], targets: Mapping[str, Iterable[str]],
             settings: DSIRSettings = DSIRSettings()) -> DSIRModel:
    """Bag-of-n-grams models of the raw pool and of each target set (see the module docstring)."""
    settings.check()
    if not targets:
        raise SelectionError("DSIR needs at least one target: --target NAME=PATH")
    for name in targets:
        _check_target_name(name)
    target_counts = {name: bucket_counts(texts, settings) for name, texts in targets.items()}
    return fit_dsir_counts(bucket_counts(raw_texts, settings), target_counts, settings)


def _check_target_name(name: str) -> None:
    if not _TARGET_NAME.fullmatch(name):
        raise SelectionError(f"--target {name!r}: a name of letters, digits and _ (it becomes column dsir_{name})")


def fit_dsir_counts(raw: np.ndarray, target_counts: Mapping[str, np.ndarray], settings: DSIRSettings) -> DSIRModel:
    """The DSIR model of already counted n-grams (int64 [num_buckets] each); errors for an empty pool or target."""
    for name, counts in target_counts.items():
        _check_target_name(name)
        if not counts.any():
            raise SelectionError(f"target {name!r} has no documents with words; check its files and --text-field")
    if not raw.any():
        raise SelectionError("the raw pool has no documents with words; check the inputs and --text-field")
    return DSIRModel(settings, raw, dict(target_counts))


def parse_targets(specs: Sequence[str]) -> dict[str, list[str]]:
    """['books=a.jsonl', 'books=b.jsonl', 'wiki=w.jsonl'] → {'books': [a, b], 'wiki': [w]}."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SelectionError(f"--target {spec!r}: write NAME=PATH, e.g. --target books=books.jsonl")
        out.setdefault(name, []).append(path)
    return out


def file_bucket_counts(common: tuple[DSIRSettings, str, bool], path: str) -> tuple[np.ndarray, dict, list[str]]:
    """An engine task: (settings, text field, strict), one document file -> (int64 [num_buckets] n-gram counts of
    its documents, its skipped lines by kind, the first few of them)."""
    from mixlm.selection.documents import BadLines, iter_documents

    settings, text_field, strict = common
    bad = BadLines()
    counts = bucket_counts((text for _, _, text in iter_documents(path, text_field, bad, strict)), settings)
    return counts, dict(bad.counts), bad.examples


def _pooled_counts(paths: Sequence[str | Path], settings: DSIRSettings, text_field: str, bad, strict: bool,
                   engine) -> np.ndarray:
    """The n-gram counts of all documents of `paths`, a task per file (integer sums: the same on any engine);
    their skipped lines go to `bad`."""
    from mixlm.selection.documents import MAX_EXAMPLES, resolve_inputs

    total = np.zeros(settings.num_buckets, np.int64)
    files = [str(p) for p in resolve_inputs(paths)]
    for counts, skipped, examples in engine.map(functools.partial(file_bucket_counts, (settings, text_field, strict)),
                                               files, desc="select dsir: fit"):
        total += counts
        bad.counts.update(skipped)
        bad.examples.extend(examples[:MAX_EXAMPLES - len(bad.examples)])
    return total


def score_dsir(inputs: Sequence[str | Path], targets: Mapping[str, Sequence[str | Path]] | None,
               out_dir: str | Path, *, settings: DSIRSettings = DSIRSettings(),
               raw: Sequence[str | Path] | None = None, model_path: str | Path | None = None,
               text_field: str = "text", table_format: str = "parquet", strict: bool = False,
               overwrite: bool = False, workers: int = 1, engine: Engine | None = None, progress: bool = False
               ) -> dict:
    """Fit the raw model on `raw` (default: the `inputs`) and one model per target (or load a saved model from
    `model_path`, e.g. one fitted on a sample, to score more shards alike), then write the signal folder
    `out_dir` with one `dsir_<target>` column per target and `out_dir/dsir_model.npz`. Returns the folder's
    report (plus `columns`, and `fit_malformed` / `fit_malformed_examples`: lines skipped in the files the
    models were fitted on). `engine` runs the fit's counting and the scoring, a task per file (default:
    `workers` local processes)."""
    from mixlm.selection.documents import BadLines
    from mixlm.selection.score_folder import write_score_folder

    fit_bad = BadLines()  # skipped lines of the files the models are fitted on (raw pool, targets)
    with engine_or_local(engine, workers, progress) as run_on:
        if model_path is not None:
            if targets or raw:
                raise SelectionError("a saved DSIR model (--model) already holds its targets and raw pool; drop "
                                     "--target / --raw, or fit a new model without --model")
            model = load_dsir_model(model_path)
        else:
            settings.check()
            if not targets:
                raise SelectionError("DSIR needs at least one target: --target NAME=PATH")
            target_counts = {name: _pooled_counts(paths, settings, text_field, fit_bad, strict, run_on)
                             for name, paths in targets.items()}
            model = fit_dsir_counts(_pooled_counts(raw or inputs, settings, text_field, fit_bad, strict, run_on),
                                    target_counts, settings)
        settings_json = {"scorer": "dsir", **asdict(model.settings), "targets": model.columns,
                         "model": model.fingerprint(), "text_field": text_field, "table_format": table_format}
        report = write_score_folder(inputs, out_dir, model.log_weights, settings=settings_json,
                                    text_field=text_field, table_format=table_format, strict=strict,
                                    overwrite=overwrite, engine=run_on)
    model.save(Path(out_dir) / MODEL_FILE)
    return {**report, "columns": model.columns, "fit_malformed": dict(fit_bad.counts),
            "fit_malformed_examples": fit_bad.examples}
