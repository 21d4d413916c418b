"""The compile planner's parts that need no compiler: --compile-for names, the jaxpr flop count against a hand
count (scan bodies counted as run and once, as XLA's cost model counts them), and the step-time arithmetic."""

import jax
import jax.numpy as jnp
import pytest

from mixlm.compiled.estimate import CompilerEstimate, jaxpr_flops
from mixlm.compiled.targets import TPU_GENERATIONS, resolve_target, tpu_topology_shape
from mixlm.config import ConfigError


def test_target_names_resolve_to_cloud_tpu_slices_and_gpu_hosts():
    def shape(name):
        t = resolve_target(name)
        return t.platform, t.device_kind, t.chips, t.hosts, t.topology

    assert shape("v5p-32") == ("tpu", "v5p", 16, 4, "v5p:2x2x4")  # TensorCores in the name: 2 per chip
    assert shape("v5p-128") == ("tpu", "v5p", 64, 16, "v5p:4x4x4")
    assert shape("v4-8") == ("tpu", "v4", 4, 1, "v4:2x2x1")
    assert shape("v5e-256") == ("tpu", "v5e", 256, 64, "v5e:16x16")  # chips in the name
    assert shape("v5litepod-8") == ("tpu", "v5e", 8, 1, "v5e:2x4")  # one host holds 8 v5e chips
    assert shape("v6e-8") == ("tpu", "v6e", 8, 1, "v6e:2x4")
    assert shape("v5p:2x2x3") == ("tpu", "v5p", 12, 3, "v5p:2x2x3")  # a topology name as given
    assert shape("h100-8") == ("cuda", "h100", 8, 1, "1x1x8")
    assert shape("a100-32") == ("cuda", "a100", 32, 4, "1x4x8")
    assert [tpu_topology_shape(TPU_GENERATIONS["v5p"], n) for n in (8, 32, 128)] == [(2, 2, 2), (2, 4, 4),
                                                                                      (4, 4, 8)]
    assert resolve_target("v5p-32").describe() == "v5p-32: 16 TPU v5p chips on 4 hosts (topology v5p:2x2x4)"
    for bad in ("v5p-24", "tpu-8", "h100", "v9x-8", "a100-12"):
        with pytest.raises(ConfigError, match="--compile-for"):
            resolve_target(bad)


def test_jaxpr_flops_count_scan_bodies_as_run_and_once():
    m, k, n, steps = 8, 16, 32, 3

    def f(x_MxK, w_KxK, ws_SxKxN):
        def body(carry_MxK, w_KxN):
            return carry_MxK + jnp.sum(jnp.dot(carry_MxK @ w_KxK, w_KxN)), None

        y_MxK, _ = jax.lax.scan(body, x_MxK, ws_SxKxN)
        return jnp.sum(y_MxK)

    counted = jaxpr_flops(jax.make_jaxpr(f)(jnp.ones((m, k)), jnp.ones((k, k)), jnp.ones((steps, k, n))))
    # per step: two dots (2 m k k, 2 m k n), the sum over m n, the broadcast add over m k
    per_step = 2 * m * k * k + 2 * m * k * n + m * n + m * k
    outside = m * k  # the final sum
    assert counted.as_run == steps * per_step + outside
    assert counted.bodies_once == per_step + outside


def test_step_time_is_put_together_from_its_parts():
    est = CompilerEstimate(seconds=0.5, as_compiled_flops=1e12, as_run=8e12, base_seconds=1.0, layer_seconds=2.0,
                           layer_flops=4e12, layers=3, chunk_seconds=0.25, loss_chunks=5, micro_batches=2,
                           kernel_flops=1e12, counts_whole=True)
    # 2 micro-batches x (base 1 + 3 layers x 2 + 4 more chunks x 0.25) + 1e12 flops at a layer's 2 s / 4e12
    assert est.corrected_seconds == pytest.approx(2 * (1 + 6 + 1) + 0.5)
    assert est.corrected_flops == 9e12


def test_a_cost_model_that_gives_a_negative_time_gives_no_estimate(monkeypatch):
    """Measured: the v5e cost model gave -17.0 s for one layer of gpt2-70m (v5p: 1.6 ms). No estimate then."""
    import types

    from mixlm.compiled import step as compile_step
    from mixlm.config import load_config
    from mixlm.plan import CompiledMemory

    cfg = load_config("configs/experiments/gpt2-70m.yaml", ["train.grad_accum_steps=1"])
    monkeypatch.setattr(compile_step, "_timed", lambda *a, **k: ({"optimal_seconds": -17.0, "flops": 1e9}, True))
    program = types.SimpleNamespace(micro_batches=1, chunk_len=cfg.data.seq_len)
    memory = CompiledMemory(params=1, optimizer=1, batch=1, arguments=3, outputs=2, aliased=2, temp=5)
    step = compile_step.CompiledStep((), memory, 1.0, None, 1024, compiler_cost={"flops": 1e9, "optimal_seconds": 0.1})
    out = compile_step._estimate(lambda c: program, cfg, step, 8, ("run",))
    assert out.estimate is None and "-17 s" in out.no_estimate


def test_a_plan_whose_cost_model_times_are_negative_reports_the_assumed_mfu(monkeypatch):
    """gpt2-70m on v5e-8 ended in 'ZeroDivisionError: float division by zero': the v5e cost model gave -13, -20
    and -16 s for the 1-layer, 2-layer and doubled-chunk programs (measured; -33 s for the whole step), each
    difference clamped at 0 summed to a 0 s step, and tokens/s divided by it. The plan must say why it has no
    estimate and fall back to the assumed MFU. The compiler is replaced by those numbers; the rest is real."""
    import jax

    from mixlm.compiled import plan as compile_plan_module
    from mixlm.compiled import step as compile_step
    from mixlm.config import load_config
    from mixlm.plan import CompiledMemory

    cfg = load_config("configs/experiments/gpt2-70m.yaml", ["model.scan_layers=true", "model.num_layers=2"])
    monkeypatch.setattr(compile_plan_module, "compile_only_devices", lambda target: jax.devices())

    def compiled(build, cfg, overrides, tokens_per_step):
        memory = CompiledMemory(params=1 << 20, optimizer=2 << 20, batch=1 << 10, arguments=(3 << 20) + (1 << 10),
                                outputs=3 << 20, aliased=3 << 20, temp=1 << 30)
        return compile_step.CompiledStep(tuple(overrides), memory, 1.0, None, tokens_per_step,
                                         compiler_cost={"flops": 1.49e11, "optimal_seconds": -33.0})

    def timed(build, cfg, num_devices, budget=None, key=()):
        seconds = -16.0 if budget else {1: -13.0, 2: -20.0}[cfg.model.num_layers]
        return {"optimal_seconds": seconds, "flops": 1e11 * cfg.model.num_layers}, True

    monkeypatch.setattr(compile_step, "_compile", compiled)
    monkeypatch.setattr(compile_step, "_timed", timed)
    report = compile_plan_module.compile_plan(cfg, "v5e-8", name="gpt2-70m")
    timing = report.to_dict()["steps"][0]["timing"]  # the old code: ZeroDivisionError here
    assert report.fits and report.configured.estimate is None
    p = report.plan
    assert timing["tokens_per_s"] == pytest.approx(0.4 * 8 * p.device.peak_flops / p.flops_per_token)
    assert timing["mfu"] == pytest.approx(0.4)
    assert "assumed 40% MFU (the TPU compiler's cost model gave -20 s" in report.to_text()
