"""Model families behind one small API used by training, checkpoints and export. Each family is one module
(llama.py, gpt2.py) registered in mixlm.model_families; this module dispatches to it by `cfg.family`.

    model = build_model(cfg, rngs=nnx.Rngs(0), vocab_multiple_of=mesh_size)
    logits_BxLxV = model(tokens_BxL, positions_BxL=None, segment_ids_BxL=None)   # float32, V padded
    graphdef, params = split_params(model)          # params: nested dict, str keys ('0', '1' for layers)
    model = merge_params(graphdef, params)          # fine inside jax.jit / jax.grad

The embedding and LM head have cfg.padded_vocab_size(vocab_multiple_of) rows, so logits are V_pad wide;
ids >= cfg.vocab_size never occur in data: mixlm.models.forward masks them (the one forward pass).

With cfg.scan_layers the blocks' params are stacked ([num_layers, ...] under the family's LAYERS_PARAM);
`unstack_layers(params, cfg)` / `stack_layers(params, cfg)` convert between that and the plain layout, the one
that hf_name_map, export and import speak (mixlm.models.stacked).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from flax import nnx

from mixlm.config import ModelConfig
from mixlm.model_families import get_family
from mixlm.models import stacked
from mixlm.models.forward import mask_padded_vocab
from mixlm.models.params import merge_params, split_params, str_keys


def build_model(
    cfg: ModelConfig, *, rngs: nnx.Rngs, vocab_multiple_of: int = 1, attention_impl: str | None = None
) -> nnx.Module:
    """A freshly initialised model (float32 params). `vocab_multiple_of` pads the embedding rows (e.g.
    to the mesh size); `attention_impl` (auto | blocked | xla | cudnn | splash | pallas_gpu, see
    mixlm.models.attention) overrides cfg.attention when given."""
    model_class = get_family(cfg.family).Model
    return model_class(cfg, rngs=rngs, vocab_multiple_of=vocab_multiple_of, attention_impl=attention_impl)


def abstract_params(cfg: ModelConfig, vocab_multiple_of: int = 1) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, shapes, logical_axes) without allocating: shapes is the split_params tree with
    jax.ShapeDtypeStruct leaves, logical_axes the same tree with tuple-of-str leaves (one name per
    dimension; use `is_leaf=lambda x: isinstance(x, tuple)` when mapping over it)."""
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0), vocab_multiple_of=vocab_multiple_of))
    graphdef, state = nnx.split(model)
    shapes = str_keys(nnx.to_pure_dict(state))
    axes: dict = {}
    for path, variable in nnx.to_flat_state(state):
        node = axes
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = tuple(variable.get_metadata()["logical_axes"])
    return graphdef, shapes, axes


def layers_param(cfg: ModelConfig) -> str:
    """The top-level param key of the family's blocks ('layers' for llama, 'h' for gpt2)."""
    family = get_family(cfg.family)
    key = getattr(family, "LAYERS_PARAM", None)
    if key is None:
        raise ValueError(f"model family {cfg.family!r} declares no LAYERS_PARAM, so model.scan_layers cannot "
                         "convert its params")
    return key


def unstack_layers(params: dict, cfg: ModelConfig) -> dict:
    """A scanned model's params (stacked [num_layers, ...] blocks) in the plain layout ('0', '1', ... per
    layer); plain params come back unchanged. Leaves are sliced, not copied to host."""
    return stacked.unstack_layers(params, layers_param(cfg))


def stack_layers(params: dict, cfg: ModelConfig) -> dict:
    """Plain params in the scanned layout (the inverse of unstack_layers); scanned params come back unchanged."""
    return stacked.stack_layers(params, layers_param(cfg))


@functools.lru_cache(maxsize=64)
def _unpadded_counts(cfg: ModelConfig) -> tuple[int, int, int]:
    """(total, non_embedding, matmul kernels outside the LM head) with the unpadded vocabulary; the family's
    EMBEDDING_PARAMS are the embedding part."""
    embedding_params = get_family(cfg.family).EMBEDDING_PARAMS
    _, shapes, _ = abstract_params(dataclasses.replace(cfg, vocab_multiple=1))
    total = non_embedding = kernels = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        keys = [p.key for p in path]
        n = int(leaf.size)
        total += n
        if keys[0] not in embedding_params:
            non_embedding += n
            kernels += n if keys[-1] == "kernel" else 0
    return total, non_embedding, kernels


def param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, non_embedding) parameters with the unpadded vocabulary. Tied embeddings count once;
    non-embedding leaves out the token embedding, the LM head and GPT-2's position table (wpe)."""
    total, non_embedding, _ = _unpadded_counts(cfg)
    return total, non_embedding


def flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = True) -> float:
    """Training FLOPs per token (forward + backward = 3x forward, 2 FLOPs per multiply-add):

        6 * (matmul params of the blocks + d_model * vocab_size for the LM head)
        + 6 * 2 * seq_len * num_layers * num_heads * head_dim   (q.k and probs.v), halved when causal.

    Embedding lookups, norms, biases, activations and softmax are not counted (MaxText / PaLM style).
    """
    _, _, kernels = _unpadded_counts(cfg)
    matmul_params = kernels + cfg.d_model * cfg.vocab_size
    attention = 12 * seq_len * cfg.num_layers * cfg.num_heads * cfg.dim_per_head * (0.5 if causal else 1.0)
    return float(6 * matmul_params + attention)


__all__ = [
    "abstract_params",
    "build_model",
    "flops_per_token",
    "layers_param",
    "mask_padded_vocab",
    "merge_params",
    "param_counts",
    "split_params",
    "stack_layers",
    "unstack_layers",
]
