"""The real train step compiled by the GPU compiler (the CUDA PJRT plugin) for 8 compile-only H100s, no GPU
here: per-device memory against a hand count; and mixlm's own device specs against the vendor figures the
planner uses."""

import re

import jax
import pytest

from mixlm.compiled.plan import for_target
from mixlm.compiled.step import compile_train_step
from mixlm.compiled.targets import (
    GPU_SPECS,
    GPU_SPECS_DIR,
    compile_only_devices,
    gpu_compiler_dir,
    resolve_target,
)
from mixlm.config import load_config
from mixlm.plan import DEVICE_MEMORY_GIB, GIB

GPU_COMPILER = (gpu_compiler_dir() / "jax_plugins" / "xla_cuda13").is_dir()

L, D, H, F, V, B, S = 2, 256, 4, 512, 1024, 16, 256


def spec_fields(kind: str) -> dict[str, str]:
    text = (GPU_SPECS_DIR / GPU_SPECS[kind]).read_text()
    return dict(re.findall(r"^\s*(\w+): (\S+)$", text, re.MULTILINE))


@pytest.mark.parametrize("kind,sms,clock_ghz,bandwidth_tb_s,major", [
    ("h100", 132, 1.98, 3.35, 9),  # H100 SXM5 datasheet / Hopper whitepaper
    ("h200", 132, 1.98, 4.8, 9),
    ("a100", 108, 1.41, 2.039, 8),  # A100 SXM4 80GB datasheet / Ampere whitepaper
])
def test_gpu_specs_carry_the_published_figures(kind, sms, clock_ghz, bandwidth_tb_s, major):
    f = spec_fields(kind)
    assert int(f["core_count"]) == sms and float(f["clock_rate_ghz"]) == clock_ghz
    assert int(f["memory_bandwidth"]) == pytest.approx(bandwidth_tb_s * 1e12)
    assert int(f["device_memory_size"]) == DEVICE_MEMORY_GIB[kind] * GIB  # what the planner assumes
    text = (GPU_SPECS_DIR / GPU_SPECS[kind]).read_text()
    assert f"major: {major} minor: 0" in text


@pytest.mark.skipif(not GPU_COMPILER, reason=f"needs the GPU compiler in {gpu_compiler_dir()} (make test installs "
                                             "jax-cuda13-plugin there)")
def test_llama_compiles_for_8_h100s_with_the_flash_kernel():
    target = resolve_target("h100-8")
    devices = compile_only_devices(target)
    assert len(devices) == 8 and devices[0].device_kind == "NVIDIA H100 80GB HBM3"
    cfg = load_config("configs/experiments/regmix-proxy.yaml", [
        f"model.num_layers={L}", f"model.d_model={D}", f"model.num_heads={H}", "model.num_kv_heads=0",
        f"model.mlp_dim={F}", f"model.vocab_size={V}", f"model.max_seq_len={S}", f"data.seq_len={S}",
        f"train.global_batch_size={B}", "model.compute_dtype=bfloat16", "mesh.fsdp=-1"])
    cfg, note = for_target(cfg, target)
    assert cfg.model.attention == "pallas_gpu" and "cuDNN" in note  # auto: cudnn cannot trace without a GPU
    with jax.default_matmul_precision("default"):
        step = compile_train_step(cfg, devices)
    m = step.memory
    matrices = V * D + L * (4 * D * D + 3 * D * F) + D * V  # D split by fsdp 8
    params = 4 * (matrices // 8 + (2 * L + 1) * D)
    assert m.params == params and m.optimizer == 2 * params + 8
    assert m.batch == 3 * 4 * B * S // 8
    # no tile padding on GPU: the arguments are exactly the state and the batch (+ the int32 train step)
    assert m.arguments == m.params + m.optimizer + m.batch + 4
    assert m.temp > 0 and step.estimate is None  # the GPU compiler has no cost model
