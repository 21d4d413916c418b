"""A transformers folder as a mixlm checkpoint, and the reading of such folders (also used to run our Flax
model on a HF folder's weights, mixlm's lm-eval backend).

    result = import_hf("hf/y", "runs/y-init")       # checkpoints/0/ + model.yaml + config.json's ModelConfig
    cfg = model_config_from_hf(json.load(open("hf/y/config.json")))
    params = read_hf_params(Path("hf/y"), cfg)      # our layout, float32 numpy, vocabulary padded

Which family reads a config.json is the registry's business (mixlm.model_families): every family whose
HF_MODEL_TYPES has the folder's model_type is asked in registration order; the first that can represent
it wins, and when none can, the first one's reason is the error.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np

from mixlm import checkpoint
from mixlm.config import CheckpointConfig, DataConfig, ExperimentConfig, ModelConfig, save_config
from mixlm.data.tokenizer import TOKENIZER_FILES, copy_tokenizer_files
from mixlm.errors import ExportError
from mixlm.hf import param_readers
from mixlm.hf.folders import commit_dir, staging_dir
from mixlm.model_families import family_names, get_family
from mixlm.models import layers, stack_layers

# HF tensors that carry no learned state (buffers older transformers saved); import ignores them.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def model_config_from_hf(hf: dict, *, where: str = "config.json", name: str = "") -> ModelConfig:
    """The ModelConfig of a transformers config.json (LlamaForCausalLM / Qwen3ForCausalLM / GPT2LMHeadModel
    with the built-in families); anything our models would compute differently at inference is refused
    with the field's name. Dropout is not carried over (mixlm trains without it; its exports say 0.0)."""
    model_type = hf.get("model_type")
    families = [get_family(n) for n in family_names()]
    readers = [f for f in families if model_type in f.HF_MODEL_TYPES]
    if not readers:
        known = ", ".join(f"{t} ({what})" for f in families for t, what in f.HF_MODEL_TYPES.items())
        raise ExportError(f"{where}: model_type {model_type!r} cannot be imported; mixlm reads {known}")
    first_error = None
    for family in readers:
        try:
            return family.model_config_from_hf(hf, where=where, name=name)
        except ExportError as e:
            first_error = first_error or e
    raise first_error


def _weight_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [hf_dir / n for n in names]
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if any(hf_dir.glob("*.bin")):
        raise ExportError(f"{hf_dir}: only PyTorch .bin weights; mixlm imports safetensors (re-save the model "
                          "with save_pretrained(..., safe_serialization=True))")
    raise ExportError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


def read_hf_params(hf_dir: Path, cfg: ModelConfig) -> dict:
    """Our params (nested dict, float32 numpy, vocabulary padded with zero rows) from a HF folder's
    safetensors, read one tensor at a time."""
    from safetensors import safe_open

    name_map = get_family(cfg.family).hf_name_map(cfg)
    wanted = {name: (path, kind) for path, name, kind in name_map}
    padded = cfg.padded_vocab_size()
    flat, unused = {}, []
    for file in _weight_files(hf_dir):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has keys(), not __iter__
                if name in wanted:
                    path, kind = wanted[name]
                    flat[path] = layers.param_from_hf(f.get_tensor(name), kind, padded)
                elif not (name.endswith(IGNORED_HF_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_embeddings)):
                    unused.append(name)
    if unused:
        raise ExportError(f"{hf_dir}: weights {unused[:6]} have no place in mixlm's {cfg.family} model; this "
                          "variant cannot be imported")
    missing = [name for name, (path, _) in wanted.items() if path not in flat]
    if missing:
        raise ExportError(f"{hf_dir}: the weights lack {missing[:6]} (truncated download?)")
    params = param_readers.unflatten_params(flat)
    return stack_layers(params, cfg) if cfg.scan_layers else params  # model.scan_layers: blocks stacked


@dataclasses.dataclass
class ImportResult:
    out_dir: Path
    step_dir: Path  # for checkpoint.init_from
    model_config: Path  # model.yaml
    experiment_config: Path  # config.yaml
    num_params: int
    seconds: float


def import_hf(hf_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> ImportResult:
    """A transformers folder → OUT_DIR with checkpoints/0/ (params only, mixlm.checkpoint layout),
    model.yaml (the model section), config.yaml (an experiment config around it, data.tokenizer pointing at
    the copied tokenizer/) and tokenizer/. Continue pretraining with `checkpoint.init_from=OUT_DIR`."""
    start = time.perf_counter()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{hf_dir}: not a Hugging Face model folder (no config.json)")
    hf = json.loads(config_path.read_text())
    model_cfg = model_config_from_hf(hf, where=str(config_path), name=hf_dir.name)
    reason = get_family(model_cfg.family).unexportable_reason(model_cfg)
    if reason:
        raise ExportError(f"{config_path}: {reason}")
    params = read_hf_params(hf_dir, model_cfg)
    tmp = staging_dir(out_dir, overwrite)
    try:
        tokenizer = ""
        if any((hf_dir / n).is_file() for n in TOKENIZER_FILES):
            (tmp / "tokenizer").mkdir()
            copy_tokenizer_files(hf_dir, tmp / "tokenizer")
            tokenizer = str((out_dir / "tokenizer").resolve())
        cfg = ExperimentConfig(model=model_cfg, data=DataConfig(tokenizer=tokenizer))
        save_config(cfg, tmp / "config.yaml")
        import yaml

        (tmp / "model.yaml").write_text(yaml.safe_dump(dataclasses.asdict(model_cfg), sort_keys=False))
        meta = checkpoint.run_metadata(cfg, 0, tokens_seen={})
        meta["imported_from"] = str(hf_dir.resolve())
        meta["hf_config"] = hf
        ckpts = checkpoint.RunCheckpoints(tmp / checkpoint.CHECKPOINT_SUBDIR, CheckpointConfig(async_save=False),
                                          log=lambda _: None)
        ckpts.save(0, {"params": params}, data_state={}, meta=meta)
        ckpts.close()
        commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = sum(int(np.size(a)) for a in param_readers.flatten_params(params).values())
    return ImportResult(out_dir=out_dir, step_dir=out_dir / checkpoint.CHECKPOINT_SUBDIR / "0",
                        model_config=out_dir / "model.yaml", experiment_config=out_dir / "config.yaml",
                        num_params=n, seconds=time.perf_counter() - start)
