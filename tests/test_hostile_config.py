"""Hostile configs (issue 24): YAML alias bombs, recursive aliases, integers no counter can hold, batches and
models no host or device can hold, wrong list entries, symlink loops. Each ends in one line and exit 2 before
anything is allocated or written. Cases that would allocate without the fix run in a child process with an
address-space limit and a timeout, so a regression fails the test, not the host."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest
import yaml
from conftest import xla_flags

from mixlm.cli import main
from mixlm.config import ModelConfig, load_config, load_yaml, validate_for_mesh
from mixlm.config.load import YAML_VALUE_LIMIT
from mixlm.config.validate import min_param_count
from mixlm.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "model": {"family": "llama", "num_layers": 1, "d_model": 32, "num_heads": 4, "mlp_dim": 64,
              "vocab_size": 200, "max_seq_len": 16, "vocab_multiple": 8},
    "data": {"seq_len": 16},
    "train": {"steps": 2, "global_batch_size": 8},
    "eval": {"batches": 0},
    "logging": {"progress": False, "tensorboard": False, "peak_flops": 1e9},
}
CHILD_MEMORY = 4 << 30  # address space of a child: jax imports in it; an absurd allocation does not


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def alias_bomb(levels: int, fan: int = 9) -> str:
    """A YAML list whose last entry is `fan`**levels strings through nested aliases (the billion laughs)."""
    lines = ["    - &l0 [" + ", ".join(["lol"] * fan) + "]"]
    lines += [f"    - &l{i} [" + ", ".join([f"*l{i - 1}"] * fan) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def run_isolated(code: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Python `code` in a child limited to CHILD_MEMORY of address space and `timeout` seconds."""
    prelude = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({CHILD_MEMORY}, {CHILD_MEMORY}))\n"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(8), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO, check=False)


def cli_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


# --- alias bombs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,levels", [("domains", 9), ("tasks", 7)])
def test_an_alias_bomb_is_refused_at_load_in_one_line(tmp_path, field, levels):
    """The issue's files: 9 levels in eval.domains (a MemoryError after 110 s), 7 in eval.tasks (a 161 MB
    config.yaml, then an AttributeError). `mixlm train` must refuse both before it writes anything."""
    path = tmp_path / "bomb.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in TINY.items() if k != "eval"}) + f"eval:\n  {field}:\n"
                    + alias_bomb(levels))
    assert path.stat().st_size < 1500  # a kilobyte of YAML
    out = tmp_path / "run"
    proc = run_isolated(f"""
        import sys
        from mixlm.cli import main
        sys.exit(main(["train", {str(path)!r}, "train.output_dir={out}"]))
    """)
    lines = cli_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"mixlm train: config error: {path}: refused: more than {YAML_VALUE_LIMIT:,} values")
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "&l5" in text)  # 9**6 + ... values
    assert f"(the value at line {line} alone holds 597,871)" in lines[0] and "aliases" in lines[0]
    assert not out.exists()


def test_a_merge_key_bomb_and_an_override_bomb_are_refused():
    merge = "l0: &l0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8, i: 9}\n" + "".join(
        f"l{i}: &l{i} {{<<: [{', '.join([f'*l{i - 1}'] * 9)}]}}\n" for i in range(1, 10))
    proc = run_isolated(f"""
        from mixlm.config import load_yaml
        from mixlm.errors import ConfigError
        try:
            load_yaml({merge!r}, "merge.yaml")
        except ConfigError as e:
            print(e)
    """)  # PyYAML flattens merge keys itself: 9 levels of 9 are ~10^9 pairs before any mixlm code runs
    assert proc.returncode == 0 and proc.stdout.startswith("merge.yaml: refused: more than 100,000 values"), \
        proc.stderr[-2000:]
    nested = "[&a [x, x, x, x, x, x, x, x, x, x]" + "".join(
        f", &{c} [{', '.join([f'*{p}'] * 10)}]" for p, c in zip("abcde", "bcdef")) + "]"
    with pytest.raises(ConfigError, match=r"^override 'eval.domains=\[&a .*: value: refused: more than 100,000"):
        load_config(None, [f"eval.domains={nested}"])


def test_recursive_aliases_and_deep_nesting_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"^f.yaml: refused: the alias \*a at line 2 sits inside the value"):
        load_yaml("x: 1\na: &a [1, *a]\n", "f.yaml")
    with pytest.raises(ConfigError, match=r"^f.yaml: refused: values nested too deeply to parse"):
        load_yaml("a: " + "[" * 3000 + "]" * 3000, "f.yaml")
    with pytest.raises(ConfigError, match=r"^f.yaml: not valid YAML: while parsing") as e:
        load_yaml("a: [1", "f.yaml")
    assert "\n" not in str(e.value)
    # Aliases within the bound still work (a shared default written once).
    assert load_yaml("d: &d [a, b]\ne: *d\nm: {<<: {x: 1}, y: 2}\n", "f.yaml") == {
        "d": ["a", "b"], "e": ["a", "b"], "m": {"x": 1, "y": 2}}


# --- list fields --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("eval.tasks=[[hellaswag, piqa]]",
     r"eval.tasks\[0\]: expected an lm-eval task or tag name \(a string\), got \['hellaswag', 'piqa'\]"),
    ("eval.tasks=[arc_easy, {task: piqa}]", r"eval.tasks\[1\]: expected an lm-eval task .* got \{'task': 'piqa'\}"),
    ("eval.domains=[target, 3]", r"eval.domains\[1\]: expected a prepared domain name \(a string\), got 3"),
    ("eval.domains=[[a]]", r"eval.domains\[0\]: expected a prepared domain name"),
])
def test_list_entries_of_the_wrong_kind_are_refused(tiny, tmp_path, capsys, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(tiny, [override])
    out = tmp_path / "run"
    assert main(["train", str(tiny), override, f"train.output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mixlm train: config error: override {override!r}: ") and err.count("\n") == 1
    assert not out.exists()


def test_the_live_eval_suite_refuses_task_entries_that_are_not_names():
    from mixlm.errors import EvalError
    from mixlm.eval.suites import adhoc_suite

    with pytest.raises(EvalError, match=r"^tasks: expected lm-eval task names \(strings\), got \['a', 'b'\]"):
        adhoc_suite(["piqa", ["a", "b"]])  # was AttributeError: 'list' object has no attribute 'strip'
    assert [t.task for t in adhoc_suite(["piqa", " arc_easy "]).tasks] == ["piqa", "arc_easy"]


def test_a_long_wrong_value_is_cut_in_the_message(tiny):
    with pytest.raises(ConfigError) as e:
        load_config(tiny, ["train.steps=[" + ", ".join(["1"] * 5000) + "]"])
    assert len(str(e.value)) < 500 and "(15,000 characters)" in str(e.value)  # not 30 KB of one line


# --- integers no counter holds, sizes no host holds ---------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("train.steps=99999999999999999999",
     r"train.steps=99999999999999999999 is out of range: must be in \[1, 2147483647\] \(the number of optimizer"),
    ("model.vocab_size=10000000000",
     r"model.vocab_size=10000000000 is out of range: must be in \[1, 2147483647\] \(token ids are int32\)"),
    ("schedule.warmup_steps=4294967296", r"schedule.warmup_steps=4294967296 is out of range"),
    ("train.seed=4294967296", r"train.seed=4294967296 is out of range: must be in \[0, 4294967295\] \(jax.random"),
    ("data.seed=-1", r"data.seed=-1 is out of range: must be in \[0, 9223372036854775807\] \(numpy seeds"),
    ("checkpoint.every=99999999999999999999", r"checkpoint.every=99999999999999999999 is out of range: must fit"),
])
def test_integers_beyond_what_their_counter_holds_are_refused(tiny, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(tiny, [override])


def test_a_mixture_stage_beyond_the_step_counter_is_refused():
    from mixlm.data.mixture import parse_mixture

    # was accepted here, then an OverflowError in the sampler's int64 stage starts
    with pytest.raises(ConfigError, match=r"data.mixture.stages\[0\].step: expected an integer in \[0, 2147483647\]"):
        parse_mixture({"weights": {"a": 1}, "stages": [{"step": 10**20, "weights": {"a": 2, "b": 1}}]})
    assert parse_mixture({"weights": {"a": 1}, "stages": [{"step": 2**31 - 1, "weights": {"a": 1}}]})


def test_jax_keeps_32_bits_of_a_seed():
    """Why train.seed stops at 2**32 - 1: a larger seed gives the key of a smaller one."""
    assert (jax.random.key_data(jax.random.key(2**32 + 7)) == jax.random.key_data(jax.random.key(7))).all()


def test_batch_and_model_beyond_the_host_and_devices_are_refused_with_the_numbers():
    cfg = load_config(None, ["train.global_batch_size=1048576", "data.seq_len=16", "model.max_seq_len=16"])
    # 2**20 rows x 16 tokens x 12 bytes (int32 inputs and targets, float32 loss mask) = 192 MiB on one host
    with pytest.raises(ConfigError, match=r"train.global_batch_size=1048576 x data.seq_len=16 is 16,777,216 tokens "
                                          r"per step on each of the 1 host\(s\): 0.2 GiB .* more than the host's "
                                          r"0.1 GiB"):
        validate_for_mesh(cfg, 8, 1, host_memory_bytes=100 << 20)
    validate_for_mesh(cfg, 8, 4, host_memory_bytes=100 << 20)  # 48 MiB on each of 4 hosts
    validate_for_mesh(cfg, 8, 1, host_memory_bytes=0)  # 0: not checked (mixlm plan sizes other machines)

    tiny = ModelConfig(num_layers=1, d_model=32, num_heads=4, mlp_dim=64, vocab_size=200)
    # embedding + LM head 2 x 200 x 32; q, k, v, o 4 x 32 x 32; two MLP matrices 2 x 32 x 64
    assert min_param_count(tiny) == (12_800, 8_192)
    cfg = load_config(None).replace(model=tiny)
    state = (12_800 + 8_192) * 16  # fp32 params and gradients, AdamW mu and nu
    with pytest.raises(ConfigError, match=r"the model has at least 20,992 parameters \(12,800 in the embedding: "
                                          r"model.vocab_size=200 x model.d_model=32 x 2 \(untied\); 8,192 in "
                                          r"model.num_layers=1 blocks\) and training holds 16 bytes of each"):
        validate_for_mesh(cfg, 8, 1, host_memory_bytes=state - 1, devices=jax.devices())
    validate_for_mesh(cfg, 8, 1, host_memory_bytes=state, devices=jax.devices())  # 8 CPU devices share one host
    bf16 = cfg.replace(optimizer=dataclasses.replace(cfg.optimizer, moments_dtype="bfloat16"))
    validate_for_mesh(bf16, 8, 1, host_memory_bytes=(12_800 + 8_192) * 14, devices=jax.devices())


def test_the_lower_bound_on_parameters_is_below_the_exact_count_of_every_family():
    from mixlm.model_families import family_names
    from mixlm.models import param_counts

    for family in family_names():
        for tied in (False, True):
            for kv_heads in (0, 2) if family != "gpt2" else (0,):  # MHA, GQA
                model = ModelConfig(family=family, num_layers=3, d_model=64, num_heads=4, num_kv_heads=kv_heads,
                                    mlp_dim=96, vocab_size=300, tie_embeddings=tied)
                exact = param_counts(model)[0]
                assert 0.6 * exact <= sum(min_param_count(model)) <= exact, (family, tied, kv_heads)


def test_absurd_sizes_through_the_cli_are_one_line_exit_2_and_write_nothing(tiny, tmp_path):
    """The issue's runs: steps 10^20 (an OverflowError), a batch of 10^9 rows (OOM-killed at 24 GB), vocab 10^10
    (a hang in open_run), and a vocabulary within int32 whose embedding no host holds."""
    cases = {
        "steps": ["train.steps=99999999999999999999"],
        "batch": ["train.global_batch_size=1000000000", "data.seq_len=4096", "model.max_seq_len=4096"],
        "vocab": ["model.vocab_size=10000000000"],
        "embedding": ["model.vocab_size=2147483647", "model.d_model=65536", "model.num_heads=64"],
    }
    proc = run_isolated(f"""
        import contextlib, io, json
        from mixlm.cli import main
        out = {{}}
        for name, overrides in {cases!r}.items():
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = main(["train", {str(tiny)!r}, *overrides, "train.output_dir={tmp_path}/" + name])
            out[name] = [rc, err.getvalue()]
        print(json.dumps(out))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (rc, err) in results.items():
        assert rc == 2 and err.startswith("mixlm train: config error: ") and err.count("\n") == 1, (name, err)
        assert not (tmp_path / name).exists()
    assert "train.steps=99999999999999999999 is out of range" in results["steps"][1]
    assert "4,096,000,000,000 tokens per step on each of the 1 host(s): 45,776.4 GiB" in results["batch"][1]
    assert "model.vocab_size=10000000000 is out of range" in results["vocab"][1]
    assert "parameters (281,474,976,579,584 in the embedding: model.vocab_size=2147483647 x model.d_model=65536 x 2 " \
           "(untied)" in results["embedding"][1]


# --- symlink loops ------------------------------------------------------------------------------------------
def test_a_symlink_loop_as_config_or_base_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "a.yaml").symlink_to(tmp_path / "b.yaml")
    (tmp_path / "b.yaml").symlink_to(tmp_path / "a.yaml")
    with_base = tmp_path / "exp.yaml"
    with_base.write_text(yaml.safe_dump({"base": "a.yaml", **TINY}))
    section = tmp_path / "section.yaml"
    section.write_text(yaml.safe_dump({**TINY, "model": "a.yaml"}))
    for config, named_by in ((tmp_path / "a.yaml", ""), (with_base, f" (`base:` in {with_base})"),
                             (section, f" (section 'model' in {section})")):
        assert main(["train", str(config), f"train.output_dir={tmp_path / 'run'}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"mixlm train: config error: {tmp_path / 'a.yaml'}") and err.count("\n") == 1, err
        if sys.version_info < (3, 13):  # 3.13's resolve() leaves the loop to open(): "cannot read the config file"
            assert err.startswith(f"mixlm train: config error: {tmp_path / 'a.yaml'}{named_by}: cannot follow "
                                  "the path (Symlink loop from "), err
    assert main(["params", str(tmp_path / "a.yaml")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_unreadable_config_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"is a folder; give the path of a YAML file"):
        load_config(tmp_path)
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=r"bin.yaml: not UTF-8 text"):
        load_config(tmp_path / "bin.yaml")
    (tmp_path / "base.yaml").write_text("base: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"`base:` must be a file path or a list of them, got \[1, 2\]"):
        load_config(tmp_path / "base.yaml")
