"""GPT-2 decoder: learned positions, pre-norm blocks with LayerNorm, GELU (tanh approximation,
HF "gelu_new"), biases everywhere, final LayerNorm, embeddings tied to the LM head (or not).

Parameter tree (names mirror HF GPT2LMHeadModel; kernels (in, out) exactly like HF's Conv1D):

    wte                            [vocab, embed]
    wpe                            [position, embed]    (max_seq_len, D)
    h/{i}/ln_1/scale, bias         [norm]
    h/{i}/attn/c_attn/kernel       [embed, heads]       (D, 3*H*Dh): q | k | v
    h/{i}/attn/c_attn/bias         [heads]
    h/{i}/attn/c_proj/kernel       [heads, embed]       bias [embed]
    h/{i}/ln_2/scale, bias         [norm]
    h/{i}/mlp/c_fc/kernel          [embed, mlp]         bias [mlp]
    h/{i}/mlp/c_proj/kernel        [mlp, embed]         bias [embed]
    (model.scan_layers: h/<same names> with a leading [num_layers] axis, logical "layers")
    ln_f/scale, bias               [norm]
    lm_head/kernel                 [embed, vocab]       only when not tied
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixlm.config import ModelConfig
from mixlm.errors import ConfigError
from mixlm.models import attention, layers, stacked
from mixlm.models.hf_config import require_hf_value


def _linear(cfg: ModelConfig, dtype, rngs: nnx.Rngs, n_in: int, n_out: int, axes: tuple[str, str]):
    return layers.Linear(
        n_in, n_out, logical_axes=axes, init_std=cfg.init_std, use_bias=True, dtype=dtype, rngs=rngs
    )


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, attention_impl: str):
        d, h, dh = cfg.d_model, cfg.num_heads, cfg.dim_per_head
        self.c_attn = _linear(cfg, dtype, rngs, d, 3 * h * dh, ("embed", "heads"))
        self.c_proj = _linear(cfg, dtype, rngs, h * dh, d, ("heads", "embed"))
        self.num_heads, self.head_dim = h, dh
        self.attention_impl = attention_impl  # model.attention (mixlm.models.attention)

    def __call__(self, x_BxLxD, segment_ids_BxL, layout=None):
        impl = attention.resolve_impl(self.attention_impl, self.c_attn.dtype)
        if attention.takes_head_major(impl):
            # q, k, v straight into [B, H, L, Dh], no layout copies (see llama.Attention).
            qkv_3xBxHxLxDh = layers.project_heads(x_BxLxD, self.c_attn, 3 * self.num_heads)
            qkv_3xBxHxLxDh = jnp.moveaxis(
                qkv_3xBxHxLxDh.reshape(x_BxLxD.shape[0], 3, self.num_heads, x_BxLxD.shape[1], self.head_dim), 1, 0
            )
            out_BxHxLxDh = attention.attend(*qkv_3xBxHxLxDh, segment_ids_BxL=segment_ids_BxL, impl=impl, layout=layout,
                                            head_major=True)
            return layers.merge_heads(out_BxHxLxDh, self.c_proj)
        b, length, _ = x_BxLxD.shape
        qkv_BxLx3xHxDh = self.c_attn(x_BxLxD).reshape(b, length, 3, self.num_heads, self.head_dim)
        q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh = (qkv_BxLx3xHxDh[:, :, i] for i in range(3))
        out_BxLxHxDh = attention.attend(
            q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh, segment_ids_BxL=segment_ids_BxL, impl=impl, layout=layout
        )
        return self.c_proj(out_BxLxHxDh.reshape(b, length, self.num_heads * self.head_dim))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.c_fc = _linear(cfg, dtype, rngs, cfg.d_model, cfg.mlp_dim, ("embed", "mlp"))
        self.c_proj = _linear(cfg, dtype, rngs, cfg.mlp_dim, cfg.d_model, ("mlp", "embed"))

    def __call__(self, x_BxLxD):
        return self.c_proj(jax.nn.gelu(self.c_fc(x_BxLxD), approximate=True))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, attention_impl: str):
        self.ln_1 = layers.LayerNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
        self.attn = Attention(cfg, dtype, rngs, attention_impl)
        self.ln_2 = layers.LayerNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype, rngs)

    def __call__(self, x_BxLxD, segment_ids_BxL, layout=None):
        x_BxLxD = x_BxLxD + self.attn(self.ln_1(x_BxLxD), segment_ids_BxL, layout)
        return x_BxLxD + self.mlp(self.ln_2(x_BxLxD))


class GPT2(nnx.Module):
    """`model(tokens_BxL, positions_BxL=None, segment_ids_BxL=None) -> logits_BxLxV` (float32, V padded).

    `positions_BxL` index the learned position table (restart them at 0 per packed document to match
    running each document alone); they must be < cfg.max_seq_len. `layout` as for llama.Llama;
    `attention_impl` overrides cfg.attention; cfg.remat applies per block.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        vocab_multiple_of: int = 1,
        attention_impl: str | None = None,
    ):
        if cfg.kv_heads != cfg.num_heads or cfg.qk_norm:
            raise ConfigError(
                "model.family gpt2 has no GQA/MQA or qk-norm: set num_kv_heads: 0 and qk_norm: false"
            )
        dtype = jnp.dtype(cfg.compute_dtype)
        self.cfg = cfg
        self.padded_vocab = cfg.padded_vocab_size(vocab_multiple_of)
        self.dtype = dtype
        self.wte = layers.normal_param(
            rngs, (self.padded_vocab, cfg.d_model), cfg.init_std, ("vocab", "embed")
        )
        self.wpe = layers.normal_param(
            rngs, (cfg.max_seq_len, cfg.d_model), cfg.init_std, ("position", "embed")
        )
        attention_impl = attention_impl or cfg.attention
        blocks = [Block(cfg, dtype, rngs, attention_impl) for _ in range(cfg.num_layers)]
        # scan_layers: one Block whose params are stacked [num_layers, ...] (mixlm.models.stacked)
        self.h = stacked.stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.ln_f = layers.LayerNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
        self.lm_head = layers.make_lm_head(cfg, self.padded_vocab, dtype, rngs)

    def __call__(self, tokens_BxL, *, positions_BxL=None, segment_ids_BxL=None, layout=None):
        hidden_BxLxD = self.hidden(tokens_BxL, positions_BxL=positions_BxL, segment_ids_BxL=segment_ids_BxL,
                                   layout=layout)
        return layers.unembed(hidden_BxLxD, self.output_kernel())

    def output_kernel(self):
        """The LM head [D, V_pad] (float32 master weights; wte transposed when tied)."""
        return self.wte[...].T if self.lm_head is None else self.lm_head.kernel[...]

    def hidden(self, tokens_BxL, *, positions_BxL=None, segment_ids_BxL=None, layout=None):
        """The final-normed hidden states [B, L, D] (compute dtype): what the LM head multiplies."""
        if positions_BxL is None:
            positions_BxL = layers.default_positions(tokens_BxL)
        x_BxLxD = layers.embed_lookup(self.wte, tokens_BxL, self.dtype)
        x_BxLxD = x_BxLxD + layers.embed_lookup(self.wpe, positions_BxL, self.dtype)
        x_BxLxD = layers.constrain(x_BxLxD, layers.RESIDUAL_AXES, layout)
        run_block = layers.remat_block(lambda block, x, seg: block(x, seg, layout), self.cfg.remat)
        if self.cfg.scan_layers:
            x_BxLxD = stacked.scan_blocks(self.h, run_block, x_BxLxD, segment_ids_BxL,
                                          constrain=lambda x: layers.constrain(x, layers.RESIDUAL_AXES, layout))
        else:
            for block in self.h:
                x_BxLxD = layers.constrain(run_block(block, x_BxLxD, segment_ids_BxL), layers.RESIDUAL_AXES,
                                           layout)
        return self.ln_f(x_BxLxD)

    def flops_per_token(self, seq_len: int, *, causal: bool = True) -> float:
        from mixlm.models import flops_per_token

        return flops_per_token(self.cfg, seq_len, causal=causal)


# --- Hugging Face mapping (GPT2LMHeadModel) --------------------------------------------------------


def hf_name_map(cfg: ModelConfig) -> layers.HFNameMap:
    """(our param path, HF name, kind) for every parameter; see layers.params_to_hf for the kinds."""
    names = [(("wte",), "transformer.wte.weight", "embedding"), (("wpe",), "transformer.wpe.weight", "copy")]
    for i in range(cfg.num_layers):
        ours, hf = ("h", str(i)), f"transformer.h.{i}"
        for mod in (
            ("ln_1",),
            ("attn", "c_attn"),
            ("attn", "c_proj"),
            ("ln_2",),
            ("mlp", "c_fc"),
            ("mlp", "c_proj"),
        ):
            weight = "scale" if mod[0].startswith("ln") else "kernel"
            names.append((ours + mod + (weight,), f"{hf}.{'.'.join(mod)}.weight", "copy"))
            names.append((ours + mod + ("bias",), f"{hf}.{'.'.join(mod)}.bias", "copy"))
    names += [
        (("ln_f", "scale"), "transformer.ln_f.weight", "copy"),
        (("ln_f", "bias"), "transformer.ln_f.bias", "copy"),
    ]
    if not cfg.tie_embeddings:
        names.append((("lm_head", "kernel"), "lm_head.weight", "lm_head"))
    return names


def to_hf_state_dict(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our params (split_params layout) -> {HF GPT2LMHeadModel name: float32 numpy array}.

    Padded vocabulary rows are cut back to cfg.vocab_size; `lm_head.weight` is omitted when tied.
    """
    return layers.params_to_hf(params, hf_name_map(cfg), cfg.vocab_size)


def from_hf_state_dict(state_dict: dict, cfg: ModelConfig, *, vocab_multiple_of: int = 1) -> dict:
    """The inverse of `to_hf_state_dict` (numpy or torch values); padded vocab rows are zeros."""
    return layers.params_from_hf(state_dict, hf_name_map(cfg), cfg.padded_vocab_size(vocab_multiple_of))


def hf_config_kwargs(cfg: ModelConfig) -> dict:
    """Keyword arguments for transformers.GPT2Config."""
    return {
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_inner": cfg.mlp_dim,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }


def hf_config(cfg: ModelConfig, **extra):
    """The transformers GPT2Config of an export; `extra` (token ids, architectures, ...) is passed through."""
    import transformers

    kwargs = hf_config_kwargs(cfg)
    if kwargs.get("n_inner") == 4 * cfg.d_model:
        kwargs["n_inner"] = None  # HF's own spelling of the default 4 x n_embd
    return transformers.GPT2Config(**kwargs, initializer_range=cfg.init_std, **extra)


def model_config_from_hf(hf: dict, *, where: str = "config.json", name: str = "") -> ModelConfig:
    """The ModelConfig of a GPT2LMHeadModel config.json; anything our model would compute differently at
    inference is refused (ExportError) with the field's name."""
    require_hf_value(hf, "activation_function", ("gelu_new",), where, "gelu_new")
    require_hf_value(hf, "scale_attn_weights", (True,), where, True)
    require_hf_value(hf, "scale_attn_by_inverse_layer_idx", (False,), where, False)
    require_hf_value(hf, "reorder_and_upcast_attn", (False,), where, False)
    require_hf_value(hf, "add_cross_attention", (False,), where, False)
    d = hf["n_embd"]
    return ModelConfig(
        family="gpt2", name=name, num_layers=hf["n_layer"], d_model=d, num_heads=hf["n_head"],
        mlp_dim=hf.get("n_inner") or 4 * d, vocab_size=hf["vocab_size"], max_seq_len=hf["n_positions"],
        tie_embeddings=hf.get("tie_word_embeddings", True), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        init_std=hf.get("initializer_range", 0.02),
    )


# --- the family as mixlm.model_families sees it ------------------------------------------------------

Model = GPT2
EMBEDDING_PARAM = "wte"  # the token embedding [V_pad, D]
LAYERS_PARAM = "h"  # the blocks: {'0': ..., '1': ...}, or one stacked tree with model.scan_layers
EMBEDDING_PARAMS = ("wte", "wpe", "lm_head")  # counted out of "non-embedding" (wpe: the position table)
HF_MODEL_TYPES = {"gpt2": "GPT2LMHeadModel"}


def hf_architecture(cfg: ModelConfig) -> str:
    return "GPT2LMHeadModel"


def unexportable_reason(cfg: ModelConfig) -> str:
    """'' when `cfg` maps exactly onto GPT2LMHeadModel, else why not."""
    if cfg.num_heads * cfg.dim_per_head != cfg.d_model:
        return (f"GPT2LMHeadModel needs n_embd == n_head * head_dim, but this gpt2 model has "
                f"{cfg.num_heads} heads x head_dim {cfg.dim_per_head} = {cfg.num_heads * cfg.dim_per_head} "
                f"!= d_model {cfg.d_model} (model.head_dim)")
    return ""


def model_card_rows(cfg: ModelConfig) -> dict[str, str]:
    """The architecture rows of the model card that depend on the family."""
    return {
        "MLP dim": f"{cfg.mlp_dim} (GELU)",
        "norm": f"LayerNorm, eps {cfg.norm_eps:g}",
        "positions": "learned",
    }
