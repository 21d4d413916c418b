"""The parity check of an export: our Flax model (on the source's params, rounded to the export's dtype)
and the exported transformers model (float32) on the same random tokens.

    report = verify_export(source, "hf/x")     # max |Δlogit| and mean KL, Flax vs transformers
    print(report.summary()); assert report.passed
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from mixlm.config import ModelConfig
from mixlm.errors import ExportError
from mixlm.hf.param_readers import ParamReader, unflatten_params
from mixlm.hf.provenance import PROVENANCE_FILE
from mixlm.hf.safetensors_files import numpy_dtype
from mixlm.model_families import get_family
from mixlm.models import abstract_params, forward


@dataclasses.dataclass
class VerifyReport:
    max_abs_diff: float  # max |logit_flax - logit_hf| over the batch, the real vocabulary only
    mean_kl: float  # mean over positions of KL(p_flax || p_hf), nats
    tolerance: float
    dtype: str
    tokens_shape: tuple[int, int]

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def summary(self) -> str:
        verdict = "OK" if self.passed else f"FAILED (above {self.tolerance:g})"
        return (f"verify: max |logit diff| {self.max_abs_diff:.3e}, mean KL {self.mean_kl:.3e} nats over "
                f"{self.tokens_shape[0]}x{self.tokens_shape[1]} random tokens ({self.dtype} weights, float32 "
                f"compute): {verdict}")


def load_params(source: ParamReader, *, round_to: str = "float32", place: Callable | None = None) -> dict:
    """All params as a nested dict of float32 arrays, optionally rounded through `round_to` (so the Flax
    model sees exactly the weights a bfloat16 export holds) and moved by `place` (e.g. jax.device_put) one
    array at a time, so at most one extra host copy exists at once."""
    np_dtype = numpy_dtype(round_to)
    flat = {}
    for path in source.shapes():
        a = source.read(path)
        if round_to != "float32":
            a = a.astype(np_dtype).astype(np.float32)
        flat[path] = place(a) if place is not None else a
    return unflatten_params(flat)


def flax_forward(cfg: ModelConfig, params: dict):
    """A jitted `tokens_BxL -> logits_BxLxV` (float32 compute, the real vocabulary only) for `params`,
    whatever their vocabulary padding."""
    embed = params[get_family(cfg.family).EMBEDDING_PARAM]
    # vocab_multiple = the stored rows makes the model's padded vocabulary equal to what the params have.
    cfg32 = dataclasses.replace(cfg, compute_dtype="float32", vocab_multiple=int(np.shape(embed)[0]))
    graphdef, _, _ = abstract_params(cfg32)

    @jax.jit
    def real_logits(p, tokens_BxL):
        return forward.logits(graphdef, p, tokens_BxL, vocab_size=cfg.vocab_size)[..., : cfg.vocab_size]

    return lambda tokens_BxL: np.asarray(real_logits(params, tokens_BxL))


def logits_agreement(ours_BxLxV: np.ndarray, theirs_BxLxV: np.ndarray) -> tuple[float, float]:
    """(max |difference|, mean KL(ours || theirs)) computed in float64."""
    a, b = np.asarray(ours_BxLxV, np.float64), np.asarray(theirs_BxLxV, np.float64)
    log_p = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
    log_q = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    return float(np.max(np.abs(a - b))), float(np.mean(kl))


def verify_export(source: ParamReader, out_dir: str | Path, *, batch_size: int = 2, seq_len: int = 64,
                  seed: int = 0, tolerance: float = 1e-4) -> VerifyReport:
    """Runs our Flax model (on the source's params, rounded to the export's dtype) and the exported
    transformers model (float32) on the same random tokens; compares the logits."""
    import torch
    import transformers

    out_dir = Path(out_dir)
    prov_path = out_dir / PROVENANCE_FILE
    dtype = json.loads(prov_path.read_text())["dtype"] if prov_path.is_file() else "float32"
    cfg = source.cfg.model
    seq_len = min(seq_len, cfg.max_seq_len)
    tokens_BxL = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch_size, seq_len), dtype=np.int64)
    params = load_params(source, round_to=dtype, place=jax.device_put)
    with jax.default_matmul_precision("highest"):
        ours_BxLxV = flax_forward(cfg, params)(tokens_BxL.astype(np.int32))
    del params
    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs_BxLxV = model(torch.from_numpy(tokens_BxL)).logits.float().numpy()
    if theirs_BxLxV.shape != ours_BxLxV.shape:
        raise ExportError(f"{out_dir}: transformers gives logits {theirs_BxLxV.shape}, ours {ours_BxLxV.shape}")
    max_diff, kl = logits_agreement(ours_BxLxV, theirs_BxLxV)
    return VerifyReport(max_diff, kl, tolerance, dtype, (batch_size, seq_len))
