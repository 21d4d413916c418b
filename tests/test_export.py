"""Export to transformers and back: tiny trained models load with plain AutoModelForCausalLM and give our
logits (1e-4) and our greedy generations; bf16 + sharded safetensors; --step; HF -> mixlm -> HF is exact;
clear errors and no half-written folders; the model card; release --dry-run."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mixlm.checkpoint import FILE_LIST
from mixlm.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    LoggingConfig,
    ModelConfig,
    TrainConfig,
    load_model_config,
)
from mixlm.errors import ExportError
from mixlm.hf.export import export_hf
from mixlm.hf.param_readers import MemoryReader, open_checkpoint
from mixlm.hf.verify import flax_forward, load_params, verify_export

VOCAB = 300  # the byte-level tokenizer below: 256 bytes + 3 specials + merges
LLAMA = ModelConfig(family="llama", num_layers=2, d_model=64, num_heads=4, mlp_dim=96, vocab_size=VOCAB,
                    max_seq_len=64)
GPT2 = ModelConfig(family="gpt2", num_layers=2, d_model=64, num_heads=4, mlp_dim=256, vocab_size=VOCAB,
                   max_seq_len=64, tie_embeddings=True)
VARIANTS = {
    "llama-untied": (LLAMA, "LlamaForCausalLM"),
    "llama-tied": (dataclasses.replace(LLAMA, tie_embeddings=True), "LlamaForCausalLM"),
    "llama-gqa2-rope500k": (dataclasses.replace(LLAMA, num_kv_heads=2, rope_base=500000.0, norm_eps=1e-6),
                            "LlamaForCausalLM"),
    "llama-qknorm": (dataclasses.replace(LLAMA, num_kv_heads=2, qk_norm=True), "Qwen3ForCausalLM"),
    "gpt2-tied": (GPT2, "GPT2LMHeadModel"),
}
TEXT = "Mixtures of data: the quick brown fox jumps over 13 lazy dogs! ünïcødé ✓"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE (exact round trip of any text) of VOCAB tokens, saved as a HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20, "mixture of data " * 20], trainer)
    path = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(path)
    return path


def experiment(model: ModelConfig, out_dir: Path, tokenizer_dir: Path, *, steps: int = 3) -> ExperimentConfig:
    return ExperimentConfig(
        model=model,
        data=DataConfig(seq_len=32, tokenizer=str(tokenizer_dir)),
        train=TrainConfig(steps=steps, global_batch_size=8, output_dir=str(out_dir)),
        checkpoint=CheckpointConfig(every=1, keep_last=0, async_save=False),
        eval=EvalConfig(batches=0),
        logging=LoggingConfig(tensorboard=False, progress=False, peak_flops=1e9),
    )


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory, tokenizer_dir):
    """variant -> run folder of a tiny model trained 3 steps with mixlm.train (checkpoint every step),
    trained on first use."""
    from mixlm.train import train

    runs: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in runs:
            out = tmp_path_factory.mktemp(name)
            train(experiment(VARIANTS[name][0], out / "run", tokenizer_dir), log_fn=lambda _: None)
            runs[name] = out / "run"
        return runs[name]

    return get


def greedy_flax(cfg: ModelConfig, params: dict, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy decoding with our model: one fixed-shape buffer (later positions cannot change earlier logits,
    by causality), so the forward compiles once."""
    forward = flax_forward(cfg, params)
    buf = np.zeros((1, prompt.shape[1] + new_tokens), np.int32)
    buf[0, : prompt.shape[1]] = prompt[0]
    for t in range(prompt.shape[1], buf.shape[1]):
        buf[0, t] = int(np.argmax(forward(buf)[0, t - 1]))
    return buf[0, prompt.shape[1]:]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_loads_in_transformers_with_our_logits_and_greedy_text(name, trained_runs, tmp_path):
    import torch
    import transformers

    cfg, arch = VARIANTS[name]
    source = open_checkpoint(trained_runs(name))
    assert source.step == 3 and source.cfg.model == cfg
    result = export_hf(source, tmp_path / "hf")
    assert result.architecture == arch
    files = set(os.listdir(tmp_path / "hf"))
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md", "tokenizer.json",
            "tokenizer_config.json"} <= files
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no staging folder left behind
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["architectures"] == [arch] and "auto_map" not in hf_config
    assert hf_config["vocab_size"] == VOCAB  # the padding rows (300 -> 384, sharded over 8) are gone

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(model).__name__ == arch and model.dtype == torch.float32
    params = load_params(source)
    tokens_BxL = np.random.default_rng(0).integers(0, VOCAB, (2, 24))
    ours_BxLxV = flax_forward(cfg, params)(tokens_BxL.astype(np.int32))
    with torch.no_grad():
        theirs_BxLxV = model(torch.from_numpy(tokens_BxL)).logits.numpy()
    np.testing.assert_allclose(ours_BxLxV, theirs_BxLxV, atol=1e-4, rtol=0)

    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = tok("the quick brown", return_tensors="np")["input_ids"]
    ours = greedy_flax(cfg, params, prompt, 20)
    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompt), attention_mask=torch.ones_like(torch.from_numpy(prompt)),
                             max_new_tokens=20, do_sample=False, pad_token_id=tok.eos_token_id)
    theirs = out[0, prompt.shape[1]:].numpy()
    if len(theirs) < 20:  # transformers stops at </s>; ours runs on, so it must have emitted it there too
        assert theirs[-1] == tok.eos_token_id
    np.testing.assert_array_equal(ours[: len(theirs)], theirs)

    report = verify_export(source, tmp_path / "hf")
    assert report.passed and report.max_abs_diff < 1e-4 and report.mean_kl < 1e-8


def test_bfloat16_sharded_export_and_step_choice(trained_runs, tmp_path, capsys):
    import torch
    import transformers
    from safetensors import safe_open

    from mixlm.cli import main

    run = trained_runs("llama-untied")
    assert main(["export", str(run), str(tmp_path / "bf16"), "--dtype", "bfloat16", "--step", "2",
                 "--max-shard-size", "60KB", "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "verify: max |logit diff|" in printed and ": OK" in printed
    folder = tmp_path / "bf16"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"

    # The files hold step 2's params rounded to bfloat16 exactly as torch rounds them.
    source = open_checkpoint(run, step=2)
    assert source.step == 2
    ours = source.read(("layers", "1", "mlp", "down_proj", "kernel"))
    name = "model.layers.1.mlp.down_proj.weight"
    with safe_open(folder / index["weight_map"][name], framework="pt") as f:
        stored = f.get_tensor(name)
    assert stored.dtype == torch.bfloat16 and index["metadata"]["total_size"] == sum(
        (folder / s).stat().st_size for s in shards) - sum(_header_bytes(folder / s) for s in shards)
    torch.testing.assert_close(stored, torch.from_numpy(ours.T.copy()).to(torch.bfloat16), rtol=0, atol=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16
    # step 2 and step 3 are different checkpoints
    assert not np.array_equal(ours, open_checkpoint(run).read(("layers", "1", "mlp", "down_proj", "kernel")))


def _header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_clear_errors_and_no_half_written_folder(trained_runs, tmp_path, capsys):
    from mixlm.cli import main

    run = trained_runs("llama-untied")
    assert main(["export", str(run), str(tmp_path / "x"), "--step", "7"]) == 2
    assert "there is no checkpoint step 7; available steps: 1, 2, 3" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="holds no mixlm checkpoint"):
        open_checkpoint(tmp_path / "empty")
    assert not (tmp_path / "x").exists()

    # A step with a truncated file is skipped (with a warning naming it), or refused when asked for.
    import shutil

    shutil.copytree(run, tmp_path / "copy")
    step3 = tmp_path / "copy" / "checkpoints" / "3"
    victim = max((p for p in (step3 / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:-7])
    with pytest.warns(UserWarning, match=r"checkpoint step 3 .* is incomplete"):
        assert open_checkpoint(tmp_path / "copy").step == 2
    with pytest.raises(ExportError, match="step 3 .* is incomplete"):
        open_checkpoint(tmp_path / "copy", step=3)

    # A gpt2 whose heads x head_dim != d_model trains fine in mixlm but has no GPT2LMHeadModel equivalent.
    odd = dataclasses.replace(GPT2, head_dim=8)
    from flax import nnx

    from mixlm.models import build_model, split_params

    _, params = split_params(build_model(odd, rngs=nnx.Rngs(0)))
    with pytest.raises(ExportError, match=r"cannot be exported to GPT2LMHeadModel.*n_embd == n_head \* head_dim"):
        export_hf(MemoryReader(odd, params), tmp_path / "odd")
    assert not (tmp_path / "odd").exists()

    # A failure halfway through the weights leaves nothing that looks like a model folder.
    source = open_checkpoint(run)
    read, calls = source.read, []

    def failing_read(path):
        calls.append(path)
        if len(calls) == 5:
            raise OSError("disk full (simulated)")
        return read(path)

    source.read = failing_read
    with pytest.raises(OSError, match="simulated"):
        export_hf(source, tmp_path / "half")
    assert not (tmp_path / "half").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    # An existing folder is never overwritten silently.
    (tmp_path / "taken").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export_hf(open_checkpoint(run), tmp_path / "taken")


def test_a_damaged_step_is_one_line_exit_4_and_writes_nothing(trained_runs, tmp_path, capsys):
    """Steps without a file list (a run killed right after the save committed) cannot be checked by their
    bytes: their params are checked against the value sums saved in their meta item, and for NaN/inf. Step 3's
    arrays replaced by step 1's (bytes that restore cleanly into other values), step 2's data files overwritten
    with garbage: each export exits 4 with one line naming the step and what to do, and writes nothing, also
    with --verify (which used to leave a folder behind); the intact unlisted step 1 exports, saying so."""
    from mixlm.cli import main

    run = tmp_path / "copy"
    shutil.copytree(trained_runs("llama-untied"), run)
    root = run / "checkpoints"
    for step in ("1", "2", "3"):
        (root / step / FILE_LIST).unlink()
    shutil.rmtree(root / "3" / "state")
    shutil.copytree(root / "1" / "state", root / "3" / "state")
    rng = np.random.default_rng(0)
    for data_file in (root / "2" / "state").rglob("d/*"):
        data_file.write_bytes(rng.integers(0, 256, data_file.stat().st_size, dtype=np.uint8).tobytes())

    def refused(argv, what: str) -> str:
        capsys.readouterr()
        assert main(argv) == 4
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("mixlm export: checkpoint step "), lines
        assert what in lines[0] and "no file list" in lines[0] and "Export an earlier step with --step N" in lines[0]
        assert not (tmp_path / "hf").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]
        return lines[0]

    line = refused(["export", str(run), str(tmp_path / "hf"), "--verify"], "restores other values than were saved")
    assert f"checkpoint step 3 ({root / '3'}), which has no file list {FILE_LIST} (the run stopped right " in line
    line = refused(["export", str(run), str(tmp_path / "hf"), "--step", "2"], "its files are damaged")
    assert f"checkpoint step 2 ({root / '2'})" in line and "Traceback" not in line, line
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "hf"), "--step", "1", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "(step 1, " in out and "it has no file list" in out and ": OK" in out


def test_a_check_that_fails_leaves_out_dir_as_it_was(tmp_path):
    """export_hf's `check` (the CLI's --verify) runs on the finished hidden folder: when it raises, OUT_DIR is
    not created, or with overwrite the old folder stays as it was."""
    from flax import nnx

    from mixlm.models import build_model, split_params

    _, params = split_params(build_model(LLAMA, rngs=nnx.Rngs(0)))
    checked = []

    def refuse(folder: Path) -> None:
        checked.append(sorted(p.name for p in folder.iterdir()))
        raise ExportError("parity check failed")

    with pytest.raises(ExportError, match="parity check failed"):
        export_hf(MemoryReader(LLAMA, params), tmp_path / "new", check=refuse)
    assert "config.json" in checked[0] and "model.safetensors" in checked[0]  # it saw the whole folder
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("the previous export")
    with pytest.raises(ExportError, match="parity check failed"):
        export_hf(MemoryReader(LLAMA, params), tmp_path / "old", overwrite=True, check=refuse)
    assert os.listdir(tmp_path / "old") == ["keep.txt"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def _hf_source_model(kind: str, folder: Path, tokenizer_dir: Path):
    """A transformers model made by transformers itself (every weight random), saved with our tokenizer."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, **ids)
        model = transformers.LlamaForCausalLM(config)
    elif kind == "qwen3":  # what mixlm's qk-norm llama exports to
        config = transformers.Qwen3Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6,
            tie_word_embeddings=True, **ids)
        model = transformers.Qwen3ForCausalLM(config)
    else:
        # mixlm trains without dropout (exports say 0.0), so the source says so too
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        model = transformers.GPT2LMHeadModel(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gpt2"])
def test_hf_to_mixlm_to_hf_round_trip(kind, tokenizer_dir, tmp_path, capsys):
    import transformers
    from safetensors.numpy import load_file

    from mixlm import checkpoint
    from mixlm.cli import main

    _hf_source_model(kind, tmp_path / "src", tokenizer_dir)
    assert main(["import", str(tmp_path / "src"), str(tmp_path / "mixlm")]) == 0
    assert "checkpoint.init_from" in capsys.readouterr().out
    model_cfg = load_model_config(tmp_path / "mixlm" / "model.yaml")
    assert model_cfg.family == ("gpt2" if kind == "gpt2" else "llama") and model_cfg.vocab_size == VOCAB
    assert model_cfg.qk_norm == (kind == "qwen3")
    if kind == "llama":
        assert (model_cfg.num_kv_heads, model_cfg.rope_base, model_cfg.tie_embeddings) == (2, 500000.0, False)

    # The imported folder is what checkpoint.init_from reads.
    import jax

    from mixlm.models import abstract_params

    _, shapes, _ = abstract_params(model_cfg)
    step_dir = checkpoint.resolve_step_dir(tmp_path / "mixlm")
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=jax.sharding.SingleDeviceSharding(
        jax.devices()[0])), shapes)
    restored = checkpoint.restore_params(step_dir, target, VOCAB)
    assert jax.tree.structure(restored) == jax.tree.structure(shapes)

    assert main(["export", str(tmp_path / "mixlm"), str(tmp_path / "back")]) == 0
    original, back = load_file(tmp_path / "src" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(original) == sorted(back)
    for name in original:
        np.testing.assert_array_equal(original[name], back[name], err_msg=name)
    for file in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "src" / file).read_text()) == json.loads((tmp_path / "back" / file).read_text())
    tok_src = transformers.AutoTokenizer.from_pretrained(tmp_path / "src")
    tok_back = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert tok_back(TEXT)["input_ids"] == tok_src(TEXT)["input_ids"]
    assert tok_back.decode(tok_back(TEXT)["input_ids"]) == TEXT


def test_import_refuses_what_mixlm_cannot_represent(tokenizer_dir, tmp_path, capsys):
    from mixlm.cli import main

    _hf_source_model("llama", tmp_path / "src", tokenizer_dir)
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    assert main(["import", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    assert "RoPE scaling" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["import", str(tokenizer_dir), str(tmp_path / "out")]) == 2
    assert "not a Hugging Face model folder (no config.json)" in capsys.readouterr().err


LM_EVAL_RESULTS = {
    "results": {
        "hellaswag": {"alias": "hellaswag", "acc,none": 0.31, "acc_stderr,none": 0.01, "acc_norm,none": 0.35,
                      "acc_norm_stderr,none": 0.012},
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.42, "acc_stderr,none": 0.02},
    },
    "n-shot": {"hellaswag": 0, "arc_easy": 5},
}


def test_model_card_and_release(tmp_path, tokenizer_dir, capsys, monkeypatch):
    import yaml
    from flax import nnx

    from mixlm.cli import main
    from mixlm.models import build_model, param_counts, split_params

    cfg = ExperimentConfig(
        model=dataclasses.replace(LLAMA, name="card-test"),
        data=DataConfig(seq_len=32, tokenizer=str(tokenizer_dir), mixture={"web": 0.6, "code": 0.3, "books": 0.1}),
        train=TrainConfig(steps=100, global_batch_size=8),
    )
    _, params = split_params(build_model(cfg.model, rngs=nnx.Rngs(0)))
    meta = {"tokens_seen": {"web": 15360, "code": 7680, "books": 2560}, "tokens_seen_total": 25600,
            "mixlm_version": "0.1.0"}
    folder = tmp_path / "card-test"
    export_hf(MemoryReader(cfg, params, step=100, meta=meta), folder)
    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "apache-2.0" and front["library_name"] == "transformers"
    assert front["pipeline_tag"] == "text-generation" and "model-index" not in front
    total = param_counts(cfg.model)[0]
    assert f"| parameters | {total:,} |" in card and "| web | 60.00% | 15,360 (60.0%) |" in card
    assert "Tokens trained: **25,600" in card and "| learning rate | 0.0003 peak, cosine" in card

    results = tmp_path / "results.json"
    results.write_text(json.dumps(LM_EVAL_RESULTS))
    args = ["release", str(folder), "--repo-id", "mixlm-test/card-test", "--eval-results", str(results),
            "--dataset", "cerebras/SlimPajama-627B"]
    assert main(args + ["--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "would upload" in listing and "model.safetensors" in listing and "config.json" in listing
    assert (folder / "README.md").read_text() == card  # a dry run changes nothing

    uploaded = {}

    class FakeApi:  # the real HfApi needs the network; this records what release asks of it
        def create_repo(self, repo_id, **kw):
            uploaded["repo"] = (repo_id, kw)

        def create_commit(self, repo_id, operations, **kw):
            uploaded["files"] = sorted(op.path_in_repo for op in operations)
            return "https://huggingface.co/mixlm-test/card-test/commit/0"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert main(args) == 0
    assert uploaded["repo"][0] == "mixlm-test/card-test"
    assert uploaded["files"] == sorted(os.listdir(folder))
    front = yaml.safe_load((folder / "README.md").read_text().split("---")[1])
    assert front["datasets"] == ["cerebras/SlimPajama-627B"]
    metrics = {(r["dataset"]["name"], m["type"]): m["value"]
               for r in front["model-index"][0]["results"] for m in r["metrics"]}
    assert metrics == {("hellaswag", "acc_norm"): 0.35, ("hellaswag", "acc"): 0.31, ("arc_easy", "acc"): 0.42}
    assert "| arc_easy | acc | 5 | 0.4200 | ± 0.0200 |" in (folder / "README.md").read_text()

    assert main(["release", str(folder), "--repo-id", "not a repo id", "--dry-run"]) == 2
    assert "expected ORG/NAME" in capsys.readouterr().err


def test_more_than_ten_layers_keep_their_order(tmp_path):
    from flax import nnx

    from mixlm.models import build_model, split_params

    cfg = dataclasses.replace(LLAMA, num_layers=12, d_model=32, num_heads=2, mlp_dim=48)
    _, params = split_params(build_model(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    for layer in params["layers"].values():  # distinct norm scales make every layer's position matter
        layer["input_layernorm"]["scale"] = 1.0 + rng.standard_normal(32).astype(np.float32)
    source = MemoryReader(cfg, params)
    export_hf(source, tmp_path / "hf")
    assert verify_export(source, tmp_path / "hf").passed
