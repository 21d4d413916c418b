"""Orbax checkpoints ⇄ Hugging Face PyTorch folders, and the logits parity check between them.

    source = open_checkpoint("runs/x", step=None)       # newest good step; or MemorySource(cfg, params)
    result = export_hf(source, "hf/x", dtype="bfloat16", tokenizer="tok/")
    report = verify_export(source, "hf/x")               # max |Δlogit| and mean KL, Flax vs transformers
    import_hf("hf/y", "runs/y-init")                      # HF folder -> mixlm checkpoint + model config

llama → `LlamaForCausalLM`, llama with qk-norm → `Qwen3ForCausalLM` (the same math: per-head RMSNorm on q
and k before RoPE), gpt2 → `GPT2LMHeadModel`. The name and layout of every tensor comes from the family's
`hf_name_map` (mixlm.models); vocabulary padding rows are dropped, tied models store no lm_head.

Export streams: a param source hands out one array at a time (from Orbax, a partial restore of that one
array), it is put in HF layout and the output dtype in one copy, and appended to a safetensors file whose
header was written first from the known shapes. Peak memory is the interpreter plus about two copies of
the largest tensor, whatever the model size. Files are written into a hidden sibling folder that is
renamed to OUT_DIR only when complete, so a failed export never leaves a folder that looks finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from mixlm.config import ConfigError, ExperimentConfig, ModelConfig, config_from_dict, save_config
from mixlm.models import family_module, layers, param_counts

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' max_shard_size="5GB"
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
PROVENANCE_FILE = "mixlm_export.json"  # what the folder was made from; `mixlm release` re-renders the card from it
# Files that make up a HF tokenizer (copied verbatim; a model folder's config.json etc. are not).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
)
# HF tensors that carry no learned state (buffers older transformers saved); import ignores them.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


class ExportError(RuntimeError):
    """Export or import cannot go on; the message names the file, the step or the field and what to do."""


# --- param sources ---------------------------------------------------------------------------------------


ParamPath = tuple[str, ...]


class ParamSource(Protocol):
    """Where export reads our params: one array at a time, float32, in our layout (mixlm.models)."""

    cfg: ExperimentConfig
    step: int | None
    meta: dict  # the checkpoint's metadata (tokens seen per domain, versions, ...); {} when unknown
    description: str  # for messages and the model card, e.g. the checkpoint step folder

    def shapes(self) -> dict[ParamPath, tuple[int, ...]]: ...

    def read(self, path: ParamPath) -> np.ndarray: ...


def flatten_params(params: dict, prefix: ParamPath = ()) -> dict[ParamPath, object]:
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(flatten_params(value, prefix + (str(key),)))
        else:
            out[prefix + (str(key),)] = value
    return out


def unflatten_params(flat: dict[ParamPath, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


@dataclasses.dataclass
class MemorySource:
    """Params already in memory (split_params layout; jax or numpy arrays), e.g. `train(cfg).state.params`."""

    cfg: ExperimentConfig
    params: dict
    step: int | None = None
    meta: dict = dataclasses.field(default_factory=dict)
    description: str = "params in memory"

    def __post_init__(self):
        if isinstance(self.cfg, ModelConfig):
            self.cfg = ExperimentConfig(model=self.cfg)
        self._flat = flatten_params(self.params)

    def shapes(self) -> dict[ParamPath, tuple[int, ...]]:
        return {p: tuple(np.shape(a)) for p, a in self._flat.items()}

    def read(self, path: ParamPath) -> np.ndarray:
        return np.asarray(self._flat[path], np.float32)


class OrbaxSource:
    """The params of one checkpoint step (mixlm.checkpoint layout: <step>/state, <step>/meta), restored
    array by array as host numpy arrays, so only the array being read is in memory."""

    def __init__(self, step_dir: Path, cfg: ExperimentConfig, meta: dict, step: int):
        import orbax.checkpoint as ocp
        from etils import epath

        self.step_dir, self.cfg, self.meta, self.step = Path(step_dir), cfg, meta, step
        self.description = str(self.step_dir)
        self._state_dir = epath.Path(self.step_dir) / "state"
        saved = ocp.StandardCheckpointHandler().metadata(self._state_dir)
        tree = getattr(saved, "tree", saved)
        if "params" not in tree:
            raise ExportError(f"{self._state_dir} holds no params (keys: {sorted(tree)})")
        self._shapes = {p: tuple(m.shape) for p, m in flatten_params(dict(tree["params"])).items()}
        self._checkpointer = ocp.PyTreeCheckpointer()

    def shapes(self) -> dict[ParamPath, tuple[int, ...]]:
        return dict(self._shapes)

    def read(self, path: ParamPath) -> np.ndarray:
        import orbax.checkpoint as ocp

        if path not in self._shapes:
            raise KeyError(f"{self._state_dir} has no param {'/'.join(path)}")
        item = {"params": unflatten_params({path: 0})}
        restore_args = {"params": unflatten_params({path: ocp.RestoreArgs(restore_type=np.ndarray)})}
        out = self._checkpointer.restore(
            self._state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        )
        node = out["params"]
        for key in path:
            node = node[key]
        return np.asarray(node, np.float32)


def _step_dirs(checkpoints: Path) -> dict[int, Path]:
    return {int(p.name): p for p in checkpoints.iterdir() if p.name.isdigit() and (p / "state").is_dir()}


def open_checkpoint(path: str | Path, step: int | None = None) -> OrbaxSource:
    """The checkpoint at `path`: a run's output folder (train.output_dir), its checkpoints/ folder, or one
    step folder. `step` picks a step; by default the newest step whose files are complete (a step with
    missing or truncated files is skipped with a warning naming it)."""
    from mixlm import checkpoint

    p = Path(path).absolute()  # Orbax reads absolute paths only
    if not p.is_dir():
        raise ExportError(f"{path}: no such folder; pass a run's output folder (train.output_dir), its "
                          "checkpoints/ folder, or one checkpoint step folder")
    if (p / "state").is_dir() and p.name.isdigit():
        steps = {int(p.name): p}
        where = p.parent
    else:
        where = p / checkpoint.CHECKPOINT_SUBDIR if (p / checkpoint.CHECKPOINT_SUBDIR).is_dir() else p
        steps = _step_dirs(where)
    if not steps:
        raise ExportError(f"{path}: holds no mixlm checkpoint (expected checkpoints/<step>/state/); was the "
                          "run saved (checkpoint.save_at_end / checkpoint.every)?")
    if step is not None:
        if step not in steps:
            raise ExportError(f"{path}: there is no checkpoint step {step}; available steps: "
                              f"{', '.join(map(str, sorted(steps)))}")
        problem = checkpoint.file_problem(_epath(steps[step]))
        if problem:
            raise ExportError(f"checkpoint step {step} ({steps[step]}) is incomplete: {problem}")
        chosen = step
    else:
        chosen = None
        for s in sorted(steps, reverse=True):
            problem = checkpoint.file_problem(_epath(steps[s]))
            if not problem:
                chosen = s
                break
            warnings.warn(f"checkpoint step {s} ({steps[s]}) is incomplete: {problem}; trying the one before",
                          stacklevel=2)
        if chosen is None:
            raise ExportError(f"{where}: no complete checkpoint step (all of {sorted(steps)} have missing or "
                              "truncated files)")
    step_dir = steps[chosen]
    meta = _read_meta(step_dir)
    cfg_dict = meta.get("config")
    if cfg_dict is None:
        run_config = where.parent / "config.yaml"
        if not run_config.is_file():
            raise ExportError(f"{step_dir}: its metadata has no config and there is no {run_config}")
        import yaml

        cfg_dict = yaml.safe_load(run_config.read_text())
    try:
        cfg = config_from_dict(cfg_dict)
    except ConfigError as e:
        raise ExportError(f"{step_dir}: the saved config does not load: {e}") from None
    return OrbaxSource(step_dir, cfg, meta, chosen)


def _epath(p: Path):
    from etils import epath

    return epath.Path(p)


def _read_meta(step_dir: Path) -> dict:
    """The checkpoint's JSON `meta` item ({} when the step has none)."""
    meta_dir = step_dir / "meta"
    if not meta_dir.is_dir():
        return {}
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        return dict(ckptr.restore(_epath(meta_dir)))


# --- the HF side -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HFTensor:
    name: str  # HF state-dict key
    path: ParamPath  # our param
    kind: str  # layout change, see mixlm.models.layers ("copy", "linear", "embedding", "lm_head")
    shape: tuple[int, ...]  # HF shape

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def hf_architecture(cfg: ModelConfig) -> str:
    if cfg.family == "gpt2":
        return "GPT2LMHeadModel"
    return "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"


def unexportable_reason(cfg: ModelConfig) -> str:
    """'' when `cfg` maps exactly onto its transformers class, else why not."""
    if cfg.family == "gpt2" and cfg.num_heads * cfg.dim_per_head != cfg.d_model:
        return (f"GPT2LMHeadModel needs n_embd == n_head * head_dim, but this gpt2 model has "
                f"{cfg.num_heads} heads x head_dim {cfg.dim_per_head} = {cfg.num_heads * cfg.dim_per_head} "
                f"!= d_model {cfg.d_model} (model.head_dim)")
    if cfg.dim_per_head % 2 and cfg.family == "llama":
        return f"RoPE needs an even head_dim, got {cfg.dim_per_head}"
    return ""


def hf_plan(cfg: ModelConfig, shapes: dict[ParamPath, tuple[int, ...]]) -> list[HFTensor]:
    """Every HF tensor of the export, in file order, checked against the source's params."""
    from mixlm.models import abstract_params

    arch = hf_architecture(cfg)
    reason = unexportable_reason(cfg)
    if reason:
        raise ExportError(f"this model cannot be exported to {arch}: {reason}")
    name_map = family_module(cfg).hf_name_map(cfg)
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
    _, expected, _ = abstract_params(cfg)
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


def numpy_dtype(dtype: str) -> np.dtype:
    if dtype not in SAFETENSORS_DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(SAFETENSORS_DTYPES)}, got {dtype!r}")
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def shard_plan(plan: list[HFTensor], itemsize: int, max_shard_bytes: int) -> list[list[HFTensor]]:
    """Consecutive tensors grouped into files of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[HFTensor]] = [[]]
    size = 0
    for t in plan:
        n = t.size * itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def write_safetensors(path: Path, tensors: list[HFTensor], dtype: str,
                      fetch: Callable[[HFTensor], np.ndarray]) -> int:
    """Writes a safetensors file one tensor at a time: the header (8-byte little-endian length, JSON with
    each tensor's dtype, shape and byte range) goes first, then `fetch(t)` for each tensor in order.
    Returns the bytes of tensor data written."""
    itemsize = numpy_dtype(dtype).itemsize
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        n = t.size * itemsize
        header[t.name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            a = fetch(t)
            if a.shape != t.shape or a.dtype != numpy_dtype(dtype) or not a.flags.c_contiguous:
                raise ExportError(f"internal: {t.name} came out {a.shape} {a.dtype}, expected {t.shape} {dtype}")
            f.write(a.reshape(-1).view(np.uint8).data)
            del a
    return offset


def write_weights(plan: list[HFTensor], source: ParamSource, folder: Path, *, dtype: str,
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
    """The transformers config object (LlamaConfig / Qwen3Config / GPT2Config) of an export."""
    import transformers

    arch = hf_architecture(cfg)
    cls = {"GPT2LMHeadModel": transformers.GPT2Config, "Qwen3ForCausalLM": transformers.Qwen3Config,
           "LlamaForCausalLM": transformers.LlamaConfig}[arch]
    kwargs = family_module(cfg).hf_config_kwargs(cfg)
    kwargs["initializer_range"] = cfg.init_std
    if cfg.family == "gpt2" and kwargs.get("n_inner") == 4 * cfg.d_model:
        kwargs["n_inner"] = None  # HF's own spelling of the default 4 x n_embd
    tokens = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    tokens.update({k: v for k, v in (special_tokens or {}).items() if v is not None})
    config = cls(**kwargs, **tokens, architectures=[arch])
    config.dtype = dtype
    return config


# --- tokenizer -------------------------------------------------------------------------------------------


def copy_tokenizer(src: str, dest: Path, *, vocab_size: int) -> dict:
    """Copies a HF tokenizer folder's files (or saves a hub tokenizer) into `dest`, checks that it fits the
    model's vocabulary, and returns its {bos,eos,pad}_token_id."""
    import transformers

    src_path = Path(src)
    if src_path.is_dir():
        files = [src_path / n for n in TOKENIZER_FILES if (src_path / n).is_file()]
        if not files:
            raise ExportError(f"tokenizer {src}: the folder has none of {', '.join(TOKENIZER_FILES[:3])}, ...")
        for f in files:
            shutil.copyfile(f, dest / f.name)
    else:
        try:
            transformers.AutoTokenizer.from_pretrained(src).save_pretrained(dest)
        except Exception as e:  # noqa: BLE001 - offline, unknown name, ...: all need the same advice
            raise ExportError(f"tokenizer {src!r} is not a folder and could not be loaded from the Hub "
                              f"({type(e).__name__}: {str(e)[:200]}); pass --tokenizer FOLDER") from None
    tok = transformers.AutoTokenizer.from_pretrained(dest)
    if len(tok) > vocab_size:
        raise ExportError(f"tokenizer {src} has {len(tok):,} tokens but the model's vocabulary is {vocab_size:,}: "
                          "token ids past the vocabulary would have no embedding; pass the tokenizer it was "
                          "trained with (--tokenizer)")
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


# --- folders written atomically ----------------------------------------------------------------------------


def _staging_dir(out_dir: Path, overwrite: bool) -> Path:
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists; choose another folder or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _commit_dir(tmp: Path, out_dir: Path) -> None:
    """Puts the finished `tmp` in place of `out_dir` (the old one, if any, is removed only after)."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- export --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ExportResult:
    out_dir: Path
    architecture: str
    files: list[str]
    num_params: int  # HF params written (vocabulary cut, tied embedding once)
    weight_bytes: int
    seconds: float


@dataclasses.dataclass
class CardOptions:
    """What the model card needs beyond the checkpoint."""

    name: str = ""  # default: the output folder's name
    license: str = "apache-2.0"
    datasets: list[str] = dataclasses.field(default_factory=list)
    hardware: str = ""
    train_seconds: float | None = None
    eval_results: object = None  # parsed eval JSON (see model_card.eval_scores_from_json)


def tokens_trained(cfg: ExperimentConfig, step: int | None, meta: dict) -> int | None:
    if meta.get("tokens_seen_total"):
        return int(meta["tokens_seen_total"])
    if step is None:
        return None
    return step * cfg.train.global_batch_size * cfg.data.seq_len


def card_info_from_provenance(prov: dict, card: CardOptions):
    """model_card.CardInfo from an export's mixlm_export.json plus the options given now."""
    from mixlm import model_card

    cfg = config_from_dict(prov["config"])
    meta = prov.get("checkpoint_meta", {})
    total, non_embedding = param_counts(cfg.model)
    evals = model_card.eval_scores_from_json(card.eval_results) if card.eval_results is not None else []
    mesh = meta.get("mesh") or {}
    hardware = card.hardware or meta.get("hardware", "") or (
        f"{int(np.prod(list(mesh.values())))} devices, mesh "
        + " x ".join(f"{axis} {size}" for axis, size in mesh.items()) if mesh else "")
    return model_card.CardInfo(
        name=card.name or prov.get("name", ""), cfg=cfg, architecture=prov["architecture"],
        total_params=total, non_embedding_params=non_embedding, dtype=prov["dtype"], step=prov.get("step"),
        tokens_trained=tokens_trained(cfg, prov.get("step"), meta),
        tokens_by_domain={k: int(v) for k, v in (meta.get("tokens_seen") or {}).items()},
        license=card.license, datasets=list(card.datasets), hardware=hardware,
        train_seconds=card.train_seconds or meta.get("train_seconds"), evals=evals, source=prov.get("source", ""),
        mixlm_version=meta.get("mixlm_version", ""), git_commit=meta.get("git_commit", ""),
    )


def read_provenance(folder: str | Path) -> dict:
    path = Path(folder) / PROVENANCE_FILE
    if not path.is_file():
        raise ExportError(f"{folder}: no {PROVENANCE_FILE}; is it a folder written by `mixlm export`?")
    return json.loads(path.read_text())


def render_folder_card(folder: str | Path, card: CardOptions) -> str:
    """The README.md text of an exported folder rendered anew (e.g. with eval scores); writes nothing."""
    from mixlm import model_card

    prov = read_provenance(folder)
    return model_card.render_model_card(card_info_from_provenance(prov, card))


def export_hf(source: ParamSource, out_dir: str | Path, *, dtype: str = "float32", tokenizer: str | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
              card: CardOptions | None = None, log: Callable[[str], None] | None = None) -> ExportResult:
    """Writes a transformers folder for `source`: safetensors weights in `dtype`, config.json,
    generation_config.json, the tokenizer (`tokenizer`, else the run's data.tokenizer), README.md (model card)
    and mixlm_export.json. Atomic: OUT_DIR appears only when everything is written."""
    from mixlm import model_card

    start = time.perf_counter()
    cfg = source.cfg.model
    numpy_dtype(dtype)
    plan = hf_plan(cfg, source.shapes())
    out_dir = Path(out_dir)
    card = card or CardOptions()
    tmp = _staging_dir(out_dir, overwrite)
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
            "architecture": hf_architecture(cfg),
            "dtype": dtype,
            "source": source.description,
            "step": source.step,
            "config": source.cfg.to_dict(),
            "checkpoint_meta": {k: v for k, v in source.meta.items() if k != "config"},
            "tokenizer": tokenizer_src or "",
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str) + "\n")
        info = card_info_from_provenance(provenance, dataclasses.replace(card, name=provenance["name"]))
        (tmp / "README.md").write_text(model_card.render_model_card(info))
        _commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    itemsize = numpy_dtype(dtype).itemsize
    return ExportResult(
        out_dir=out_dir, architecture=hf_architecture(cfg), files=sorted(p.name for p in out_dir.iterdir()),
        num_params=sum(t.size for t in plan), weight_bytes=sum(t.size for t in plan) * itemsize,
        seconds=time.perf_counter() - start,
    )


# --- parity check -------------------------------------------------------------------------------------------


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


def load_params(source: ParamSource, *, round_to: str = "float32", place: Callable | None = None) -> dict:
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
    import jax

    from mixlm.models import abstract_params, merge_params

    embed = params["embed_tokens" if cfg.family == "llama" else "wte"]
    # vocab_multiple = the stored rows makes the model's padded vocabulary equal to what the params have.
    cfg32 = dataclasses.replace(cfg, compute_dtype="float32", vocab_multiple=int(np.shape(embed)[0]))
    graphdef, _, _ = abstract_params(cfg32)

    @jax.jit
    def forward(p, tokens_BxL):
        return merge_params(graphdef, p)(tokens_BxL)[..., : cfg.vocab_size]

    return lambda tokens_BxL: np.asarray(forward(params, tokens_BxL))


def logits_agreement(ours_BxLxV: np.ndarray, theirs_BxLxV: np.ndarray) -> tuple[float, float]:
    """(max |difference|, mean KL(ours || theirs)) computed in float64."""
    a, b = np.asarray(ours_BxLxV, np.float64), np.asarray(theirs_BxLxV, np.float64)
    log_p = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
    log_q = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    return float(np.max(np.abs(a - b))), float(np.mean(kl))


def verify_export(source: ParamSource, out_dir: str | Path, *, batch_size: int = 2, seq_len: int = 64,
                  seed: int = 0, tolerance: float = 1e-4) -> VerifyReport:
    """Runs our Flax model (on the source's params, rounded to the export's dtype) and the exported
    transformers model (float32) on the same random tokens; compares the logits."""
    import jax
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


# --- import --------------------------------------------------------------------------------------------------


def _require(hf: dict, key: str, allowed, where: str, default=None) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise ExportError(f"{where}: {key}={value!r} is not supported by mixlm (supported: {allowed})")


def model_config_from_hf(hf: dict, *, where: str = "config.json", name: str = "") -> ModelConfig:
    """The ModelConfig of a transformers LlamaForCausalLM / Qwen3ForCausalLM / GPT2LMHeadModel config.json;
    anything our models would compute differently at inference is refused with the field's name. Dropout
    is not carried over (mixlm trains without it; its exports say 0.0)."""
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        _require(hf, "activation_function", ("gelu_new",), where, "gelu_new")
        _require(hf, "scale_attn_weights", (True,), where, True)
        _require(hf, "scale_attn_by_inverse_layer_idx", (False,), where, False)
        _require(hf, "reorder_and_upcast_attn", (False,), where, False)
        _require(hf, "add_cross_attention", (False,), where, False)
        d = hf["n_embd"]
        return ModelConfig(
            family="gpt2", name=name, num_layers=hf["n_layer"], d_model=d, num_heads=hf["n_head"],
            mlp_dim=hf.get("n_inner") or 4 * d, vocab_size=hf["vocab_size"], max_seq_len=hf["n_positions"],
            tie_embeddings=hf.get("tie_word_embeddings", True), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            init_std=hf.get("initializer_range", 0.02),
        )
    if model_type not in ("llama", "qwen3"):
        raise ExportError(f"{where}: model_type {model_type!r} cannot be imported; mixlm reads llama "
                          "(LlamaForCausalLM), qwen3 (Qwen3ForCausalLM: llama with qk-norm) and gpt2")
    _require(hf, "hidden_act", ("silu",), where, "silu")
    _require(hf, "attention_bias", (False,), where, False)
    _require(hf, "mlp_bias", (False,), where, False)
    _require(hf, "pretraining_tp", (1,), where, 1)
    if model_type == "qwen3":
        _require(hf, "use_sliding_window", (False,), where, False)
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

    name_map = family_module(cfg).hf_name_map(cfg)
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
    return unflatten_params(flat)


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
    from mixlm import checkpoint
    from mixlm.config import CheckpointConfig, DataConfig

    start = time.perf_counter()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{hf_dir}: not a Hugging Face model folder (no config.json)")
    hf = json.loads(config_path.read_text())
    model_cfg = model_config_from_hf(hf, where=str(config_path), name=hf_dir.name)
    if unexportable_reason(model_cfg):
        raise ExportError(f"{config_path}: {unexportable_reason(model_cfg)}")
    params = read_hf_params(hf_dir, model_cfg)
    tmp = _staging_dir(out_dir, overwrite)
    try:
        tokenizer = ""
        if any((hf_dir / n).is_file() for n in TOKENIZER_FILES):
            (tmp / "tokenizer").mkdir()
            for n in TOKENIZER_FILES:
                if (hf_dir / n).is_file():
                    shutil.copyfile(hf_dir / n, tmp / "tokenizer" / n)
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
        _commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = sum(int(np.size(a)) for a in flatten_params(params).values())
    return ImportResult(out_dir=out_dir, step_dir=out_dir / checkpoint.CHECKPOINT_SUBDIR / "0",
                        model_config=out_dir / "model.yaml", experiment_config=out_dir / "config.yaml",
                        num_params=n, seconds=time.perf_counter() - start)
