"""Llama-family decoder: RMSNorm, RoPE (HF rotate_half), SwiGLU, GQA/MQA, optional tied embeddings
and optional per-head qk-norm (Qwen3 convention: RMSNorm over head_dim on q and k, before RoPE).

Parameter tree (names mirror HF LlamaForCausalLM / Qwen3ForCausalLM; kernels stored (in, out)):

    embed_tokens                                   [vocab, embed]
    layers/{i}/input_layernorm/scale               [norm]
    layers/{i}/self_attn/q_proj/kernel             [embed, heads]      (D, H*Dh)
    layers/{i}/self_attn/k_proj/kernel, v_proj     [embed, kv_heads]   (D, K*Dh)
    layers/{i}/self_attn/o_proj/kernel             [heads, embed]      (H*Dh, D)
    layers/{i}/self_attn/q_norm/scale, k_norm      [norm]              (Dh,)   only with qk_norm
    layers/{i}/post_attention_layernorm/scale      [norm]
    layers/{i}/mlp/gate_proj/kernel, up_proj       [embed, mlp]
    layers/{i}/mlp/down_proj/kernel                [mlp, embed]
    (model.scan_layers: layers/<same names> with a leading [num_layers] axis, logical "layers")
    norm/scale                                     [norm]
    lm_head/kernel                                 [embed, vocab]      only when not tied
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixlm.config import ModelConfig
from mixlm.errors import ExportError
from mixlm.models import attention, layers, stacked
from mixlm.models.hf_config import require_hf_value


def _linear(cfg: ModelConfig, dtype, rngs: nnx.Rngs, n_in: int, n_out: int, axes: tuple[str, str]):
    return layers.Linear(n_in, n_out, logical_axes=axes, init_std=cfg.init_std, dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, attention_impl: str):
        d, h, k, dh = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        self.q_proj = _linear(cfg, dtype, rngs, d, h * dh, ("embed", "heads"))
        self.k_proj = _linear(cfg, dtype, rngs, d, k * dh, ("embed", "kv_heads"))
        self.v_proj = _linear(cfg, dtype, rngs, d, k * dh, ("embed", "kv_heads"))
        self.o_proj = _linear(cfg, dtype, rngs, h * dh, d, ("heads", "embed"))
        self.q_norm = layers.RMSNorm(dh, eps=cfg.norm_eps, dtype=dtype) if cfg.qk_norm else None
        self.k_norm = layers.RMSNorm(dh, eps=cfg.norm_eps, dtype=dtype) if cfg.qk_norm else None
        self.num_heads, self.kv_heads, self.head_dim, self.rope_base = h, k, dh, cfg.rope_base
        self.attention_impl = attention_impl  # model.attention (mixlm.models.attention)

    def __call__(self, x_BxLxD, rope, segment_ids_BxL, layout=None):
        """`rope`: layers.rope_tables' (cos, sin) of the batch's positions."""
        impl = attention.resolve_impl(self.attention_impl, self.q_proj.dtype)
        if attention.takes_head_major(impl):
            return self._head_major(x_BxLxD, rope, segment_ids_BxL, impl, layout)
        b, length, _ = x_BxLxD.shape
        q_BxLxHxDh = self.q_proj(x_BxLxD).reshape(b, length, self.num_heads, self.head_dim)
        k_BxLxKxDh = self.k_proj(x_BxLxD).reshape(b, length, self.kv_heads, self.head_dim)
        v_BxLxKxDh = self.v_proj(x_BxLxD).reshape(b, length, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q_BxLxHxDh = self.q_norm(q_BxLxHxDh)
            k_BxLxKxDh = self.k_norm(k_BxLxKxDh)
        q_BxLxHxDh = layers.apply_rope(q_BxLxHxDh, rope)
        k_BxLxKxDh = layers.apply_rope(k_BxLxKxDh, rope)
        out_BxLxHxDh = attention.attend(
            q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL=segment_ids_BxL, impl=impl, layout=layout
        )
        return self.o_proj(out_BxLxHxDh.reshape(b, length, self.num_heads * self.head_dim))

    def _head_major(self, x_BxLxD, rope, segment_ids_BxL, impl, layout):
        """The same attention with q, k, v computed straight into [B, heads, L, Dh], the layout of the blocked
        (CPU) and splash kernels: on CPU this saves layout copies that cost about as much as the attention."""
        q_BxHxLxDh = layers.project_heads(x_BxLxD, self.q_proj, self.num_heads)
        k_BxKxLxDh = layers.project_heads(x_BxLxD, self.k_proj, self.kv_heads)
        v_BxKxLxDh = layers.project_heads(x_BxLxD, self.v_proj, self.kv_heads)
        if self.q_norm is not None:
            q_BxHxLxDh = self.q_norm(q_BxHxLxDh)
            k_BxKxLxDh = self.k_norm(k_BxKxLxDh)
        q_BxHxLxDh = layers.apply_rope(q_BxHxLxDh, rope, heads_axis=1)
        k_BxKxLxDh = layers.apply_rope(k_BxKxLxDh, rope, heads_axis=1)
        out_BxHxLxDh = attention.attend(
            q_BxHxLxDh, k_BxKxLxDh, v_BxKxLxDh, segment_ids_BxL=segment_ids_BxL, impl=impl, layout=layout,
            head_major=True,
        )
        return layers.merge_heads(out_BxHxLxDh, self.o_proj)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.mlp_dim
        self.gate_proj = _linear(cfg, dtype, rngs, d, f, ("embed", "mlp"))
        self.up_proj = _linear(cfg, dtype, rngs, d, f, ("embed", "mlp"))
        self.down_proj = _linear(cfg, dtype, rngs, f, d, ("mlp", "embed"))

    def __call__(self, x_BxLxD):
        dtype = self.gate_proj.dtype
        return layers.swiglu(
            x_BxLxD.astype(dtype), self.gate_proj.kernel[...].astype(dtype), self.up_proj.kernel[...].astype(dtype),
            self.down_proj.kernel[...].astype(dtype),
        )


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, attention_impl: str):
        self.input_layernorm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype, rngs, attention_impl)
        self.post_attention_layernorm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype, rngs)

    def __call__(self, x_BxLxD, rope, segment_ids_BxL, layout=None):
        x_BxLxD = x_BxLxD + self.self_attn(self.input_layernorm(x_BxLxD), rope, segment_ids_BxL, layout)
        return x_BxLxD + self.mlp(self.post_attention_layernorm(x_BxLxD))


class Llama(nnx.Module):
    """`model(tokens_BxL, positions_BxL=None, segment_ids_BxL=None, layout=None) -> logits_BxLxV` (float32, V
    padded); `layout` (mixlm.sharding.Layout) keeps the residual stream at its sharding and is the mesh the
    attention kernels run under. `attention_impl` overrides cfg.attention; cfg.remat applies per block."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        vocab_multiple_of: int = 1,
        attention_impl: str | None = None,
    ):
        dtype = jnp.dtype(cfg.compute_dtype)
        self.cfg = cfg
        self.padded_vocab = cfg.padded_vocab_size(vocab_multiple_of)
        self.dtype = dtype
        self.embed_tokens = layers.normal_param(
            rngs, (self.padded_vocab, cfg.d_model), cfg.init_std, ("vocab", "embed")
        )
        attention_impl = attention_impl or cfg.attention
        blocks = [Block(cfg, dtype, rngs, attention_impl) for _ in range(cfg.num_layers)]
        # scan_layers: one Block whose params are stacked [num_layers, ...] (mixlm.models.stacked)
        self.layers = stacked.stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
        self.lm_head = layers.make_lm_head(cfg, self.padded_vocab, dtype, rngs)

    def __call__(self, tokens_BxL, *, positions_BxL=None, segment_ids_BxL=None, layout=None):
        hidden_BxLxD = self.hidden(tokens_BxL, positions_BxL=positions_BxL, segment_ids_BxL=segment_ids_BxL,
                                   layout=layout)
        return layers.unembed(hidden_BxLxD, self.output_kernel())

    def output_kernel(self):
        """The LM head [D, V_pad] (float32 master weights; the embedding transposed when tied)."""
        return self.embed_tokens[...].T if self.lm_head is None else self.lm_head.kernel[...]

    def hidden(self, tokens_BxL, *, positions_BxL=None, segment_ids_BxL=None, layout=None):
        """The final-normed hidden states [B, L, D] (compute dtype): what the LM head multiplies."""
        # RoPE's cos/sin once for every layer (host constants when positions are 0..L-1 in every row)
        rope = layers.rope_tables(positions_BxL, tokens_BxL.shape[1], self.cfg.dim_per_head, self.cfg.rope_base)
        x_BxLxD = layers.embed_lookup(self.embed_tokens, tokens_BxL, self.dtype)
        x_BxLxD = layers.constrain(x_BxLxD, layers.RESIDUAL_AXES, layout)
        run_block = layers.remat_block(lambda block, x, rope, seg: block(x, rope, seg, layout), self.cfg.remat)
        if self.cfg.scan_layers:
            x_BxLxD = stacked.scan_blocks(self.layers, run_block, x_BxLxD, rope, segment_ids_BxL,
                                          constrain=lambda x: layers.constrain(x, layers.RESIDUAL_AXES, layout))
        else:
            for block in self.layers:
                x_BxLxD = layers.constrain(run_block(block, x_BxLxD, rope, segment_ids_BxL),
                                           layers.RESIDUAL_AXES, layout)
        return self.norm(x_BxLxD)

    def flops_per_token(self, seq_len: int, *, causal: bool = True) -> float:
        from mixlm.models import flops_per_token

        return flops_per_token(self.cfg, seq_len, causal=causal)


# --- Hugging Face mapping (LlamaForCausalLM; Qwen3ForCausalLM names for q_norm / k_norm) -----------


def hf_name_map(cfg: ModelConfig) -> layers.HFNameMap:
    """(our param path, HF name, kind) for every parameter; see layers.params_to_hf for the kinds."""
    names = [(("embed_tokens",), "model.embed_tokens.weight", "embedding")]
    for i in range(cfg.num_layers):
        ours, hf = ("layers", str(i)), f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.append((ours + ("self_attn", proj, "kernel"), f"{hf}.self_attn.{proj}.weight", "linear"))
        if cfg.qk_norm:
            for norm in ("q_norm", "k_norm"):
                names.append((ours + ("self_attn", norm, "scale"), f"{hf}.self_attn.{norm}.weight", "copy"))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.append((ours + ("mlp", proj, "kernel"), f"{hf}.mlp.{proj}.weight", "linear"))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            names.append((ours + (norm, "scale"), f"{hf}.{norm}.weight", "copy"))
    names.append((("norm", "scale"), "model.norm.weight", "copy"))
    if not cfg.tie_embeddings:
        names.append((("lm_head", "kernel"), "lm_head.weight", "lm_head"))
    return names


def to_hf_state_dict(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our params (split_params layout) -> {HF LlamaForCausalLM name: float32 numpy array}.

    Padded vocabulary rows are cut back to cfg.vocab_size. `lm_head.weight` is omitted when tied
    (HF ties it to model.embed_tokens.weight). With qk_norm the names are Qwen3ForCausalLM's.
    """
    return layers.params_to_hf(params, hf_name_map(cfg), cfg.vocab_size)


def from_hf_state_dict(state_dict: dict, cfg: ModelConfig, *, vocab_multiple_of: int = 1) -> dict:
    """The inverse of `to_hf_state_dict` (numpy or torch values); padded vocab rows are zeros."""
    return layers.params_from_hf(state_dict, hf_name_map(cfg), cfg.padded_vocab_size(vocab_multiple_of))


def hf_config_kwargs(cfg: ModelConfig) -> dict:
    """Keyword arguments for transformers.LlamaConfig (Qwen3Config when cfg.qk_norm)."""
    kwargs = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "attention_bias": False,
    }
    if cfg.qk_norm:
        kwargs["use_sliding_window"] = False
    else:
        kwargs["mlp_bias"] = False
    return kwargs


def hf_config(cfg: ModelConfig, **extra):
    """The transformers LlamaConfig (Qwen3Config when cfg.qk_norm) of an export; `extra` (token ids,
    architectures, ...) is passed through."""
    import transformers

    cls = transformers.Qwen3Config if cfg.qk_norm else transformers.LlamaConfig
    return cls(**hf_config_kwargs(cfg), initializer_range=cfg.init_std, **extra)


def model_config_from_hf(hf: dict, *, where: str = "config.json", name: str = "") -> ModelConfig:
    """The ModelConfig of a LlamaForCausalLM / Qwen3ForCausalLM config.json; anything our model would
    compute differently at inference is refused (ExportError) with the field's name."""
    model_type = hf.get("model_type")
    require_hf_value(hf, "hidden_act", ("silu",), where, "silu")
    require_hf_value(hf, "attention_bias", (False,), where, False)
    require_hf_value(hf, "mlp_bias", (False,), where, False)
    require_hf_value(hf, "pretraining_tp", (1,), where, 1)
    if model_type == "qwen3":
        require_hf_value(hf, "use_sliding_window", (False,), where, False)
        if any(t != "full_attention" for t in hf.get("layer_types") or []):
            raise ExportError(f"{where}: layer_types other than full_attention are not supported by mixlm")
    rope = hf.get("rope_parameters") or {}
    if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ExportError(f"{where}: RoPE scaling ({hf.get('rope_scaling') or rope}) is not supported by mixlm; "
                          "only the default rope_type")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d // heads
    kv = hf.get("num_key_value_heads") or heads
    return ModelConfig(
        family="llama", name=name, num_layers=hf["num_hidden_layers"], d_model=d, num_heads=heads,
        num_kv_heads=0 if kv == heads else kv, head_dim=0 if head_dim * heads == d else head_dim,
        mlp_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"], max_seq_len=hf["max_position_embeddings"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), qk_norm=model_type == "qwen3",
        init_std=hf.get("initializer_range", 0.02),
    )


# --- the family as mixlm.model_families sees it ------------------------------------------------------

Model = Llama
EMBEDDING_PARAM = "embed_tokens"  # the token embedding [V_pad, D]
LAYERS_PARAM = "layers"  # the blocks: {'0': ..., '1': ...}, or one stacked tree with model.scan_layers
EMBEDDING_PARAMS = ("embed_tokens", "lm_head")  # counted out of "non-embedding"
HF_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM: llama with qk-norm"}


def hf_architecture(cfg: ModelConfig) -> str:
    return "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"


def unexportable_reason(cfg: ModelConfig) -> str:
    """'' when `cfg` maps exactly onto its transformers class, else why not."""
    if cfg.dim_per_head % 2:
        return f"RoPE needs an even head_dim, got {cfg.dim_per_head}"
    return ""


def model_card_rows(cfg: ModelConfig) -> dict[str, str]:
    """The architecture rows of the model card that depend on the family."""
    return {
        "MLP dim": f"{cfg.mlp_dim} (SwiGLU)",
        "norm": f"RMSNorm, eps {cfg.norm_eps:g}",
        "positions": f"RoPE, base {cfg.rope_base:g}",
        "qk-norm": "yes (per head, before RoPE)" if cfg.qk_norm else "no",
    }
