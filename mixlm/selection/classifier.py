"""DCLM-style quality classifier: positive (reference-like) against negative (raw web) documents.

Two backends, one interface (`TextClassifier.score(texts) -> P(positive)`):

* `sklearn` (default, dependable): hashed word uni+bigram counts (`HashingVectorizer`, 2**20
  features, l2-normalised) and `LogisticRegression`; saved as `model.npz`: the fitted arrays (coef_,
  intercept_, classes_) and the estimators' parameters as JSON, loaded with `allow_pickle=False` and
  rebuilt, so loading a folder runs no code from it. Folders of older versions hold a pickle
  (`model.joblib`), which can run any code when loaded: they are refused unless `trust_pickle=True`
  (`--trust-pickle`), which converts them to `model.npz` once.
* `fasttext` (DCLM's choice; `pip install fasttext-numpy2-wheel`): supervised fastText with word
  bigrams on a shuffled training file; saved as `model.bin`. On tiny or one-sided data fastText can
  return NaN or a one-label model; training checks for both and says so.

A model folder holds the model and `classifier.json` (backend, signal column name, held-out metrics).
`CLASSIFIER_PRESETS` names published recipes (`dclm`: DCLM-baseline's fastText settings).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mixlm.selection import SelectionError

BACKENDS = ("sklearn", "fasttext")
_POS, _NEG = "__label__pos", "__label__neg"
SKLEARN_FILE = "model.npz"  # arrays + parameters: loads without running code
PICKLE_FILE = "model.joblib"  # older versions: a pickle, loaded only when trusted
FASTTEXT_FILE = "model.bin"  # fastText's own binary format


class TextClassifier:
    """A trained classifier; `score` returns float64 [n] probabilities of the positive class."""

    def __init__(self, backend: str, model, signal: str):
        self.backend, self.model, self.signal = backend, model, signal

    def score(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        if self.backend == "sklearn":
            return self.model.predict_proba(list(texts))[:, 1].astype(np.float64)
        labels, probs = self.model.predict([_one_line(t) for t in texts], k=2)
        scores = np.array([dict(zip(ls, ps)).get(_POS, 0.0) for ls, ps in zip(labels, probs)], np.float64)
        return np.clip(scores, 0.0, 1.0)  # fastText reports p + 1e-5 (its log smoothing), so up to 1.00001


def _one_line(text: str) -> str:
    # fastText reads one example per line.
    return " ".join(text.split())


def _sklearn_model(seed: int, c: float):
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(
        HashingVectorizer(ngram_range=(1, 2), n_features=2**20, alternate_sign=False, norm="l2",
                          token_pattern=r"(?u)\b\w+\b", dtype=np.float32),
        LogisticRegression(C=c, max_iter=1000, random_state=seed),
    )


# Our fastText defaults; `fasttext_options` overrides any of them (e.g. a bigger `dim` on real data).
# 2**20 hash buckets x dim 64 x 4 bytes: a 256 MiB model.bin.
FASTTEXT_DEFAULTS = {"epoch": 5, "lr": 0.1, "wordNgrams": 2, "dim": 64, "bucket": 2**20, "minCount": 1}


# Named recipes for `classifier train --preset`. dclm: DCLM's OH-2.5 + ELI5 vs RefinedWeb classifier
# (mlfoundations/dclm baselines/train_fasttext_classifier.py, "we did not deviate from [fastText's] default
# values" except --wordNgrams 2): lr 0.1, dim 100, ws 5, epoch 5, minCount 1, fastText's 2,000,000 buckets
# (a ~800 MB model.bin). DCLM-baseline then kept documents scoring >= 0.018112, about the top 10%.
CLASSIFIER_PRESETS: dict[str, dict] = {
    "dclm": {
        "backend": "fasttext",
        "fasttext_options": {"lr": 0.1, "dim": 100, "ws": 5, "epoch": 5, "minCount": 1, "wordNgrams": 2,
                             "bucket": 2_000_000},
        "keep_top_fraction": 0.1,
    },
}


def classifier_preset(name: str, fasttext_overrides: Mapping | None = None) -> dict:
    """{backend, fasttext_options, keep_top_fraction} of preset `name`, with `fasttext_overrides` applied
    (e.g. a smaller `bucket` for a test)."""
    if name not in CLASSIFIER_PRESETS:
        raise SelectionError(f"classifier preset {name!r}: use one of {sorted(CLASSIFIER_PRESETS)}")
    preset = CLASSIFIER_PRESETS[name]
    return {**preset, "fasttext_options": {**preset["fasttext_options"], **dict(fasttext_overrides or {})}}


_FIT_FASTTEXT = """
import json, sys
import fasttext
a = json.loads(sys.argv[1])
fasttext.train_supervised(input=a["input"], thread=1, seed=a["seed"], verbose=0, **a["settings"]).save_model(a["out"])
"""


def _fit_fasttext(train_file: Path, model_file: Path, seed: int, settings: dict) -> str:
    """Trains fastText on `train_file` into `model_file` in a fresh Python process; '' or the error's last line."""
    args = json.dumps({"input": str(train_file), "out": str(model_file), "seed": seed, "settings": settings})
    proc = subprocess.run([sys.executable, "-c", _FIT_FASTTEXT, args], capture_output=True, text=True, check=False)
    if proc.returncode == 0 and model_file.is_file():
        return ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {proc.returncode}"


def _train_fasttext(texts: list[str], labels: np.ndarray, seed: int, options: dict, work_dir: Path):
    try:
        import fasttext
    except ImportError as e:
        raise SelectionError("backend 'fasttext' needs `pip install fasttext-numpy2-wheel`; "
                             "or use --backend sklearn") from e
    # Shuffled already by the caller; fastText learns badly from a file sorted by label.
    train_file = work_dir / "train.txt"
    with open(train_file, "w") as f:
        f.writelines(f"{_POS if label else _NEG} {_one_line(text)}\n" for text, label in zip(texts, labels))
    # One thread: fastText is only reproducible for a seed when single-threaded. Its result also depended on
    # what the calling process had done before (after a Pallas interpret-mode kernel in the same process the
    # same seed trained a different model, and sometimes diverged with "Encountered NaN"), so it trains in a
    # fresh interpreter. A divergence is retried at half the learning rate.
    settings = {**FASTTEXT_DEFAULTS, **options}
    model_file = work_dir / "model.bin"
    for attempt in range(3):
        error = _fit_fasttext(train_file, model_file, seed, settings)
        if not error:
            break
        if "NaN" not in error or attempt == 2:
            raise SelectionError(f"fastText training failed ({error}) at lr {settings['lr']:g}; lower "
                                 "fasttext_options lr or use --backend sklearn")
        settings["lr"] = settings["lr"] / 2
    train_file.unlink()
    model = fasttext.load_model(str(model_file))
    if sorted(model.labels) != sorted([_POS, _NEG]):
        raise SelectionError(f"fastText learned labels {model.labels}, not both classes; give it more "
                             "(and balanced) data or use --backend sklearn")
    return model


def train_classifier(pos_texts: Sequence[str], neg_texts: Sequence[str], out_dir: str | Path, *,
                     backend: str = "sklearn", signal: str = "classifier_score", seed: int = 0,
                     val_fraction: float = 0.1, c: float = 1.0,
                     fasttext_options: Mapping | None = None) -> dict:
    """Fit on a shuffled split, measure on the held-out `val_fraction` (per class), save to `out_dir`.

    `c` is the inverse L2 strength of the logistic regression; `fasttext_options` override
    `FASTTEXT_DEFAULTS`. Returns the metadata written to `classifier.json`: backend, signal, counts,
    held-out accuracy and ROC AUC.
    """
    if backend not in BACKENDS:
        raise SelectionError(f"classifier backend {backend!r}: use one of {BACKENDS}")
    if len(pos_texts) < 2 or len(neg_texts) < 2:
        raise SelectionError(f"need at least 2 positive and 2 negative documents, got {len(pos_texts)} "
                             f"and {len(neg_texts)}")
    if not 0 <= val_fraction < 1:
        raise SelectionError(f"val_fraction must be in [0, 1), got {val_fraction}")
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    texts = list(pos_texts) + list(neg_texts)
    labels = np.array([1] * len(pos_texts) + [0] * len(neg_texts))
    val = np.zeros(len(texts), bool)
    for cls in (0, 1):  # stratified hold-out: the same fraction of each class
        idx = rng.permutation(np.flatnonzero(labels == cls))
        val[idx[: round(val_fraction * idx.size)]] = True
    train_idx = rng.permutation(np.flatnonzero(~val))
    train_texts, train_labels = [texts[i] for i in train_idx], labels[train_idx]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if backend == "sklearn":
        model = _sklearn_model(seed, c).fit(train_texts, train_labels)
        save_sklearn_model(model, out / SKLEARN_FILE)
    else:
        with tempfile.TemporaryDirectory(dir=out) as work:
            model = _train_fasttext(train_texts, train_labels, seed, dict(fasttext_options or {}), Path(work))
        model.save_model(str(out / FASTTEXT_FILE))
    classifier = TextClassifier(backend, model, signal)

    meta = {"backend": backend, "signal": signal, "seed": seed, "positives": len(pos_texts),
            "negatives": len(neg_texts), "train": int(train_idx.size), "held_out": int(val.sum())}
    if backend == "fasttext":
        meta["fasttext_options"] = {**FASTTEXT_DEFAULTS, **dict(fasttext_options or {})}
    if val.any():
        val_texts = [texts[i] for i in np.flatnonzero(val)]
        probs = classifier.score(val_texts)
        if np.isnan(probs).any():
            raise SelectionError(f"{backend} gave NaN scores on held-out documents; use more data "
                                 "or --backend sklearn")
        meta["held_out_accuracy"] = float(np.mean((probs >= 0.5) == (labels[val] == 1)))
        if len(set(labels[val].tolist())) == 2:
            meta["held_out_auc"] = float(roc_auc_score(labels[val], probs))
    tmp = out / "classifier.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / "classifier.json")
    return meta


def _json_params(estimator) -> dict:
    """`estimator.get_params()` as JSON values (numpy dtypes by name); refuses callables, which only a pickle
    could store."""
    out = {}
    for key, value in estimator.get_params().items():
        if isinstance(value, type) and issubclass(value, np.generic):
            value = {"dtype": np.dtype(value).name}
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, float) and not math.isfinite(value):
            value = repr(value)
        if not (value is None or isinstance(value, (str, int, float, bool, list, dict))):
            raise SelectionError(f"{type(estimator).__name__}.{key}={value!r} cannot be saved without pickle")
        out[key] = value
    return out


def save_sklearn_model(model, path: Path) -> None:
    """Writes a fitted HashingVectorizer + LogisticRegression pipeline as arrays and JSON parameters (npz)."""
    import sklearn

    (_, vectorizer), (_, logreg) = model.steps
    config = {"sklearn": sklearn.__version__, "vectorizer": _json_params(vectorizer),
              "logistic_regression": _json_params(logreg)}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, coef=logreg.coef_, intercept=logreg.intercept_, classes=logreg.classes_,
                            config=np.array(json.dumps(config)))
    os.replace(tmp, path)


def load_sklearn_model(path: Path):
    """The pipeline saved by `save_sklearn_model`, rebuilt from its arrays; never unpickles."""
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("coef", "intercept", "classes", "config")}
        config = json.loads(str(arrays["config"]))
        vec_params = dict(config["vectorizer"])
        vec_params["ngram_range"] = tuple(vec_params["ngram_range"])
        if isinstance(vec_params.get("dtype"), dict):
            vec_params["dtype"] = np.dtype(vec_params["dtype"]["dtype"]).type
        vectorizer = HashingVectorizer(**vec_params)
        known = LogisticRegression().get_params()
        logreg = LogisticRegression(**{k: v for k, v in config["logistic_regression"].items() if k in known})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SelectionError(f"{path}: not a classifier saved by mixlm ({' '.join(str(e).split())}); retrain "
                             "it with `mixlm select classifier train`") from None
    coef, classes = arrays["coef"], arrays["classes"]
    if coef.shape != (1, vectorizer.n_features) or classes.shape != (2,) or arrays["intercept"].shape != (1,):
        raise SelectionError(f"{path}: arrays of shapes coef {coef.shape}, classes {classes.shape} do not fit "
                             f"{vectorizer.n_features} features and 2 classes; retrain the classifier")
    logreg.coef_, logreg.intercept_, logreg.classes_ = coef, arrays["intercept"], classes
    logreg.n_features_in_ = coef.shape[1]
    return make_pipeline(vectorizer, logreg)


def convert_pickled_classifier(model_dir: str | Path) -> bool:
    """Loads an older folder's `model.joblib` (a pickle: only for folders you trust) and writes `model.npz`
    beside it, so later loads need no trust. Returns False when the folder already has `model.npz`."""
    model_dir = Path(model_dir)
    if (model_dir / SKLEARN_FILE).is_file() or not (model_dir / PICKLE_FILE).is_file():
        return False
    import joblib

    save_sklearn_model(joblib.load(model_dir / PICKLE_FILE), model_dir / SKLEARN_FILE)
    return True


def load_classifier(model_dir: str | Path, signal: str | None = None, *, trust_pickle: bool = False) -> TextClassifier:
    """The classifier saved in `model_dir`; `signal` renames its score column. Runs no code from the folder:
    a pickled `model.joblib` (older versions) is refused unless `trust_pickle`."""
    model_dir = Path(model_dir)
    meta_path = model_dir / "classifier.json"
    if not meta_path.is_file():
        raise SelectionError(f"{model_dir}: no classifier.json; train one with `mixlm select classifier train`")
    meta = json.loads(meta_path.read_text())
    if meta["backend"] == "sklearn":
        if (model_dir / SKLEARN_FILE).is_file():
            model = load_sklearn_model(model_dir / SKLEARN_FILE)
        elif (model_dir / PICKLE_FILE).is_file() and trust_pickle:
            import joblib

            model = joblib.load(model_dir / PICKLE_FILE)
        elif (model_dir / PICKLE_FILE).is_file():
            raise SelectionError(
                f"{model_dir / PICKLE_FILE}: a pickled classifier, which could run any code when loaded; retrain "
                "it with `mixlm select classifier train`, or pass --trust-pickle if you trust this folder "
                "(it is then converted to model.npz once)"
            )
        else:
            raise SelectionError(f"{model_dir}: no {SKLEARN_FILE}; retrain with `mixlm select classifier train`")
    else:
        import fasttext

        model = fasttext.load_model(str(model_dir / FASTTEXT_FILE))
    return TextClassifier(meta["backend"], model, signal or meta["signal"])
