"""A param source (mixlm.checkpoint: open_checkpoint, MemoryReader) as a transformers folder.

    source = open_checkpoint("runs/x", step=None)       # newest good step; or MemoryReader(cfg, params)
    result = export_hf(source, "hf/x", dtype="bfloat16", tokenizer="tok/")

The family (mixlm.model_families) names the transformers class (llama → `LlamaForCausalLM`, llama with
qk-norm → `Qwen3ForCausalLM`, gpt2 → `GPT2LMHeadModel`), builds its config and maps every tensor
(`hf_name_map`); vocabulary padding rows are dropped, tied models store no lm_head.

Export streams: the source hands out one array at a time, it is put in HF layout and the output dtype in
one copy, and appended to a safetensors file whose header was written first from the known shapes. Peak
memory is the interpreter plus about two copies of the largest tensor, whatever the model size. Files are
written into a hidden sibling folder renamed to OUT_DIR only when complete (mixlm.hf.folders).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mixlm import model_card
from mixlm.checkpoint import VALUE_SUMS
from mixlm.config import ModelConfig
from mixlm.data.tokenizer import copy_tokenizer
from mixlm.errors import ExportError
from mixlm.hf.folders import commit_dir, staging_dir
from mixlm.hf.param_readers import ParamPath, ParamReader, flatten_params
from mixlm.hf.provenance import PROVENANCE_FILE, CardOptions, card_info_from_provenance
from mixlm.hf.safetensors_files import (
    DEFAULT_MAX_SHARD_BYTES,
    HFTensor,
    numpy_dtype,
    shard_plan,
    write_safetensors,
)
from mixlm.model_families import get_family
from mixlm.models import abstract_params, layers, layers_param, stacked


def hf_plan(cfg: ModelConfig, shapes: dict[ParamPath, tuple[int, ...]]) -> list[HFTensor]:
    """Every HF tensor of the export, in file order, checked against the source's params."""
    family = get_family(cfg.family)
    arch = family.hf_architecture(cfg)
    reason = family.unexportable_reason(cfg)
    if reason:
        raise ExportError(f"this model cannot be exported to {arch}: {reason}")
    name_map = family.hf_name_map(cfg)
    mapped = {path for path, _, _ in name_map}
    extra = sorted("/".join(p) for p in set(shapes) - mapped)
    if extra:
        raise ExportError(f"params {extra[:6]} have no counterpart in {arch}: this model variant cannot be "
                          "exported (mixlm.models.<family>.hf_name_map lists what maps)")
    missing = sorted("/".join(p) for p in mapped - set(shapes))
    if missing:
        raise ExportError(f"the checkpoint lacks params {missing[:6]} that its model config implies "
                          f"({cfg.family}, {cfg.num_layers} layers, tie_embeddings={cfg.tie_embeddings}, "
                          f"qk_norm={cfg.qk_norm}): was it written with another config?")
    _, expected, _ = abstract_params(dataclasses.replace(cfg, scan_layers=False))  # shapes: plain layout
    expected_flat = flatten_params(expected)
    plan = []
    for path, name, kind in name_map:
        shape = layers.hf_shape(shapes[path], kind, cfg.vocab_size)
        want = layers.hf_shape(tuple(expected_flat[path].shape), kind, cfg.vocab_size)
        vocab_axis = {"embedding": 0, "lm_head": 1}.get(kind)
        if shape != want or (vocab_axis is not None and shapes[path][vocab_axis] < cfg.vocab_size):
            raise ExportError(f"the checkpoint's {'/'.join(path)} has shape {shapes[path]}, but the model config "
                              f"implies {tuple(expected_flat[path].shape)} (vocabulary rows may differ)")
        plan.append(HFTensor(name, path, kind, shape))
    return plan


class PlainLayoutSource:
    """A ParamReader of a scanned model (model.scan_layers: blocks stacked [num_layers, ...]) seen in the plain
    layout that hf_name_map speaks: read(('layers', '3', ...)) is layer 3 of the stacked ('layers', ...) array.
    Each stacked array is read once and dropped when its last layer has been handed out, so an export in
    hf_name_map's layer-major order holds about the blocks' params once in host memory (not two copies)."""

    def __init__(self, source: ParamReader):
        self.source, self.cfg, self.step, self.meta = source, source.cfg, source.step, source.meta
        self.description = source.description
        self._key = layers_param(source.cfg.model)
        self._shapes: dict[ParamPath, tuple[int, ...]] = {}
        self._num_layers: dict[ParamPath, int] = {}  # stacked path -> its leading axis
        for path, shape in source.shapes().items():
            if path[0] == self._key and not path[1].isdigit():
                self._num_layers[path] = shape[0]
                for i in range(shape[0]):
                    self._shapes[(path[0], str(i), *path[1:])] = tuple(shape[1:])
            else:
                self._shapes[path] = shape
        self._left = dict(self._num_layers)  # stacked path -> layers not yet handed out
        self._cache: dict[ParamPath, np.ndarray] = {}

    def shapes(self) -> dict[ParamPath, tuple[int, ...]]:
        return dict(self._shapes)

    def read(self, path: ParamPath) -> np.ndarray:
        stacked_path, index = stacked.layer_slice_path(path, self._key)
        if index is None:
            return self.source.read(path)
        if stacked_path not in self._cache:
            self._cache[stacked_path] = self.source.read(stacked_path)
        out = np.array(self._cache[stacked_path][index])
        self._left[stacked_path] -= 1
        if self._left[stacked_path] <= 0:  # every layer handed out: drop it (a later pass reads it again)
            self._cache.pop(stacked_path)
            self._left[stacked_path] = self._num_layers[stacked_path]
        return out


def plain_layout(source: ParamReader) -> ParamReader:
    """`source` in the plain layout: itself, or a PlainLayoutSource when its config has model.scan_layers."""
    return PlainLayoutSource(source) if source.cfg.model.scan_layers else source


def write_weights(plan: list[HFTensor], source: ParamReader, folder: Path, *, dtype: str,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, log: Callable[[str], None] | None = None) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json above
    max_shard_bytes. Returns the file names."""
    np_dtype = numpy_dtype(dtype)
    vocab_size = source.cfg.model.vocab_size
    shards = shard_plan(plan, np_dtype.itemsize, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    done = [0]

    def fetch(t: HFTensor) -> np.ndarray:
        a = layers.param_to_hf(source.read(t.path), t.kind, vocab_size, np_dtype)
        done[0] += 1
        if log and (done[0] % 50 == 0 or done[0] == len(plan)):
            log(f"  {done[0]}/{len(plan)} tensors")
        return a

    total = 0
    for name, tensors in zip(names, shards):
        total += write_safetensors(folder / name, tensors, dtype, fetch)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {t.name: name for name, tensors in zip(names, shards) for t in tensors}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        names.append("model.safetensors.index.json")
    return names


def hf_config(cfg: ModelConfig, *, dtype: str, special_tokens: dict | None = None):
    """The transformers config object of an export (the family's, e.g. LlamaConfig / Qwen3Config / GPT2Config)."""
    family = get_family(cfg.family)
    tokens = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    tokens.update({k: v for k, v in (special_tokens or {}).items() if v is not None})
    config = family.hf_config(cfg, **tokens, architectures=[family.hf_architecture(cfg)])
    config.dtype = dtype
    return config


@dataclasses.dataclass
class ExportResult:
    out_dir: Path
    architecture: str
    files: list[str]
    num_params: int  # HF params written (vocabulary cut, tied embedding once)
    weight_bytes: int
    seconds: float


def export_hf(source: ParamReader, out_dir: str | Path, *, dtype: str = "float32", tokenizer: str | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
              card: CardOptions | None = None, log: Callable[[str], None] | None = None,
              check: Callable[[Path], None] | None = None) -> ExportResult:
    """Writes a transformers folder for `source`: safetensors weights in `dtype`, config.json,
    generation_config.json, the tokenizer (`tokenizer`, else the run's data.tokenizer), README.md (model card)
    and mixlm_export.json. Atomic: OUT_DIR appears only when everything is written and `check(folder)` (e.g.
    the parity check, mixlm.hf.verify) has run on the finished hidden folder without raising; whatever raises
    leaves OUT_DIR as it was (absent, or the old folder with --overwrite)."""
    start = time.perf_counter()
    cfg = source.cfg.model
    architecture = get_family(cfg.family).hf_architecture(cfg)
    numpy_dtype(dtype)
    source = plain_layout(source)  # hf_name_map names the plain layout; a scanned checkpoint is sliced per layer
    plan = hf_plan(cfg, source.shapes())
    out_dir = Path(out_dir)
    card = card or CardOptions()
    tmp = staging_dir(out_dir, overwrite)
    try:
        tokenizer_src = tokenizer or source.cfg.data.tokenizer
        special = {}
        if tokenizer_src:
            special = copy_tokenizer(tokenizer_src, tmp, vocab_size=cfg.vocab_size)
        elif log:
            log("warning: no tokenizer (pass --tokenizer or set data.tokenizer); the folder has weights only")
        write_weights(plan, source, tmp, dtype=dtype, max_shard_bytes=max_shard_bytes, log=log)
        config = hf_config(cfg, dtype=dtype, special_tokens=special)
        config.save_pretrained(tmp)
        import transformers

        transformers.GenerationConfig.from_model_config(config).save_pretrained(tmp)
        provenance = {
            "name": card.name or out_dir.name,
            "architecture": architecture,
            "dtype": dtype,
            "source": source.description,
            "step": source.step,
            "config": source.cfg.to_dict(),
            "checkpoint_meta": {k: v for k, v in source.meta.items() if k not in ("config", VALUE_SUMS)},
            "tokenizer": tokenizer_src or "",
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str) + "\n")
        info = card_info_from_provenance(provenance, dataclasses.replace(card, name=provenance["name"]))
        (tmp / "README.md").write_text(model_card.render_model_card(info))
        if check is not None:
            check(tmp)
        commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    itemsize = numpy_dtype(dtype).itemsize
    return ExportResult(
        out_dir=out_dir, architecture=architecture, files=sorted(p.name for p in out_dir.iterdir()),
        num_params=sum(t.size for t in plan), weight_bytes=sum(t.size for t in plan) * itemsize,
        seconds=time.perf_counter() - start,
    )
