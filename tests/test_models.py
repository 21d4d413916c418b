"""Model families: HF parity (logits equal transformers' own models on the same weights), causality
through gradients, packed segments, parameter counts of the seed configs, FLOPs/token, param API."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixlm.config import ModelConfig, load_model_config
from mixlm.model_families import get_family
from mixlm.models import (
    abstract_params,
    build_model,
    flops_per_token,
    layers,
    mask_padded_vocab,
    merge_params,
    param_counts,
    split_params,
)

MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"

LLAMA = ModelConfig(
    family="llama",
    num_layers=2,
    d_model=64,
    num_heads=4,
    num_kv_heads=0,
    mlp_dim=96,
    vocab_size=200,
    vocab_multiple=128,
    max_seq_len=32,
)
GPT2 = ModelConfig(
    family="gpt2",
    num_layers=2,
    d_model=64,
    num_heads=4,
    mlp_dim=128,
    vocab_size=200,
    vocab_multiple=128,
    max_seq_len=32,
    tie_embeddings=True,
)


def randomized_params(cfg: ModelConfig, seed: int = 0):
    """A model whose every param (norm scales and biases too) is random, so a wrong mapping shows."""
    graphdef, params = split_params(build_model(cfg, rngs=nnx.Rngs(seed)))
    leaves, treedef = jax.tree.flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    new = []
    for key, (path, a) in zip(keys, leaves):
        noise = jax.random.normal(key, a.shape, a.dtype)
        new.append(1.0 + 0.2 * noise if path[-1].key == "scale" else 0.1 * noise)
    return graphdef, jax.tree.unflatten(treedef, new)


def jitted_forward(graphdef):
    """model(tokens, positions, segment_ids) under jax.jit: eager NNX compiles every op per shape (~3 s)."""

    @jax.jit
    def forward(params, tokens_BxL, positions_BxL=None, segment_ids_BxL=None):
        return merge_params(graphdef, params)(
            tokens_BxL, positions_BxL=positions_BxL, segment_ids_BxL=segment_ids_BxL
        )

    return forward


def hf_model(cfg: ModelConfig, state_dict: dict):
    import torch
    import transformers

    family = get_family(cfg.family)
    config, cls = family.hf_config(cfg), getattr(transformers, family.hf_architecture(cfg))
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(config).float().eval()
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=False
    )
    assert not unexpected, unexpected
    assert set(missing) <= ({"lm_head.weight"} if cfg.tie_embeddings else set()), missing
    return model


@pytest.mark.parametrize(
    "cfg",
    [
        pytest.param(LLAMA, id="llama-untied"),
        pytest.param(dataclasses.replace(LLAMA, tie_embeddings=True), id="llama-tied"),
        pytest.param(dataclasses.replace(LLAMA, num_kv_heads=2, rope_base=500000.0), id="llama-gqa-rope500k"),
        pytest.param(
            dataclasses.replace(LLAMA, num_kv_heads=1, head_dim=8, norm_eps=1e-6), id="llama-mqa-headdim8"
        ),
        pytest.param(dataclasses.replace(LLAMA, num_kv_heads=2, qk_norm=True), id="llama-qknorm-vs-qwen3"),
        pytest.param(GPT2, id="gpt2-tied"),
        pytest.param(dataclasses.replace(GPT2, tie_embeddings=False), id="gpt2-untied"),
    ],
)
def test_logits_match_transformers(cfg):
    import torch

    graphdef, params = randomized_params(cfg)
    state_dict = get_family(cfg.family).to_hf_state_dict(params, cfg)
    tokens_BxL = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
    ours_BxLxV = jitted_forward(graphdef)(params, jnp.asarray(tokens_BxL))
    assert ours_BxLxV.dtype == jnp.float32 and ours_BxLxV.shape == (2, 12, cfg.padded_vocab_size())
    with torch.no_grad():
        theirs_BxLxV = hf_model(cfg, state_dict)(torch.from_numpy(tokens_BxL)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours_BxLxV)[..., : cfg.vocab_size], theirs_BxLxV, atol=1e-4, rtol=0)

    # from_hf_state_dict inverts to_hf_state_dict; the padded vocabulary rows come back as zeros.
    back = get_family(cfg.family).from_hf_state_dict(state_dict, cfg)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for (path, a), b in zip(jax.tree.flatten_with_path(params)[0], jax.tree.leaves(back)):
        a = np.asarray(a)
        if path[0].key in ("embed_tokens", "wte"):
            a = np.concatenate([a[: cfg.vocab_size], np.zeros_like(a[cfg.vocab_size :])])
        elif path[0].key == "lm_head":
            a = np.concatenate([a[:, : cfg.vocab_size], np.zeros_like(a[:, cfg.vocab_size :])], axis=1)
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("cfg", [dataclasses.replace(LLAMA, num_kv_heads=2), GPT2], ids=["llama", "gpt2"])
def test_causal_through_gradients(cfg, monkeypatch):
    graphdef, params = randomized_params(cfg)
    model = merge_params(graphdef, params)
    tokens_BxL = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 8)))
    lookup = layers.embed_lookup

    def logit_sums_L(delta_BxLxD):  # the delta enters at every position's input embedding
        monkeypatch.setattr(
            layers, "embed_lookup", lambda table, ids, dtype: lookup(table, ids, dtype) + delta_BxLxD
        )
        return model(tokens_BxL)[0].sum(axis=-1)

    jacobian_LxBxLxD = jax.jit(jax.jacrev(logit_sums_L))(jnp.zeros((1, 8, cfg.d_model)))
    grad_norm_LxL = np.asarray(
        jnp.linalg.norm(jacobian_LxBxLxD[:, 0], axis=-1)
    )  # [t, s]: d logits[t] / d x[s]
    assert np.all(np.triu(grad_norm_LxL, k=1) == 0.0), grad_norm_LxL
    assert np.all(grad_norm_LxL[np.tril_indices(8)] > 0.0), grad_norm_LxL


@pytest.mark.parametrize("cfg", [dataclasses.replace(LLAMA, num_kv_heads=2), GPT2], ids=["llama", "gpt2"])
def test_packed_segments_equal_separate_runs(cfg):
    graphdef, params = randomized_params(cfg)
    forward = jitted_forward(graphdef)
    tokens_L = np.random.default_rng(2).integers(0, cfg.vocab_size, 10)
    segments = ((0, 3), (3, 8), (8, 10))
    # Row 0: the packed sequence; rows 1..3: each document alone at the start of a row (the padding
    # after it cannot change its logits, by causality) with the default positions 0, 1, ...
    tokens_BxL = np.zeros((4, 10), np.int64)
    tokens_BxL[0] = tokens_L
    for row, (start, stop) in enumerate(segments, 1):
        tokens_BxL[row, : stop - start] = tokens_L[start:stop]
    segment_ids_BxL = np.ones((4, 10), np.int32)
    segment_ids_BxL[0] = [1, 1, 1, 2, 2, 2, 2, 2, 3, 3]
    positions_BxL = np.tile(np.arange(10, dtype=np.int32), (4, 1))
    positions_BxL[0] = [0, 1, 2, 0, 1, 2, 3, 4, 0, 1]
    logits_BxLxV = np.asarray(
        forward(params, jnp.asarray(tokens_BxL), jnp.asarray(positions_BxL), jnp.asarray(segment_ids_BxL))
    )
    for row, (start, stop) in enumerate(segments, 1):
        np.testing.assert_allclose(
            logits_BxLxV[0, start:stop], logits_BxLxV[row, : stop - start], atol=1e-5, rtol=0
        )
    # Without segment ids, document 2 sees document 1 and its logits change.
    unpacked_BxLxV = np.asarray(
        forward(params, jnp.asarray(tokens_BxL), jnp.asarray(positions_BxL), jnp.ones((4, 10), jnp.int32))
    )
    assert np.abs(unpacked_BxLxV[0, 3:8] - logits_BxLxV[0, 3:8]).max() > 1e-3



def test_rope_tables_default_positions_equal_explicit_ones():
    """The host-constant tables (positions None) equal the traced ones for positions 0..L-1 and the hand
    formula cos/sin(p * base^(-2i/Dh)); the model's logits do not depend on which path built them."""
    head_dim, base, length = 8, 500000.0, 12
    cos_1xLxH, sin_1xLxH = layers.rope_tables(None, length, head_dim, base)
    positions_BxL = jnp.tile(jnp.arange(length, dtype=jnp.int32), (2, 1))
    cos_BxLxH, sin_BxLxH = jax.jit(lambda p: layers.rope_tables(p, length, head_dim, base))(positions_BxL)
    angles = np.arange(length)[:, None] * base ** (-np.arange(0, head_dim, 2) / head_dim)[None, :]
    np.testing.assert_allclose(np.asarray(cos_1xLxH)[0], np.cos(angles), atol=2e-6)
    np.testing.assert_allclose(np.asarray(sin_1xLxH)[0], np.sin(angles), atol=2e-6)
    np.testing.assert_allclose(np.asarray(cos_BxLxH), np.broadcast_to(cos_1xLxH, (2, length, 4)), atol=2e-6)
    np.testing.assert_allclose(np.asarray(sin_BxLxH), np.broadcast_to(sin_1xLxH, (2, length, 4)), atol=2e-6)
    cfg = dataclasses.replace(LLAMA, num_kv_heads=2, rope_base=base)
    graphdef, params = randomized_params(cfg)
    forward = jitted_forward(graphdef)
    tokens_BxL = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, length)))
    np.testing.assert_allclose(np.asarray(forward(params, tokens_BxL)),
                               np.asarray(forward(params, tokens_BxL, positions_BxL)), atol=1e-5, rtol=0)

SEED_COUNTS = {  # config: (total, non_embedding); None where DESIGN.md gives no exact number
    "metarater-3.3b": (3_335_989_760, None),
    "metarater-1.3b": (1_364_297_728, None),
    "regmix-1m": (None, 1_312_000),
    "regmix-60m": (None, 58_998_528),
    "regmix-1b": (None, 1_130_457_088),
    "dclm-1b": (
        1_439_801_344,
        None,
    ),  # ≈1.44B; 24 x (block + 2 x 128 qk-norm scales) + 2 x 50432 x 2048 + 2048
    "gpt2-70m": (64_085_504, None),
}


def test_seed_config_param_counts():
    for name, (total, non_embedding) in SEED_COUNTS.items():
        counted = param_counts(load_model_config(MODELS / f"{name}.yaml"))
        if total is not None:
            assert counted[0] == total, name
        if non_embedding is not None:
            assert counted[1] == non_embedding, name


def test_params_command_prints_exact_counts(capsys):
    from mixlm.cli import main

    for name, text in [
        ("metarater-3.3b", "3,335,989,760"),
        ("gpt2-70m", "64,085,504"),
        ("regmix-1b", "1,130,457,088"),
        ("regmix-1m", "1,312,000"),
    ]:
        assert main(["params", str(MODELS / f"{name}.yaml")]) == 0
        assert text in capsys.readouterr().out, name


def test_every_model_config_loads_and_builds_abstractly():
    for path in sorted(MODELS.glob("*.yaml")):
        cfg = load_model_config(path)
        _, shapes, _ = abstract_params(cfg)
        assert shapes[get_family(cfg.family).EMBEDDING_PARAM].shape[0] == cfg.padded_vocab_size()


def test_flops_per_token_hand_count():
    cfg = load_model_config(
        MODELS / "llama-tiny.yaml"
    )  # 2 layers, d 64, 4 heads (2 kv), Dh 16, mlp 172, vocab 512
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 172  # q, k, v, o, gate/up/down
    matmul = 2 * per_layer + 64 * 512  # + lm_head
    attention = 2 * 2 * 128 * 4 * 16  # per token forward: q.k and probs.v, 2 FLOPs per MAC, L = 128
    assert flops_per_token(cfg, 128, causal=False) == 6 * matmul + 3 * 2 * attention
    assert flops_per_token(cfg, 128) == 6 * matmul + 3 * attention
    model = build_model(cfg, rngs=nnx.Rngs(0))
    assert model.flops_per_token(128) == flops_per_token(cfg, 128)

    g = load_model_config(MODELS / "gpt2-tiny.yaml")  # 2 layers, d 64, 4 heads, mlp 256, vocab 512, tied
    matmul = 2 * (64 * 192 + 64 * 64 + 2 * 64 * 256) + 64 * 512
    assert flops_per_token(g, 64) == 6 * matmul + 6 * 2 * 64 * 2 * 64 / 2


def test_split_merge_abstract_and_axes():
    cfg = load_model_config(MODELS / "llama-tiny.yaml")
    model = build_model(cfg, rngs=nnx.Rngs(0), vocab_multiple_of=3)
    graphdef, params = split_params(model)
    assert params["embed_tokens"].shape == (cfg.padded_vocab_size(3), cfg.d_model) == (768, 64)
    assert all(isinstance(k, str) for k in params["layers"])
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))

    _, shapes, axes = abstract_params(cfg, vocab_multiple_of=3)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(
        lambda s: (s.shape, s.dtype), shapes
    )
    names = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm", "position"}
    for shape, ax in zip(
        jax.tree.leaves(shapes), jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    ):
        assert len(ax) == len(shape.shape) and set(ax) <= names, (shape, ax)
    assert axes["layers"]["0"]["self_attn"]["k_proj"]["kernel"] == ("embed", "kv_heads")

    tokens_BxL = jnp.zeros((2, 8), jnp.int32)

    @jax.jit
    def loss(p):
        return mask_padded_vocab(merge_params(graphdef, p)(tokens_BxL), cfg.vocab_size).mean()

    grads = jax.grad(loss)(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    logits_BxLxV = jitted_forward(graphdef)(params, tokens_BxL)
    assert logits_BxLxV.shape == (2, 8, 768)
    np.testing.assert_allclose(
        loss(params), logits_BxLxV[..., :512].mean() * 512 / 768 + (-1e9) * 256 / 768, rtol=1e-5
    )


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = dataclasses.replace(load_model_config(MODELS / "gpt2-tiny.yaml"), compute_dtype="bfloat16")
    graphdef, params = randomized_params(cfg)
    tokens_BxL = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 16)))
    logits = jitted_forward(graphdef)(params, tokens_BxL)
    graphdef32, params32 = randomized_params(dataclasses.replace(cfg, compute_dtype="float32"))
    reference = jitted_forward(graphdef32)(params32, tokens_BxL)
    assert logits.dtype == jnp.float32 and all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    assert np.abs(np.asarray(logits - reference)).max() < 0.1 * np.abs(np.asarray(reference)).max()


def test_blocked_attention_equals_dot_product_attention():
    """The CPU block-causal path is exact: same output and gradients as jax.nn.dot_product_attention,
    with GQA and packed segments."""
    from mixlm.models.attention import attend

    b, length, h, k, dh = 2, 128, 4, 2, 16
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (b, length, h, dh))
    kk = jax.random.normal(keys[1], (b, length, k, dh))
    v = jax.random.normal(keys[2], (b, length, k, dh))
    seg = jnp.asarray(np.repeat([[1, 2, 2, 3]], b, axis=0).repeat(length // 4, axis=1))
    for segments in (None, seg):
        outs, grads = [], []
        for impl in ("xla", "blocked"):
            def f(q, kk, v, impl=impl, segments=segments):
                return attend(q, kk, v, segment_ids_BxL=segments, impl=impl)

            outs.append(f(q, kk, v))
            grads.append(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, kk, v))
        np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
        for g0, g1 in zip(grads[0], grads[1]):
            np.testing.assert_allclose(g0, g1, atol=1e-4)


def test_swiglu_custom_backward_equals_autodiff():
    from mixlm.models.layers import swiglu

    keys = jax.random.split(jax.random.key(5), 4)
    x = jax.random.normal(keys[0], (2, 6, 8))
    gate, up = jax.random.normal(keys[1], (8, 12)), jax.random.normal(keys[2], (8, 12))
    down = jax.random.normal(keys[3], (12, 8))

    def reference(x, gate, up, down):
        return jnp.dot(jax.nn.silu(jnp.dot(x, gate)) * jnp.dot(x, up), down)

    np.testing.assert_allclose(swiglu(x, gate, up, down), reference(x, gate, up, down), rtol=1e-5, atol=1e-5)
    ours = jax.grad(lambda *a: jnp.sum(jnp.sin(swiglu(*a))), argnums=(0, 1, 2, 3))(x, gate, up, down)
    theirs = jax.grad(lambda *a: jnp.sum(jnp.sin(reference(*a))), argnums=(0, 1, 2, 3))(x, gate, up, down)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
