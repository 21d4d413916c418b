"""The real train step compiled by the TPU compiler (libtpu) for compile-only TPU topologies, at small shapes:
memory against a hand count, the blind-spot corrections of the compiler's estimate, the features that must
compile (splash with GQA and qk-norm, remat, scan, grad accumulation, tensor parallelism with the vocabulary
sharded, gpt2, a swarm step, a topology over 2 hosts), and `mixlm plan --compile-for` through the CLI."""

import importlib.util
import json
import os

import jax
import pytest
import yaml

from mixlm.cli import main
from mixlm.compiled.step import compile_swarm_step, compile_train_step
from mixlm.compiled.targets import compile_only_devices, resolve_target, tpu_compiler_dir
from mixlm.config import load_config

TPU_COMPILER = importlib.util.find_spec("libtpu") is not None or (tpu_compiler_dir() / "libtpu").is_dir()
pytestmark = pytest.mark.skipif(not TPU_COMPILER, reason=f"needs the TPU compiler in {tpu_compiler_dir()} (make "
                                                         "test installs libtpu there)")

# 2 layers, d 256, 4 heads, MLP 512, vocab 1024, 16 x 256 tokens: each compile takes seconds
L, D, H, F, V, B, S = 2, 256, 4, 512, 1024, 16, 256
SMALL = [f"model.num_layers={L}", f"model.d_model={D}", f"model.num_heads={H}", "model.num_kv_heads=0",
         f"model.mlp_dim={F}", f"model.vocab_size={V}", f"model.max_seq_len={S}", f"data.seq_len={S}",
         f"train.global_batch_size={B}", "model.compute_dtype=bfloat16", "model.attention=splash",
         "mesh.fsdp=-1", "mesh.data=1", "mesh.tensor=1"]


@pytest.fixture(autouse=True)
def default_matmul_precision():
    """What a run (and `mixlm plan`) compiles with. conftest's process-wide 'highest', meant for CPU numerics,
    would ask Mosaic for a bf16 matmul at fp32 contract precision inside splash, which it refuses."""
    with jax.default_matmul_precision("default"):
        yield


def small(*overrides: str):
    return load_config("configs/experiments/regmix-proxy.yaml", SMALL + list(overrides))


@pytest.fixture(scope="module")
def v5p_16():
    """8 v5p chips on 2 hosts (topology v5p:2x2x2)."""
    target = resolve_target("v5p-16")
    assert (target.chips, target.hosts, target.topology) == (8, 2, "v5p:2x2x2")
    devices = compile_only_devices(target)
    assert len(devices) == 8 and len({d.process_index for d in devices}) == 2
    return devices


@pytest.fixture(scope="module")
def v5p_8():
    devices = compile_only_devices(resolve_target("v5p-8"))
    # libtpu's start-up hints are put back: left set, this process and its workers would look like a TPU VM
    assert "TPU_ACCELERATOR_TYPE" not in os.environ and "TPU_WORKER_HOSTNAMES" not in os.environ
    return devices


def test_llama_with_splash_remat_scan_and_accumulation_compiles_on_2_hosts(v5p_16):
    """Argument bytes = fp32 param shards + AdamW's two moments (+ its int32 counter) + the batch shards, with
    the TPU's tile padding of the few small arrays (step counters, norm scales) on top."""
    step = compile_train_step(small("model.remat=full", "model.scan_layers=true", "train.grad_accum_steps=2"),
                              v5p_16)
    m = step.memory
    matrices = V * D + L * (4 * D * D + 3 * D * F) + D * V  # embedding, blocks, LM head: D split by fsdp 8
    norms = (2 * L + 1) * D  # replicated
    params = 4 * (matrices // 8 + norms)
    assert m.params == params
    assert m.optimizer == 2 * params + 8  # mu, nu and two int32 step counts (adam, the schedule)
    assert m.batch == 3 * 4 * B * S // 8  # inputs, targets int32, loss_mask float32, rows split 8 ways
    assert 0 <= m.arguments - (m.params + m.optimizer + m.batch) <= 4096
    assert m.aliased >= m.params + m.optimizer  # the new state is written over the donated one
    assert m.temp > 0
    est = step.estimate
    assert est.counts_whole and est.layers == L and est.micro_batches == 2
    assert est.layer_seconds > 0 and est.layer_flops > 0
    # splash's flops, which the compiler counts as 0: causal attention forward + backward, 6 x seq x layers x
    # heads x head_dim per token, over the 8 chips
    assert est.kernel_flops == pytest.approx(6 * S * L * H * (D // H) * B * S / 8)
    assert est.corrected_seconds > est.seconds  # the step's own count has one layer of one micro-batch


def test_scanned_and_unrolled_give_the_same_corrected_flops(v5p_8):
    """The cost model counts a loop body once; the jaxpr correction puts back (trip count - 1) bodies. xla
    attention, so no kernel hides flops: scanned + correction must match the unrolled program's count."""
    unrolled = compile_train_step(small("model.attention=xla", "model.num_layers=4"), v5p_8).estimate
    scanned = compile_train_step(small("model.attention=xla", "model.num_layers=4", "model.scan_layers=true"),
                                 v5p_8).estimate
    assert unrolled.as_run == pytest.approx(unrolled.as_compiled_flops, rel=0.02)  # jaxpr count = XLA's
    assert scanned.as_compiled_flops < 0.5 * unrolled.as_compiled_flops  # the blind spot: 1 of 4 layers
    assert scanned.corrected_flops == pytest.approx(unrolled.as_compiled_flops, rel=0.02)
    # both timed on the same 1- and 2-layer programs: base + 4 layers
    assert scanned.corrected_seconds == pytest.approx(unrolled.corrected_seconds)
    assert unrolled.corrected_seconds == pytest.approx(unrolled.base_seconds + 4 * unrolled.layer_seconds)
    # the unrolled step's own time, which its count sees whole, agrees with the time put together
    assert unrolled.corrected_seconds == pytest.approx(unrolled.seconds, rel=0.1)


def test_the_analytic_plan_grows_per_scanned_layer_as_the_compilers_peak(v5p_8):
    """The TPU compiler's memory analysis (the temp it refuses a program by) counts a scan's stacked block inputs
    twice; mixlm.plan counts them so. remat=full, where the stack is most of what a layer adds: 4 more layers add
    as much to the analytic total as to the compiled peak (without the second copy: ~0.8 of it)."""
    from mixlm.plan import make_plan

    def peak_and_analytic(layers: int) -> tuple[int, int]:
        cfg = small("model.remat=full", "model.scan_layers=true", f"model.num_layers={layers}", "data.seq_len=1024",
                    "model.max_seq_len=1024", "train.global_batch_size=64")
        step = compile_train_step(cfg, v5p_8, estimate=False)
        return step.memory.peak, make_plan(cfg, devices=v5p_8, device_kind_name="v5p", compile=False).analytic.total

    (compiled2, analytic2), (compiled6, analytic6) = peak_and_analytic(2), peak_and_analytic(6)
    stacked = 4 * 2 * D * (64 * 1024 // 8)  # 4 layers' bf16 block inputs, the tokens of one chip
    assert compiled6 - compiled2 > 3 * stacked  # the stack twice, and the layers' params, grads and moments
    assert analytic6 - analytic2 == pytest.approx(compiled6 - compiled2, rel=0.1)


@pytest.mark.parametrize("variant", [
    ("model.num_kv_heads=1", "model.qk_norm=true"),  # splash with MQA, qk-norm
    ("mesh.tensor=2", "model.num_kv_heads=2"),  # heads, MLP and the vocabulary split over tensor
])
def test_llama_variants_compile(v5p_8, variant):
    assert compile_train_step(small(*variant), v5p_8, estimate=False).memory.temp > 0


def test_gpt2_with_accumulation_compiles(v5p_8):
    cfg = load_config("configs/experiments/gpt2-70m.yaml", [
        "model.num_layers=2", "model.d_model=256", "model.num_heads=4", "model.mlp_dim=1024",
        "model.vocab_size=1024", "model.max_seq_len=256", "data.seq_len=256", "train.global_batch_size=16",
        "train.grad_accum_steps=2", "model.attention=splash"])
    assert compile_train_step(cfg, v5p_8, estimate=False).memory.temp > 0


def test_swarm_step_compiles_one_member_per_chip(v5p_8):
    """4 members over the 4 chips' `data` axis (vmap of the member step), each micro-batched in 2."""
    step = compile_swarm_step(small("train.grad_accum_steps=2"), 4, v5p_8, estimate=False)
    # each chip holds its member's whole state, as one proxy on one chip does: every fp32 parameter, unsplit
    matrices = V * D + L * (4 * D * D + 3 * D * F) + D * V
    assert step.memory.params == 4 * (matrices + (2 * L + 1) * D)
    assert step.tokens_per_step == 4 * B * S


def test_plan_compile_for_through_the_cli(tmp_path, capsys, monkeypatch):
    import mixlm.compiled.plan

    # the text form is the same report rendered: compile once for both calls
    reports = {}
    compile_once = mixlm.compiled.plan.compile_plan

    def compile_plan(cfg, target, **kwargs):
        if target not in reports:
            reports[target] = compile_once(cfg, target, **kwargs)
        return reports[target]

    monkeypatch.setattr(mixlm.compiled.plan, "compile_plan", compile_plan)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"family": "llama", "num_layers": L, "d_model": D, "num_heads": H, "mlp_dim": F,
                  "vocab_size": V, "max_seq_len": S, "compute_dtype": "bfloat16"},
        "data": {"seq_len": S}, "train": {"global_batch_size": B, "steps": 1000}}))
    assert main(["plan", str(path), "--compile-for", "v5p-8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["target"]["chips"] == 4 and report["fits"] is True
    step = report["steps"][0]
    matrices = V * D + L * (4 * D * D + 3 * D * F) + D * V
    params = 4 * (matrices // 4 + (2 * L + 1) * D)  # fsdp 4
    assert step["memory"]["params"] == params == report["plan"]["analytic"]["params"]
    assert step["memory"]["optimizer"] == 2 * params + 8
    timing = step["timing"]
    assert timing["tokens_per_s"] == pytest.approx(B * S / step["estimate_corrected_seconds"])
    assert 0 < timing["mfu"] < 1
    assert main(["plan", str(path), "--compile-for", "v5p-8"]) == 0
    text = capsys.readouterr().out
    assert "compiled (TPU compiler, libtpu)" in text and "attention splash" in text and "MFU" in text
    assert list(reports) == ["v5p-8"]


def test_a_compiler_failure_is_one_line_and_exit_1(tmp_path, capsys):
    """Mosaic refuses splash's bf16 matmuls at fp32 contract precision (a process-wide
    jax_default_matmul_precision=highest asks for it): the plan says so in one line instead of a traceback."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"family": "llama", "num_layers": 1, "d_model": D, "num_heads": H, "mlp_dim": F,
                  "vocab_size": V, "max_seq_len": S, "compute_dtype": "bfloat16", "attention": "splash"},
        "data": {"seq_len": S}, "train": {"global_batch_size": B}}))
    with jax.default_matmul_precision("highest"):
        assert main(["plan", str(path), "--compile-for", "v5p-8"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compiler for v5p-8 fails" in err[0] and "Mosaic" in err[0]
