"""Model-based raters: a local model folder scores documents, each of its outputs a named signal column.

Two kinds of folder, told apart by what they hold:

* a **Hugging Face sequence-classification / regression model** (`config.json`, loaded with
  `AutoModelForSequenceClassification` + `AutoTokenizer`, `local_files_only`): FineWeb-Edu's classifier
  (one regression output), PRRC's ModernBERT raters, QuRater (several outputs), WanjuanCC-style
  classifiers. Runs under torch on `device` auto | cpu | cuda[:i].
* a **mixlm linear-head rater** (`rater.json` + `head.npz`): a mixlm checkpoint's final hidden states,
  mean-pooled over the document's tokens, times a linear head; `fit_linear_rater` trains the head
  (ridge regression) on documents with target scores. Runs in Flax/JAX.

Column names: a single-output model rated as NAME gives the column NAME; a model with K outputs gives
`NAME_<label>` per output, labels from `config.id2label` or a `columns` override (in output order).
Outputs pass through `activation`: auto picks sigmoid for `problem_type: multi_label_classification`,
softmax for `single_label_classification` and none (raw regression values / logits) otherwise.

Documents are truncated to `max_length` tokens and scored in length buckets: sorted by length, cut into
batches of `batch_size` (each padded only to its longest), the scores put back in input order.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mixlm.selection import SelectionError
from mixlm.selection.model_scoring import (
    LINEAR_RATER_FILE,
    length_buckets,
    output_columns,
    rater_folder_problem,
    resolve_device,
)

ACTIVATIONS = ("auto", "none", "sigmoid", "softmax")
LINEAR_HEAD_FILE = "head.npz"


def parse_named_paths(values: Sequence[str], flag: str) -> dict[str, str]:
    """['fineweb_edu=DIR', ...] → {'fineweb_edu': 'DIR'}; a name is a column-safe identifier."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        name = name.strip()
        if not sep or not path or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise SelectionError(f"{flag} {value!r}: expected NAME=PATH with NAME a column name like fineweb_edu")
        if name in out:
            raise SelectionError(f"{flag} {name}: given twice")
        out[name] = path
    return out


def apply_activation(logits_NxK: np.ndarray, activation: str) -> np.ndarray:
    """float64 [N, K]: none | sigmoid | softmax (over K) of the raw outputs."""
    x = np.asarray(logits_NxK, np.float64)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if activation == "softmax":
        z = np.exp(x - x.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)
    if activation == "none":
        return x
    raise SelectionError(f"activation {activation!r}: use one of {ACTIVATIONS}")


class SequenceClassifierRater:
    """A Hugging Face sequence-classification / regression folder; `score(texts)` → float64 [n, K]."""

    def __init__(self, name: str, folder: str | Path, *, columns: Sequence[str] = (), activation: str = "auto",
                 device: str = "auto", batch_size: int = 32, max_length: int = 512):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = resolve_device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                str(folder), local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise SelectionError(f"rater {name}: cannot load {folder} as a sequence-classification model ({e})") \
                from None
        self.model.to(self.device).eval()
        if self.tokenizer.pad_token is None:  # batching needs one; causal-LM tokenizers often lack it
            if self.tokenizer.eos_token is None:
                raise SelectionError(f"rater {name}: the tokenizer in {folder} has neither a pad nor an EOS token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # *ForSequenceClassification finds the last token by it
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        config = self.model.config
        labels = [config.id2label.get(i, str(i)) for i in range(config.num_labels)]
        self.columns = output_columns(name, labels, columns)
        if activation == "auto":
            activation = {"multi_label_classification": "sigmoid",
                          "single_label_classification": "softmax"}.get(config.problem_type or "", "none")
        apply_activation(np.zeros((1, 1)), activation)  # validates the name
        positions = getattr(config, "max_position_embeddings", None)  # longer inputs would index past them
        self.max_length = min(max_length, positions) if positions else max_length
        self.activation, self.batch_size = activation, batch_size

    def score(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = np.zeros((len(texts), len(self.columns)))
        if not texts:
            return out
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        keys = list(encoded.keys())
        for idx in length_buckets([len(ids) for ids in encoded["input_ids"]], self.batch_size):
            batch = self.tokenizer.pad({k: [encoded[k][i] for i in idx] for k in keys}, return_tensors="pt")
            with torch.inference_mode():
                logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits
            out[idx] = logits.float().cpu().numpy()
        return apply_activation(out, self.activation)


# --- mixlm's own raters: a linear head on a mixlm checkpoint's pooled hidden states -----------------------


class PooledHiddenStates:
    """float64 [n, D]: mean over each document's tokens of a mixlm model's final (normed) hidden state.

    A document is read as in training, after an EOS: inputs [EOS, t1 .. t_{L-1}], truncated to `max_length`
    (at most the model's context), right-padded to one fixed [batch_size, L] shape (one compilation);
    the model is causal, so padding after a token never changes its hidden state."""

    def __init__(self, cfg, params: dict, tokenizer, *, batch_size: int = 32, max_length: int = 512):
        import jax
        import jax.numpy as jnp
        from tokenizers import Tokenizer

        from mixlm.data.tokenizer import load_tokenizer_spec
        from mixlm.model_families import get_family
        from mixlm.models import abstract_params, layers, merge_params

        spec = load_tokenizer_spec(tokenizer) if isinstance(tokenizer, str) else tokenizer
        if spec.eos_id is None:
            raise SelectionError(f"tokenizer {spec.name!r} has no EOS token to start documents with")
        self._tokenizer, self._eos = Tokenizer.from_str(spec.backend_json), spec.eos_id
        self.length, self.batch_size = min(max_length, cfg.max_seq_len), batch_size
        rows = int(np.shape(params[get_family(cfg.family).EMBEDDING_PARAM])[0])
        cfg32 = dataclasses.replace(cfg, compute_dtype="float32", vocab_multiple=rows)
        graphdef = abstract_params(cfg32)[0]
        self.width = cfg.d_model

        def hidden(params, tokens_BxL):
            # Both families end in `layers.unembed(final_hidden, kernel)`: for this trace it returns its
            # input, so the model's own forward pass yields the hidden states (no second copy of it).
            model, unembed = merge_params(graphdef, params), layers.unembed
            layers.unembed = lambda x_BxLxD, kernel_DxV: x_BxLxD.astype(jnp.float32)
            try:
                return model(tokens_BxL)
            finally:
                layers.unembed = unembed

        @jax.jit
        def pooled(params, tokens_BxL, mask_BxL):
            h_BxLxD = hidden(params, tokens_BxL)
            return jnp.sum(h_BxLxD * mask_BxL[..., None], axis=1) / jnp.maximum(mask_BxL.sum(1), 1)[:, None]

        self._params, self._pooled = jax.device_put(params), pooled  # on the device once, not per batch

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        encoded = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        inputs = [([self._eos] + e.ids)[:self.length] for e in encoded]
        out = np.zeros((len(texts), self.width))
        for idx in length_buckets([len(x) for x in inputs], self.batch_size):
            tokens_BxL = np.zeros((self.batch_size, self.length), np.int32)
            mask_BxL = np.zeros((self.batch_size, self.length), np.float32)
            for r, i in enumerate(idx):
                tokens_BxL[r, :len(inputs[i])], mask_BxL[r, :len(inputs[i])] = inputs[i], 1.0
            out[idx] = np.asarray(self._pooled(self._params, tokens_BxL, mask_BxL), np.float64)[:len(idx)]
        return out


def load_checkpoint_model(checkpoint: str | Path):
    """(ModelConfig, params, tokenizer name) of a mixlm run / checkpoint folder."""
    from mixlm.errors import ExportError
    from mixlm.hf.param_readers import open_checkpoint
    from mixlm.hf.verify import load_params

    try:
        source = open_checkpoint(checkpoint)
    except ExportError as e:
        raise SelectionError(str(e)) from None
    return source.cfg.model, load_params(source), source.cfg.data.tokenizer


def fit_linear_rater(checkpoint: str | Path, texts: Sequence[str], targets_NxK, out_dir: str | Path, *,
                     labels: Sequence[str], ridge: float = 1e-3, activation: str = "none",
                     tokenizer: str | None = None, batch_size: int = 32, max_length: int = 512) -> Path:
    """Trains a mixlm linear-head rater: ridge regression (bias unpenalised) from the pooled hidden states
    of `texts` under the checkpoint to `targets_NxK` (one column per label). Writes OUT/rater.json and
    OUT/head.npz; returns OUT."""
    targets = np.asarray(targets_NxK, np.float64).reshape(len(texts), -1)
    if targets.shape[1] != len(labels):
        raise SelectionError(f"{targets.shape[1]} target columns for {len(labels)} labels")
    cfg, params, saved_tokenizer = load_checkpoint_model(checkpoint)
    features = PooledHiddenStates(cfg, params, tokenizer or saved_tokenizer, batch_size=batch_size,
                                  max_length=max_length)(texts)
    x = np.concatenate([features, np.ones((len(texts), 1))], axis=1)
    penalty = ridge * np.eye(x.shape[1])
    penalty[-1, -1] = 0.0
    w = np.linalg.solve(x.T @ x + penalty, x.T @ targets)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / LINEAR_HEAD_FILE, kernel=w[:-1].astype(np.float32), bias=w[-1].astype(np.float32))
    (out / LINEAR_RATER_FILE).write_text(json.dumps({
        "kind": "mixlm-linear-head", "checkpoint": str(Path(checkpoint).resolve()), "labels": list(labels),
        "activation": activation, "tokenizer": tokenizer or saved_tokenizer, "max_length": max_length,
        "ridge": ridge, "documents": len(texts)}, indent=1))
    return out


class LinearHeadRater:
    """A mixlm linear-head rater folder (see `fit_linear_rater`); `score(texts)` → float64 [n, K]."""

    def __init__(self, name: str, folder: str | Path, *, columns: Sequence[str] = (), activation: str = "auto",
                 batch_size: int = 32, max_length: int = 512):
        meta = json.loads((Path(folder) / LINEAR_RATER_FILE).read_text())
        head = np.load(Path(folder) / LINEAR_HEAD_FILE)
        self.kernel_DxK, self.bias_K = head["kernel"].astype(np.float64), head["bias"].astype(np.float64)
        cfg, params, saved_tokenizer = load_checkpoint_model(meta["checkpoint"])
        if self.kernel_DxK.shape[0] != cfg.d_model:
            raise SelectionError(f"rater {name}: {folder}/{LINEAR_HEAD_FILE} has {self.kernel_DxK.shape[0]} input "
                                 f"rows but the checkpoint's d_model is {cfg.d_model}")
        self.features = PooledHiddenStates(cfg, params, meta.get("tokenizer") or saved_tokenizer,
                                           batch_size=batch_size, max_length=min(max_length, meta["max_length"]))
        self.columns = output_columns(name, meta["labels"], columns)
        self.activation = meta.get("activation", "none") if activation == "auto" else activation

    def score(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, len(self.columns)))
        return apply_activation(self.features(texts) @ self.kernel_DxK + self.bias_K, self.activation)


def load_rater(name: str, folder: str | Path, *, columns: Sequence[str] = (), activation: str = "auto",
               device: str = "auto", batch_size: int = 32, max_length: int = 512):
    """The rater in `folder` (HF or mixlm linear head); it has `.columns` and `.score(texts)` → [n, K]."""
    problem = rater_folder_problem(folder)
    if problem:
        raise SelectionError(f"rater {name}: {problem}")
    if (Path(folder) / LINEAR_RATER_FILE).is_file():
        return LinearHeadRater(name, folder, columns=columns, activation=activation, batch_size=batch_size,
                               max_length=max_length)
    return SequenceClassifierRater(name, folder, columns=columns, activation=activation, device=device,
                                   batch_size=batch_size, max_length=max_length)


def model_table_fields(models: Sequence[str], columns: Sequence[str] = (), activations: Sequence[str] = (), *,
                       config: str | None = None, perplexity: str | None = None, device: str = "auto",
                       batch_size: int = 32, max_length: int = 512) -> dict:
    """The model fields of `signal_tables.TableSettings` from CLI values: `models` NAME=DIR, `columns`
    NAME=a,b,c, `activations` NAME=auto|none|sigmoid|softmax; with a rater `config` every model it lists
    is rated (folders from `models`, else the config's path), with the config's columns and activation."""
    dirs = parse_named_paths(models, "--model")
    names = parse_named_paths(columns, "--columns")
    acts = parse_named_paths(activations, "--activation")
    for flag, given in (("--columns", names), ("--activation", acts)):
        unknown = sorted(set(given) - set(dirs) - (set(_config_models(config)) if config else set()))
        if unknown:
            raise SelectionError(f"{flag} {unknown[0]}: no rater of that name (give it with --model {unknown[0]}=DIR)")
    for name, act in acts.items():
        if act not in ACTIVATIONS:
            raise SelectionError(f"--activation {name}={act}: use one of {ACTIVATIONS}")
    raters = []
    if config:
        from mixlm.selection.rater_config import load_rater_config

        raters = list(load_rater_config(config).model_raters(dirs))
    in_config = {r[0] for r in raters}
    raters += [(name, str(Path(folder).resolve()), (), "auto") for name, folder in dirs.items() if name not in in_config]
    raters = [(name, folder, tuple(c for c in names[name].split(",") if c) if name in names else cols,
               acts.get(name, act)) for name, folder, cols, act in raters]
    for name, folder, _, _ in raters:
        problem = rater_folder_problem(folder)
        if problem:
            raise SelectionError(f"rater {name}: {problem}; pass --model {name}=DIR with a local model folder")
    if batch_size < 1 or max_length < 1:
        raise SelectionError("--batch-size and --max-length must be at least 1")
    return {"model_raters": tuple(raters), "perplexity": str(Path(perplexity).resolve()) if perplexity else None,
            "device": device, "batch_size": batch_size, "max_length": max_length}


def _config_models(config: str) -> list[str]:
    from mixlm.selection.rater_config import load_rater_config

    return list(load_rater_config(config).models)
