"""A model family is one object plus one registry entry: a llama whose MLP projections have biases
(transformers: LlamaForCausalLM with mlp_bias=True) is defined and registered here, in this file only, then
trained with mixlm.train, exported to a transformers folder (its logits are transformers' own), and
imported back with identical params. No other module knows it; the fixture unregisters it."""

import dataclasses
import json
from typing import ClassVar

import jax
import numpy as np
import pytest
from flax import nnx

from mixlm.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    LoggingConfig,
    ModelConfig,
    TrainConfig,
)
from mixlm.errors import ExportError
from mixlm.model_families import family_names, register_family, unregister_family
from mixlm.models import layers, llama

NAME = "llama-mlp-bias"
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class BiasedMLP(nnx.Module):
    """SwiGLU whose three projections carry a bias: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        def linear(n_in, n_out, axes):
            return layers.Linear(n_in, n_out, logical_axes=axes, init_std=cfg.init_std, use_bias=True, dtype=dtype,
                                 rngs=rngs)

        self.gate_proj = linear(cfg.d_model, cfg.mlp_dim, ("embed", "mlp"))
        self.up_proj = linear(cfg.d_model, cfg.mlp_dim, ("embed", "mlp"))
        self.down_proj = linear(cfg.mlp_dim, cfg.d_model, ("mlp", "embed"))

    def __call__(self, x_BxLxD):
        return self.down_proj(jax.nn.silu(self.gate_proj(x_BxLxD)) * self.up_proj(x_BxLxD))


class BiasedMLPLlama(llama.Llama):
    """mixlm's llama with every block's MLP replaced by BiasedMLP."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, vocab_multiple_of: int = 1,
                 attention_impl: str | None = None):
        super().__init__(cfg, rngs=rngs, vocab_multiple_of=vocab_multiple_of, attention_impl=attention_impl)
        for block in self.layers:
            block.mlp = BiasedMLP(cfg, self.dtype, rngs)


class BiasedMLPLlamaFamily:
    """The family, as mixlm.model_families asks for it (see that module's docstring)."""

    Model = BiasedMLPLlama
    EMBEDDING_PARAM = llama.EMBEDDING_PARAM
    EMBEDDING_PARAMS = llama.EMBEDDING_PARAMS
    HF_MODEL_TYPES: ClassVar[dict[str, str]] = {"llama": "LlamaForCausalLM with mlp_bias"}

    @staticmethod
    def hf_architecture(cfg: ModelConfig) -> str:
        return "LlamaForCausalLM"

    @staticmethod
    def unexportable_reason(cfg: ModelConfig) -> str:
        if cfg.qk_norm:
            return "qk_norm would make it a Qwen3ForCausalLM, which has no MLP biases"
        return llama.unexportable_reason(cfg)

    @staticmethod
    def hf_name_map(cfg: ModelConfig) -> layers.HFNameMap:
        names = llama.hf_name_map(cfg)
        for i in range(cfg.num_layers):
            for proj in MLP_PROJECTIONS:
                names.append((("layers", str(i), "mlp", proj, "bias"), f"model.layers.{i}.mlp.{proj}.bias", "copy"))
        return names

    @staticmethod
    def hf_config(cfg: ModelConfig, **extra):
        config = llama.hf_config(cfg, **extra)
        config.mlp_bias = True
        return config

    @staticmethod
    def model_config_from_hf(hf: dict, *, where: str = "config.json", name: str = "") -> ModelConfig:
        if not hf.get("mlp_bias"):
            raise ExportError(f"{where}: mlp_bias is false; that is a plain llama")
        plain = llama.model_config_from_hf({**hf, "mlp_bias": False}, where=where, name=name)
        return dataclasses.replace(plain, family=NAME)

    @staticmethod
    def model_card_rows(cfg: ModelConfig) -> dict[str, str]:
        return {**llama.model_card_rows(cfg), "MLP dim": f"{cfg.mlp_dim} (SwiGLU with biases)"}


@pytest.fixture
def biased_family():
    register_family(NAME, BiasedMLPLlamaFamily())
    yield NAME
    unregister_family(NAME)
    assert NAME not in family_names()


def test_unregistered_family_is_refused_naming_the_registered_ones():
    with pytest.raises(ConfigError, match=r"model.family must be one of the registered families \(llama, gpt2"):
        ModelConfig(family=NAME)


def _real_vocab(path: tuple[str, ...], a: np.ndarray, vocab_size: int) -> np.ndarray:
    """The rows of the real vocabulary (export drops the padding rows; import pads zeros back)."""
    if path == ("embed_tokens",):
        return a[:vocab_size]
    if path == ("lm_head", "kernel"):
        return a[:, :vocab_size]
    return a


def test_test_only_family_trains_exports_and_imports(biased_family, tmp_path):
    import torch
    import transformers

    from mixlm.hf.export import export_hf
    from mixlm.hf.import_hf import import_hf
    from mixlm.hf.param_readers import open_checkpoint
    from mixlm.hf.verify import flax_forward, load_params, verify_export
    from mixlm.train import train

    cfg = ModelConfig(family=biased_family, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                      vocab_size=200, max_seq_len=16)
    experiment = ExperimentConfig(
        model=cfg,
        data=DataConfig(seq_len=16),
        train=TrainConfig(steps=3, global_batch_size=8, output_dir=str(tmp_path / "run")),
        checkpoint=CheckpointConfig(async_save=False),
        eval=EvalConfig(batches=0),
        logging=LoggingConfig(tensorboard=False, progress=False, peak_flops=1e9),
    )
    train(experiment, log_fn=lambda _: None)

    source = open_checkpoint(tmp_path / "run")
    assert source.step == 3 and source.cfg.model == cfg
    bias = source.read(("layers", "0", "mlp", "up_proj", "bias"))
    assert bias.shape == (64,) and np.abs(bias).max() > 0  # trained: the biases moved off their zero init

    result = export_hf(source, tmp_path / "hf")
    assert result.architecture == "LlamaForCausalLM"
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForCausalLM"] and hf_config["mlp_bias"] is True
    assert "(SwiGLU with biases)" in (tmp_path / "hf" / "README.md").read_text()

    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(model).__name__ == "LlamaForCausalLM" and not info["missing_keys"] and not info["unexpected_keys"]
    tokens_BxL = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16))
    ours_BxLxV = flax_forward(cfg, load_params(source))(tokens_BxL.astype(np.int32))
    with torch.no_grad():
        theirs_BxLxV = model.eval()(torch.from_numpy(tokens_BxL)).logits.numpy()
    np.testing.assert_allclose(ours_BxLxV, theirs_BxLxV, atol=1e-4, rtol=0)
    assert verify_export(source, tmp_path / "hf").passed

    imported = import_hf(tmp_path / "hf", tmp_path / "back")
    back = open_checkpoint(imported.out_dir)
    assert back.cfg.model == dataclasses.replace(cfg, name="hf")
    assert back.shapes() == {p: tuple(s) for p, s in source.shapes().items()}
    for path in source.shapes():
        np.testing.assert_array_equal(_real_vocab(path, back.read(path), cfg.vocab_size),
                                      _real_vocab(path, source.read(path), cfg.vocab_size), err_msg="/".join(path))
    assert not back.read(("embed_tokens",))[cfg.vocab_size:].any()  # padding rows come back as zeros
