"""The seed experiments of configs/experiments/ (issue 18): each loads, trains the published model for the
published number of tokens at the published batch (steps x tokens per step against the totals stated below
with their sources), names its data paths, and has mesh override sets for one 8xH100 host and a TPU v5p-32
slice that pass the batch rules of that mesh (`# mesh 8xH100: ...` / `# mesh v5p-32: ...` header lines, the
same lines the docs quote). regmix-1b-random picks one of 64 RegMix-sampled mixtures by data.mixture_index:
1..64 give 64 distinct valid mixtures, the same ones each time and the same as `mixlm mix sample` writes;
0, 65 or no index is a one-line error. Every `mixlm ...` command in docs/*.md parses with the real CLI, the
configs its train/plan/sweep commands name load with their overrides, and its launch commands dry-run.
Config loading only: nothing is trained."""

import importlib
import re
import shlex
from pathlib import Path

import pytest

from mixlm.cli import COMMANDS, ArgumentParser, main
from mixlm.config import validate_for_mesh
from mixlm.data.mixture import parse_mixture
from mixlm.errors import ConfigError
from mixlm.mixing import random_mixtures as random_mixtures_module
from mixlm.mixing import read_mixture_yaml
from mixlm.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiments"
PILE_17 = sorted(read_mixture_yaml(ROOT / "configs" / "mixtures" / "pile-17-token-prior.yaml"))

# name -> (model, tokens per step, published total tokens, relative tolerance, source of the numbers)
PUBLISHED = {
    "regmix-1m-proxy": ("regmix-1m", 512 * 2048, 1000 * 512 * 2048, 0.0,
                        "sail-sg/regmix synthesize_mixture.py: max_step 1000, batch 512 x 2048; arXiv 2407.01492 §3"),
    "regmix-60m-proxy": ("regmix-60m", 512 * 2048, 1000 * 512 * 2048, 0.0,
                         "arXiv 2407.01492 §4.1: 1M and 60M models each trained on 1B tokens (same recipe)"),
    "regmix-1b-human": ("regmix-1b", 512 * 2048, 25_000 * 512 * 2048, 0.0,
                        "sail-sg/regmix pretrain/tinyllama.py: max_step 25000, batch 512 x 2048; card: 1M x 25B"),
    "regmix-1b-regmix": ("regmix-1b", 512 * 2048, 25_000 * 512 * 2048, 0.0, "as regmix-1b-human (sail/data-mixture-regmix-1b)"),
    "regmix-1b-random": ("regmix-1b", 512 * 2048, 25_000 * 512 * 2048, 0.0, "as regmix-1b-human (sail/data-mixture-random-1b)"),
    "metarater-1.3b-random": ("metarater-1.3b", 4_194_304, 30e9, 1e-3,
                              "opendatalab/meta-rater-1b-random card: 30B tokens, global batch 4,194,304 tokens"),
    "metarater-3.3b-random": ("metarater-3.3b", 4_194_304, 100e9, 1e-3,
                              "opendatalab/meta-rater-3b-random card: 100B tokens, global batch 4,194,304 tokens"),
    "metarater-3.3b-25raters": ("metarater-3.3b", 4_194_304, 100e9, 1e-3,
                                "opendatalab/meta-rater-3b-25raters card: 100B tokens, global batch 4,194,304"),
    "dclm-1b": ("dclm-1b", 2048 * 2048, 2.6e12, 1e-3,
                "TRI-ML/DCLM-1B-v0 card: 2.6T tokens, batch 2048 sequences x 2048 tokens"),
    "gpt2-70m-50-30-20": ("gpt2-70m", 120 * 1024, 1e9, 1e-3,
                          "codelion/gpt-2-70m card: 1B tokens, batch 24 x 1024 x 5 accumulation steps"),
}
# platform -> (devices, process counts the batch must split over): 8xH100 as one process or one per GPU
# (SLURM); a v5p-32 slice is 16 chips (JAX devices) on 4 hosts.
PLATFORMS = {"8xH100": (8, (1, 8)), "v5p-32": (16, (4,))}
# Exact parameter counts the model cards state (total, untied embeddings included).
PUBLISHED_PARAMS = {
    "metarater-1.3b-random": 1_345_423_360,  # opendatalab/meta-rater-1b-random card
    "metarater-3.3b-random": 3_335_989_760,  # opendatalab/meta-rater-3b-random card
    "metarater-3.3b-25raters": 3_335_989_760,  # opendatalab/meta-rater-3b-25raters card
    "gpt2-70m-50-30-20": 64_085_504,  # codelion/gpt-2-70m card: "64.09M trainable"
}


def _hand_count(m) -> int:
    """Parameters by hand (not mixlm's counter): llama = untied embeddings + per layer 4 d^2 attention (MHA),
    3 d x mlp SwiGLU and 2 RMSNorm scales, + the final norm; gpt2 = tied wte + wpe + per layer
    12 d^2 + 13 d (qkv, proj, fc, proj with biases, 2 LayerNorms) + the final LayerNorm."""
    d, n = m.d_model, m.num_layers
    if m.family == "gpt2":
        return m.vocab_size * d + m.max_seq_len * d + n * (4 * d * d + 4 * d + 2 * d * m.mlp_dim + m.mlp_dim + d
                                                           + 4 * d) + 2 * d
    assert m.num_kv_heads in (0, m.num_heads) and not m.tie_embeddings and not m.qk_norm
    return 2 * m.vocab_size * d + n * (4 * d * d + 3 * d * m.mlp_dim + 2 * d) + d


def _load(name: str, overrides=()):
    return load_run_config(EXPERIMENTS / f"{name}.yaml", list(overrides))


def _mesh_overrides(name: str) -> dict[str, list[str]]:
    text = (EXPERIMENTS / f"{name}.yaml").read_text()
    return {m.group(1): m.group(2).split() for m in re.finditer(r"^# mesh (\S+):(.*)$", text, re.MULTILINE)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_seed_config_trains_the_published_model_batch_and_tokens(name):
    model, tokens_per_step, total, rel, source = PUBLISHED[name]
    cfg = _load(name)
    assert cfg.model.name == model
    assert cfg.data.seq_len == cfg.model.max_seq_len  # the published context, every step full
    got_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    assert got_per_step == tokens_per_step, source
    assert cfg.train.steps * got_per_step == pytest.approx(total, rel=rel, abs=0), source
    assert cfg.data.source == "prepared" and cfg.data.prepared_dir and cfg.data.tokenizer  # paths to fill
    assert cfg.train.output_dir == f"runs/{name}"
    if name in PUBLISHED_PARAMS:
        assert _hand_count(cfg.model) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_mesh_override_sets_fit_the_batch_rules_of_8xh100_and_v5p_32(name):
    sets = _mesh_overrides(name)
    assert sorted(sets) == sorted(PLATFORMS), f"{name}.yaml needs a '# mesh PLATFORM: overrides' line for each"
    for platform, (devices, process_counts) in PLATFORMS.items():
        cfg = _load(name, sets[platform])
        axes = {a: getattr(cfg.mesh, a) for a in ("data", "fsdp", "tensor")}
        fixed = 1
        for size in axes.values():
            fixed *= size if size != -1 else 1
        axes = {a: (devices // fixed if s == -1 else s) for a, s in axes.items()}
        assert axes["data"] * axes["fsdp"] * axes["tensor"] == devices, (platform, axes)
        for processes in process_counts:
            validate_for_mesh(cfg, axes["data"] * axes["fsdp"], processes)


def test_every_experiment_file_loads():
    for path in sorted(EXPERIMENTS.glob("*.yaml")):
        _load(path.stem)


@pytest.fixture(scope="module")
def random_mixtures():
    return [_load("regmix-1b-random", [f"data.mixture_index={i}"]).data.mixture for i in range(1, 65)]


def test_regmix_1b_random_index_gives_64_distinct_valid_mixtures(random_mixtures):
    assert len({tuple(sorted(m.items())) for m in random_mixtures}) == 64
    for mixture in random_mixtures:
        parsed = parse_mixture(mixture, known_domains=PILE_17)  # known domains, weights >= 0, sum 1
        weights = parsed.weights_at(0)
        assert sum(weights.values()) == pytest.approx(1.0)
        assert all(round(w * 5000) == pytest.approx(w * 5000, abs=1e-6) for w in mixture.values())  # 2e-4 grid
        assert sum(mixture.values()) == pytest.approx(1.0, abs=1e-9)
    # the Pile-CC share spans the simplex (RegMix's strengths 0.1..5 give corners and middles)
    pile_cc = [m.get("pile_cc", 0.0) for m in random_mixtures]
    assert min(pile_cc) < 0.05 and max(pile_cc) > 0.5


def test_regmix_1b_random_is_reproducible_and_is_what_mix_sample_writes(random_mixtures, tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.setattr(random_mixtures_module, "_DRAWN", {})  # a fresh draw, not this process's cached one
    assert _load("regmix-1b-random", ["data.mixture_index=17"]).data.mixture == random_mixtures[16]
    prior = ROOT / "configs" / "mixtures" / "pile-17-token-prior.yaml"
    assert main(["mix", "sample", "--prior", str(prior), "-n", "64", "--seed", "42", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    written = [read_mixture_yaml(tmp_path / f"mixture_{i:04d}.yaml") for i in range(1, 65)]
    assert written == random_mixtures


@pytest.mark.parametrize("overrides, message", [
    (["data.mixture_index=0"], "choose one with data.mixture_index=1..64 (got 0)"),
    (["data.mixture_index=65"], "choose one with data.mixture_index=1..64 (got 65)"),
    (["data.mixture_index=-1"], "data.mixture_index=-1 is out of range: must be >= 0"),  # by its bound, first
    (["data.mixture_index=two"], "data.mixture_index: expected int, got 'two'"),
])
def test_regmix_1b_random_without_a_valid_index_is_a_one_line_error(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_run_config(EXPERIMENTS / "regmix-1b-random.yaml", overrides)
    assert message in str(e.value)
    assert "random/pile-17-1b.yaml" in str(e.value) or "override 'data.mixture_index=" in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_the_file_trains_mixture_1_and_the_spec_alone_needs_an_index(random_mixtures):
    assert _load("regmix-1b-random").data.mixture == random_mixtures[0]  # like the card's model-index-1
    spec = f"data.mixture={ROOT / 'configs' / 'mixtures' / 'random' / 'pile-17-1b.yaml'}"
    with pytest.raises(ConfigError, match=r"choose one with data.mixture_index=1..64 \(got 0\)"):
        load_run_config(EXPERIMENTS / "regmix-1b-human.yaml", [spec])
    assert load_run_config(EXPERIMENTS / "regmix-1b-human.yaml", [spec, "data.mixture_index=64"]).data.mixture == \
        random_mixtures[63]
    # a sweep over this file replaces data.mixture: the file's index no longer names the mixture, so it is 0
    replaced = _load("regmix-1b-random", [f"data.mixture={ROOT / 'configs' / 'mixtures' / 'pile-17-human.yaml'}"])
    assert replaced.data.mixture_index == 0 and replaced.data.mixture["pile_cc"] == 0.1121


def test_an_index_for_an_ordinary_mixture_is_refused_and_the_cli_exits_2(capsys):
    with pytest.raises(ConfigError, match="data.mixture_index picks one mixture of a `random:` spec"):
        load_run_config(EXPERIMENTS / "regmix-1b-human.yaml", ["data.mixture_index=3"])
    assert main(["train", str(EXPERIMENTS / "regmix-1b-random.yaml"), "data.mixture_index=65"]) == 2
    err = capsys.readouterr().err
    assert "data.mixture_index=1..64 (got 65)" in err and len(err.strip().splitlines()) == 1


def test_a_spec_with_an_unknown_key_or_a_missing_prior_names_it(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("random: {prior: nowhere.yaml, count: 4, seed: 0}\n")
    with pytest.raises(ConfigError, match=r"spec.yaml': random.prior: prior .*/nowhere.yaml: no such file"):
        load_run_config(None, [f"data.mixture={spec}", "data.mixture_index=1"])
    spec.write_text("random: {prior: {a: 1, b: 3}, count: 4, seed: 0, temprature: 1}\n")
    with pytest.raises(ConfigError, match="random.temprature is not a spec key"):
        load_run_config(None, [f"data.mixture={spec}", "data.mixture_index=1"])
    spec.write_text("random: {prior: {a: 1, b: 3}, count: 3, seed: 0}\n")
    picked = load_run_config(None, [f"data.mixture={spec}", "data.mixture_index=3"]).data
    assert picked.mixture_index == 3 and set(picked.mixture) <= {"a", "b"}


DOCS = ROOT / "docs"


def _doc_commands() -> list[tuple[str, list[str]]]:
    """(page, argv after `mixlm`) for every `mixlm ...` line of a fenced block in docs/*.md (backslash
    continuations joined, `# comments` dropped)."""
    found = []
    for page in sorted(DOCS.glob("*.md")):
        in_block, pending = False, ""
        for line in page.read_text().splitlines():
            if line.startswith("```"):
                in_block, pending = not in_block, ""
                continue
            if not in_block:
                continue
            pending += line.rstrip("\\") + " " if line.endswith("\\") else line
            if line.endswith("\\"):
                continue
            words, pending = shlex.split(pending, comments=True), ""
            if words[:1] == ["mixlm"]:
                found.append((page.name, words[1:]))
    return found


def _loadable(overrides: list[str]) -> list[str]:
    # a mixture file the page has the reader write first (mix optimize --out) does not exist here
    return [o for o in overrides if not (o.startswith("data.mixture=") and not (ROOT / o.split("=", 1)[1]).exists())]


def test_every_command_in_the_docs_parses_and_its_configs_load(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    commands = _doc_commands()
    assert {page for page, _ in commands} >= {"regmix.md", "metarater.md", "dclm.md", "gpt2-mix.md",
                                              "your-own-mixture-study.md"}
    for page, argv in commands:
        where = f"{page}: mixlm {shlex.join(argv)}"
        verb = argv[0]
        assert verb in COMMANDS, where
        if verb == "launch":
            assert main(["launch", argv[1], "--dry-run", *argv[2:]]) == 0, (where, capsys.readouterr().err)
            capsys.readouterr()
            inner = argv[argv.index("--") + 1:]
            if inner[0] == "train":
                load_run_config(inner[1], _loadable(inner[2:]))
            continue
        module = importlib.import_module(f"mixlm.commands.{COMMANDS[verb][0]}")
        parser = ArgumentParser(prog=f"mixlm {verb}")
        module.add_arguments(parser)
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{where}: {capsys.readouterr().err}")
        if verb in ("train", "plan", "sweep"):
            load_run_config(args.config, _loadable(args.overrides))
