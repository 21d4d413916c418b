"""lm-evaluation-harness on the live Flax model: an `lm_eval` `LM` that scores and generates with our params,
no export, no torch.

    lm = FlaxLM(model_cfg, graphdef, params, tokenizer, batch_size=16)     # params may be mesh-sharded
    lm_eval.simple_evaluate(model=lm, tasks=[...], task_manager=...)
    lm = FlaxLM.from_hf_folder("hf/x")                                       # an exported folder, in Flax
    lm = FlaxLM.from_checkpoint("runs/x")                                    # a run's newest checkpoint

It tokenizes exactly like lm-eval's `hf` model (the same `TemplateLM` context/continuation split, the tokenizer's
own special-token default, left truncation to the model's context), so per example it agrees with the
exported model run through transformers (tests: within 1e-3 in fp32).

Batching: requests are sorted by length, cut into batches of `batch_size` rows, right-padded to a multiple of
`length_multiple` (padding after a causal prefix changes nothing before it) and scored by one jitted function
per padded length; padded rows fill the last batch so the batch shape never changes. Greedy generation runs
the same forward over a fixed-size token buffer, one new token per row per step (no KV cache: simple, and
fine for the short answers of eval tasks), stopping when every row has hit a stop sequence or EOS.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from mixlm.config import ExperimentConfig, ModelConfig


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@functools.lru_cache(maxsize=8)
def _jitted_functions(graphdef, vocab: int):
    """(score, next_token), jitted once per model structure, so evaluating every N training steps reuses the
    compiled functions."""
    import jax
    import jax.numpy as jnp

    from mixlm.models import forward

    def log_probs(p, tokens_BxL):
        return forward.log_probs(graphdef, p, tokens_BxL, vocab_size=vocab)

    @jax.jit
    def score(p, tokens_BxL, targets_BxL):
        """(log p(target) BxL, target is the argmax BxL)."""
        logp_BxLxV = log_probs(p, tokens_BxL)
        logp_BxL = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
        return logp_BxL, jnp.argmax(logp_BxLxV, axis=-1) == targets_BxL

    @jax.jit
    def next_token(p, tokens_BxL, lengths_B):
        """The greedy next token of each row: the argmax after its last real token."""
        logp_BxLxV = log_probs(p, tokens_BxL)
        last_BxV = jnp.take_along_axis(logp_BxLxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
        return jnp.argmax(last_BxV, axis=-1)

    return score, next_token


class FlaxLM(TemplateLM):
    """`lm_eval` model over (graphdef, params) of mixlm.models. `tokenizer` is a transformers tokenizer or
    the path of a tokenizer folder; its length must not exceed `cfg.vocab_size`."""

    backend = "causal"

    def __init__(self, cfg: ModelConfig | ExperimentConfig, graphdef, params: dict, tokenizer: Any, *,
                 batch_size: int = 8, max_length: int | None = None, max_gen_toks: int = 256,
                 length_multiple: int = 32):
        super().__init__()
        cfg = cfg.model if isinstance(cfg, ExperimentConfig) else cfg
        if isinstance(tokenizer, (str, Path)):
            import transformers

            tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer))
        if len(tokenizer) > cfg.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer):,} tokens but model.vocab_size is "
                             f"{cfg.vocab_size:,}: ids past the vocabulary have no embedding; pass the tokenizer "
                             "the model was trained with")
        self.cfg, self.tokenizer, self.params = cfg, tokenizer, params
        self._batch_size = int(batch_size)
        self._max_length = int(max_length or cfg.max_seq_len)
        self._max_gen_toks = int(max_gen_toks)
        self.length_multiple = int(length_multiple)
        self._score, self._next_token = _jitted_functions(graphdef, cfg.vocab_size)

    @classmethod
    def from_hf_folder(cls, folder: str | Path, **kwargs) -> FlaxLM:
        """Our Flax model on the weights of an exported (or any supported) transformers folder."""
        from mixlm.hf.import_hf import model_config_from_hf, read_hf_params
        from mixlm.models import abstract_params

        folder = Path(folder)
        cfg = model_config_from_hf(json.loads((folder / "config.json").read_text()), where=str(folder / "config.json"))
        params = read_hf_params(folder, cfg)
        graphdef, _, _ = abstract_params(cfg)
        return cls(cfg, graphdef, params, folder, **kwargs)

    @classmethod
    def from_checkpoint(cls, path: str | Path, tokenizer: Any = None, step: int | None = None, **kwargs) -> FlaxLM:
        """Our Flax model on a training run's checkpoint (a run folder, its checkpoints/ or one step folder;
        mixlm.hf.param_readers.open_checkpoint picks the newest complete step). `tokenizer` defaults to the run's
        data.tokenizer. Raises ExportError (checkpoint) or ValueError (no tokenizer)."""
        from mixlm.hf.param_readers import flatten_params, open_checkpoint, unflatten_params
        from mixlm.models import abstract_params

        source = open_checkpoint(path, step)
        cfg = source.cfg.model
        tokenizer = tokenizer or source.cfg.data.tokenizer
        if not tokenizer:
            raise ValueError(f"{source.description}: the run's config has no data.tokenizer; set it to the "
                             "tokenizer folder the run was trained with")
        shapes = source.shapes()
        # The run padded its vocabulary for its mesh; build the graph with the checkpoint's embedding rows.
        expected = flatten_params(abstract_params(cfg)[1])
        rows = next((got for p, shape in shapes.items() if p in expected
                     for got, want in zip(shape, expected[p].shape) if got != want), 1)
        graphdef, _, _ = abstract_params(cfg, rows)
        params = unflatten_params({p: source.read(p) for p in shapes})
        return cls(cfg, graphdef, params, tokenizer, **kwargs)

    # --- what TemplateLM asks for ---------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> str:
        import jax

        return jax.default_backend()

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # As lm-eval's hf model: the tokenizer's own default, except that a string which already starts
        # with the BOS text gets no second BOS.
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos_text = self.tokenizer.decode([self.prefix_token_id])
        if add_special_tokens is None and bos_text and string.startswith(bos_text):
            kwargs = {"add_special_tokens": False}
        return self.tokenizer.encode(string, **kwargs)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # --- scoring ----------------------------------------------------------------------------------------

    def _pad_batch(self, rows: list[list[int]], length: int) -> np.ndarray:
        out_BxL = np.zeros((self._batch_size, length), np.int32)
        for i, row in enumerate(rows):
            out_BxL[i, : len(row)] = row
        return out_BxL

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [(cache key, context ids, continuation ids)] -> [(sum log p(continuation), all greedy)]."""
        windows = []  # (input ids, number of scored positions at its end, target ids)
        for _, context_enc, continuation_enc in requests:
            whole = (list(context_enc) + list(continuation_enc))[-(self._max_length + 1):]
            n = min(len(continuation_enc), len(whole) - 1)
            windows.append((whole[:-1], n, whole[1:]))
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(windows)
        batches = [order[i: i + self._batch_size] for i in range(0, len(order), self._batch_size)]
        for batch in tqdm(batches, desc="flax loglikelihood", disable=disable_tqdm or len(batches) < 2):
            length = min(_round_up(len(windows[batch[0]][0]), self.length_multiple), self._max_length)
            tokens_BxL = self._pad_batch([windows[i][0] for i in batch], length)
            targets_BxL = self._pad_batch([windows[i][2] for i in batch], length)
            logp_BxL, greedy_BxL = (np.asarray(x) for x in self._score(self.params, tokens_BxL, targets_BxL))
            for row, i in enumerate(batch):
                inputs, n, _ = windows[i]
                end = len(inputs)
                results[i] = (float(logp_BxL[row, end - n: end].astype(np.float64).sum()),
                              bool(greedy_BxL[row, end - n: end].all()))
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood: each token is predicted once, in windows of the model's context,
        the first conditioned on the prefix token (lm-eval's rolling-window rule)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        flat, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for context, prediction in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length, context_len=1)):
                flat.append((None, context, prediction))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(flat, disable_tqdm=disable_tqdm)):
            totals[i] += logp
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    # --- generation -------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, cut at the first stop sequence (`until`, plus EOS)."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[str, list[int]] = {}  # requests with the same generation kwargs run together
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), desc="flax generate_until", disable=disable_tqdm)
        for key, members in groups.items():
            gen_kwargs = normalize_gen_kwargs(dict(json.loads(key)), self._max_gen_toks)
            until = handle_stop_sequences(gen_kwargs.pop("until", None), eos=eos_text)
            max_new = int(gen_kwargs.pop("max_gen_toks"))
            if max_new >= self._max_length:
                raise ValueError(f"max_gen_toks={max_new} must be below the model's context {self._max_length}")
            members = sorted(members, key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(members), self._batch_size):
                batch = members[start: start + self._batch_size]
                contexts = [self.tok_encode(requests[i].args[0])[-(self._max_length - max_new):] for i in batch]
                texts = self._greedy(contexts, max_new, until)
                for i, text in zip(batch, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                progress.update(len(batch))
        progress.close()
        return out

    def _greedy(self, contexts: list[list[int]], max_new: int, until: list[str]) -> list[str]:
        length = min(_round_up(max(map(len, contexts)) + max_new, self.length_multiple), self._max_length)
        tokens_BxL = self._pad_batch(contexts, length)
        lengths_B = np.ones(self._batch_size, np.int32)  # padded rows: one token, ignored
        lengths_B[: len(contexts)] = [len(c) for c in contexts]
        generated: list[list[int]] = [[] for _ in contexts]
        done = [False] * len(contexts)
        for _ in range(max_new):
            next_B = np.asarray(self._next_token(self.params, tokens_BxL, lengths_B))
            for row in range(len(contexts)):
                if done[row]:
                    continue
                generated[row].append(int(next_B[row]))
                tokens_BxL[row, lengths_B[row]] = next_B[row]
                lengths_B[row] += 1
                text = self.tok_decode(generated[row], skip_special_tokens=False)
                done[row] = int(next_B[row]) == self.eot_token_id or any(s and s in text for s in until)
            if all(done):
                break
        texts = []
        for row in generated:
            text = self.tok_decode(row)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            texts.append(text)
        return texts


__all__ = ["FlaxLM"]
