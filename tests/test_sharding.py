"""One rule table for parameters and activations: a realistic config shards every large weight, a weight
that cannot be sharded is named (an error under mesh.strict), mesh.rules overrides move both parameters
and activations, and the vocabulary padding does not depend on the device count, so a checkpoint written
on 8 devices restores on 2 with the same shapes."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mixlm import models
from mixlm.config import (
    ConfigError,
    MeshConfig,
    ModelConfig,
    config_from_dict,
    load_config,
    load_model_config,
)
from mixlm.models.layers import RESIDUAL_AXES
from mixlm.sharding import (
    DEFAULT_RULES,
    FALLBACK_WARN_ELEMENTS,
    Layout,
    ShardingFallbackWarning,
    make_layout,
    make_mesh,
    to_global_batch,
)
from mixlm.train import build_setup, train


def _layout(data, fsdp, tensor=1, **kw) -> Layout:
    return make_layout(MeshConfig(data=data, fsdp=fsdp, tensor=tensor, **kw))


def test_regmix_1b_on_data2_fsdp4_shards_every_large_weight():
    cfg = load_model_config("configs/models/regmix-1b.yaml")
    layout = _layout(2, 4)
    _, shapes, axes = models.abstract_params(cfg, layout.axis_size("vocab"))  # abstract: nothing allocated
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShardingFallbackWarning)
        shardings = layout.param_shardings(shapes, axes)
    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_shardings = jax.tree.leaves(shardings)
    large = [(path, leaf, s) for (path, leaf), s in zip(flat_shapes, flat_shardings)
             if leaf.size > FALLBACK_WARN_ELEMENTS]
    assert len(large) == 22 * 7 + 2  # q k v o gate up down per layer, embedding, LM head
    for path, leaf, sharding in large:
        assert "fsdp" in jax.tree.leaves(tuple(sharding.spec)), (path, sharding.spec)
        per_device = sharding.shard_shape(leaf.shape)
        assert np.prod(per_device) * 4 == leaf.size, (path, per_device)
    # The vocabulary is padded for the tensor axis (1 here) and vocab_multiple, not for the 8 devices.
    assert shapes["embed_tokens"].shape[0] == cfg.padded_vocab_size(1) == 50432


def test_a_large_weight_that_cannot_shard_is_named_and_strict_refuses():
    cfg = ModelConfig(num_layers=1, d_model=100, num_heads=4, mlp_dim=128, vocab_size=50_000, vocab_multiple=1)
    _, shapes, axes = models.abstract_params(cfg)
    with pytest.warns(ShardingFallbackWarning, match=r"embed_tokens \[50000, 100\] \(embed=100 by fsdp=8"):
        _layout(1, 8).param_shardings(shapes, axes)
    with pytest.raises(ConfigError, match="mesh.strict: .*embed_tokens"):
        _layout(1, 8, strict=True).param_shardings(shapes, axes)
    # A rule override moves the vocabulary onto fsdp instead: sharded, nothing to warn about.
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShardingFallbackWarning)
        shardings = _layout(1, 8, rules={"vocab": ["fsdp"]}).param_shardings(shapes, axes)
    assert shardings["embed_tokens"].spec == P("fsdp", None)


def test_activations_and_batches_follow_the_same_rules():
    x = jnp.zeros((8, 4, 16))
    # Default: rows over data x fsdp; embed is fsdp for weights, but in the residual stream fsdp is taken by
    # the batch, so D stays whole. With the batch on data only, the same embed rule splits D over fsdp.
    assert DEFAULT_RULES.mesh_axes("embed") == ("fsdp",)
    for rules, residual, rows in (({}, P(("data", "fsdp"), None, None), P(("data", "fsdp"), None)),
                                  ({"batch": ["data"]}, P("data", None, "fsdp"), P("data", None))):
        layout = _layout(2, 4, rules=rules)
        out = jax.jit(lambda v, layout=layout: layout.constrain(v * 2, RESIDUAL_AXES))(x)
        assert out.sharding.is_equivalent_to(NamedSharding(layout.mesh, residual), 3), out.sharding
        batch = to_global_batch({"inputs": np.zeros((8, 4), np.int32)}, layout)
        assert batch["inputs"].sharding.is_equivalent_to(NamedSharding(layout.mesh, rows), 2)


def test_mesh_rules_from_config_and_bad_axes():
    cfg = config_from_dict({"mesh": {"fsdp": -1, "rules": {"mlp": ["tensor", "fsdp"]}, "strict": True}})
    assert cfg.mesh.rules == {"mlp": ["tensor", "fsdp"]} and cfg.mesh.strict
    with pytest.raises(ConfigError, match=r"mesh.rules.mlp: .*data, fsdp, tensor.*'model'"):
        config_from_dict({"mesh": {"rules": {"mlp": ["model"]}}})


def _tiny(tmp_path, steps):
    cfg = load_config(None, ["data.seq_len=16", "train.global_batch_size=8", f"train.steps={steps}",
                             "schedule.kind=constant", "logging.progress=false", "logging.tensorboard=false",
                             "eval.batches=0", "checkpoint.every=1", "checkpoint.async_save=false",
                             f"train.output_dir={tmp_path / 'run'}"])
    model = ModelConfig(num_layers=1, d_model=32, num_heads=4, mlp_dim=64, vocab_size=250, max_seq_len=16,
                        vocab_multiple=1)
    return cfg.replace(model=model)


def test_checkpoint_from_8_devices_restores_on_2_with_identical_shapes(tmp_path):
    mesh8 = make_mesh(MeshConfig(fsdp=-1))
    mesh2 = make_mesh(MeshConfig(fsdp=-1), devices=jax.devices()[:2])
    first = train(_tiny(tmp_path, 1), mesh=mesh8, log_fn=lambda _: None)
    shapes8 = jax.tree.map(lambda a: a.shape, first.state.params)
    assert shapes8["embed_tokens"] == (250, 32)  # padded to a multiple of 1, not of the 8 devices
    assert jax.tree.map(lambda a: a.shape, build_setup(_tiny(tmp_path, 1), mesh2).abstract_state.params) == shapes8
    messages = []
    resumed = train(_tiny(tmp_path, 2), mesh=mesh2, log_fn=messages.append)
    assert any("resumed from" in m and "step 1" in m for m in messages), messages
    assert jax.tree.map(lambda a: a.shape, resumed.state.params) == shapes8
    assert {d.id for d in resumed.state.params["embed_tokens"].sharding.device_set} == {0, 1}
