"""`mixlm plan`: per-device bytes against a hand count, the fit decision, the replicated-weight flag, the CLI
(in this process and re-run with other fake device counts), and that planning allocates nothing."""

import json

import jax
import pytest
import yaml

from mixlm.cli import main
from mixlm.config import load_config
from mixlm.plan import GIB, USABLE_FRACTION, device_kind, fake_device_env, make_plan

L, D, H, F, V, V_PAD = 2, 64, 4, 128, 500, 512  # MHA: q, k, v, o are all D x D


def write_config(path, model=None, **sections):
    tree = {
        "model": {"family": "llama", "num_layers": L, "d_model": D, "num_heads": H, "mlp_dim": F, "vocab_size": V,
                  "max_seq_len": 64, **(model or {})},
        "data": {"seq_len": 64},
        "train": {"global_batch_size": 16, "steps": 1000},
        **sections,
    }
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture
def tiny(tmp_path):
    return write_config(tmp_path / "tiny.yaml")


def test_param_optimizer_and_gradient_bytes_match_a_hand_count(tiny):
    plan = make_plan(load_config(tiny), devices=jax.devices()[:8], device_kind_name="h100")
    assert plan.mesh_shape == {"data": 1, "fsdp": 8, "tensor": 1}
    # every matrix has a d_model dimension, split 8 ways by fsdp; the (D,) norm scales are replicated
    matrices = V_PAD * D + L * (4 * D * D + 3 * D * F) + D * V_PAD  # embedding, blocks, LM head
    norms = (2 * L + 1) * D
    params = 4 * (matrices // 8 + norms)
    assert plan.analytic.params == params
    assert plan.analytic.optimizer == 2 * params  # AdamW mu and nu, fp32
    assert plan.analytic.gradients == params
    # the compiled step's arguments hold the same shards (plus AdamW's int32 step counters)
    assert plan.compiled.params == params
    assert 0 <= plan.compiled.optimizer - 2 * params <= 16
    assert plan.compiled.arguments >= plan.compiled.params + plan.compiled.optimizer + plan.compiled.batch
    assert plan.compiled.temp > 0 and plan.compiled.peak > plan.compiled.arguments

    # gradient accumulation keeps a running sum beside each micro-batch's gradients, and halves activations
    accum = make_plan(load_config(tiny, ["train.grad_accum_steps=2"]), devices=jax.devices()[:8], compile=False)
    assert accum.analytic.gradients == 2 * params
    assert accum.analytic.activations == pytest.approx(plan.analytic.activations / 2, rel=1e-6)
    assert plan.tokens_per_device == 16 * 64 // 8 and accum.tokens_per_device == 8 * 64 // 8
    # rematerialisation only ever lowers the saved activations
    by_remat = {r: make_plan(load_config(tiny, [f"model.remat={r}"]), devices=jax.devices()[:8],
                             compile=False).analytic.activations for r in ("none", "dots_saveable", "full")}
    assert by_remat["full"] < by_remat["dots_saveable"] < by_remat["none"] == plan.analytic.activations


def test_a_tpu_device_kind_counts_the_scanned_stack_twice_on_cpu_devices_too(tiny):
    """`mixlm plan --device-kind v5p` (fake CPU devices) counts what `--compile-for v5p-...` does: with scanned
    layers, the TPU compiler's temp holds each layer's block input twice (benchmarks/results/
    plan_tpu_seed_configs_notes.md), c x D per token per layer more than on a GPU."""
    cfg = load_config(tiny, ["model.scan_layers=true", "model.remat=full", "model.compute_dtype=bfloat16",
                             "model.attention=xla"])
    on = {kind: make_plan(cfg, devices=jax.devices()[:8], device_kind_name=kind, compile=False)
          for kind in ("h100", "v5p")}
    assert on["v5p"].analytic.activations - on["h100"].analytic.activations == L * 2 * D * (16 * 64 // 8)
    unscanned = cfg.replace(model=cfg.model.__class__(**{**cfg.model.__dict__, "scan_layers": False}))
    assert (make_plan(unscanned, devices=jax.devices()[:8], device_kind_name="v5p", compile=False).analytic
            == make_plan(unscanned, devices=jax.devices()[:8], device_kind_name="h100", compile=False).analytic)


def test_flops_tokens_per_second_and_days(tiny):
    from mixlm.models import flops_per_token

    cfg = load_config(tiny)
    plan = make_plan(cfg, devices=jax.devices()[:4], device_kind_name="v5p", mfu=0.5, compile=False)
    assert plan.flops_per_token == flops_per_token(cfg.model, 64)
    assert plan.tokens_per_s == pytest.approx(0.5 * 459e12 * 4 / plan.flops_per_token)
    assert plan.days == pytest.approx(1000 * 16 * 64 / plan.tokens_per_s / 86400)


def test_fits_or_not_against_the_device_memory(tiny):
    small = make_plan(load_config(tiny), devices=jax.devices()[:8], device_kind_name="v5e", compile=False)
    assert small.fits and small.suggestions == []
    assert device_kind("v5e").memory_bytes == 16 * GIB and device_kind("a100-40").memory_bytes == 40 * GIB

    # regmix-1b at its published batch (512 x 2048 on 8 GPUs) saves ~230 GiB of activations per device
    big = make_plan(load_config("configs/experiments/regmix-1b.yaml"), devices=jax.devices()[:8],
                    device_kind_name="h100", compile=False)
    assert not big.fits and big.analytic.total > USABLE_FRACTION * 80 * GIB
    assert any("train.grad_accum_steps=" in s for s in big.suggestions)
    assert "fits h100" in big.to_text() and "NO" in big.to_text()
    fixed = make_plan(load_config("configs/experiments/regmix-1b.yaml",
                                  ["model.remat=full", "train.grad_accum_steps=2"]),
                      devices=jax.devices()[:8], device_kind_name="h100", compile=False)
    assert fixed.fits and fixed.analytic.total <= device_kind("h100").usable_bytes
    # and never on 8 v5e (16 GiB) without remat
    assert not make_plan(load_config("configs/experiments/regmix-1b.yaml"), devices=jax.devices()[:8],
                         device_kind_name="v5e", compile=False).fits


def test_weights_that_would_be_replicated_are_flagged(tmp_path):
    # d_model 100 does not divide the 8-way fsdp axis: the 1.6M-element embedding and LM head stay whole
    path = write_config(tmp_path / "odd.yaml", model={"d_model": 100, "vocab_size": 16384}, mesh={"strict": True})
    plan = make_plan(load_config(path), devices=jax.devices()[:8], compile=False)
    assert len(plan.replicated) == 2
    assert any(r.startswith("embed_tokens [16384, 100]") for r in plan.replicated)
    assert any(r.startswith("lm_head/kernel [100, 16384]") for r in plan.replicated)
    assert plan.analytic.params >= 4 * 2 * 16384 * 100  # counted whole on every device
    assert any("mesh.strict" in n for n in plan.notes)
    assert "replicated weights: embed_tokens" in plan.to_text()


def test_cli_prints_the_plan_in_process_and_as_json(tiny, capsys):
    assert main(["plan", str(tiny), "--devices", "4", "--device-kind", "v5e", "--mfu", "0.3"]) == 0
    text = capsys.readouterr().out
    for needle in ("on 4 x v5e", "params (fp32 master)", "optimizer state", "gradients (fp32)", "saved activations",
                   "compiled (CPU backend)", "fits v5e", "yes", "flops/token", "at 30% MFU", "days",
                   "replicated weights: none", "XLA:CPU"):
        assert needle in text, needle
    assert main(["plan", str(tiny), "model.remat=full", "--devices", "8", "--analytic-only", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["remat"] == "full" and out["compiled"] is None and out["num_devices"] == 8
    assert out["fits"] is True and out["analytic_total"] == sum(out["analytic"].values())


def test_cli_reruns_itself_with_the_fake_device_count_it_needs(tiny, capfd):
    assert jax.device_count() == 8
    assert main(["plan", str(tiny), "--devices", "16", "--device-kind", "h200", "--analytic-only"]) == 0
    text = capfd.readouterr().out
    assert "on 16 x h200" in text and "'fsdp': 16" in text
    env = fake_device_env(16, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --other", "JAX_PLATFORMS": ""})
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=16 --other" and env["JAX_PLATFORMS"] == "cpu"


def test_planning_allocates_nothing(tmp_path):
    def live_bytes():
        return sum(x.nbytes for x in jax.live_arrays())

    before = live_bytes()
    make_plan(load_config(write_config(tmp_path / "tiny.yaml")), devices=jax.devices()[:8])
    assert live_bytes() <= before + 1024
    # 4.3B parameters: a train state of ~52 GB, more than this host's memory, compiled for 8 devices
    huge = write_config(tmp_path / "huge.yaml", model={"num_layers": 2, "d_model": 8192, "num_heads": 64,
                                                       "mlp_dim": 256, "vocab_size": 262144})
    plan = make_plan(load_config(huge), devices=jax.devices()[:8])
    assert plan.compiled.params == plan.analytic.params > 2 * GIB
    assert live_bytes() <= before + 1024


def test_overrides_after_the_flags_as_the_readme_writes_them_and_as_the_hint_says(capsys):
    """README: `mixlm plan configs/experiments/regmix-1b.yaml --devices 8 --device-kind h100 model.remat=full
    train.grad_accum_steps=2` (issue 24: `unrecognized arguments`); then plan's own "to fit" hint pasted after
    the flags."""
    regmix = "configs/experiments/regmix-1b.yaml"
    assert main(["plan", regmix, "--devices", "8", "--device-kind", "h100", "--analytic-only"]) == 0
    hints = [line.split("to fit: ", 1)[1] for line in capsys.readouterr().out.splitlines() if "to fit: " in line]
    assert hints, "regmix-1b at its published batch does not fit 8 x h100: plan suggests what would"
    assert main(["plan", regmix, "--devices", "8", "--device-kind", "h100", "model.remat=full",
                 "train.grad_accum_steps=2", "--analytic-only", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["remat"] == "full" and out["grad_accum_steps"] == 2 and out["fits"] is True
    pasted = hints[-1].rsplit(" (", 1)[0].split()  # 'model.remat=full train.grad_accum_steps=K (x GiB)'
    assert main(["plan", regmix, "--devices", "8", "--device-kind", "h100", "--analytic-only", *pasted]) == 0
    assert "fits h100 (72.0 GiB usable = 90% of 80 GiB): yes" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # an unknown flag is still refused
        main(["plan", regmix, "--devicez", "8", "model.remat=full"])
    assert e.value.code == 2 and "unrecognized arguments: --devicez" in capsys.readouterr().err


def test_the_fit_search_visits_divisors_only():
    from mixlm.plan import _divisors

    assert _divisors(1) == [1] and _divisors(12) == [1, 2, 3, 4, 6, 12] and _divisors(49) == [1, 7, 49]
    assert _divisors(2**31 - 1) == [1, 2**31 - 1]  # a prime batch: 46k trial divisions, not 2**31 plans
