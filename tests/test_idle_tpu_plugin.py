"""An installed libtpu changes nothing on a host with no TPU: importing mixlm before jax keeps the TPU plugin from
starting (no TPU errors on stderr), and JAX_PLATFORMS chosen by the user is left alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixlm.worker_devices import quiet_idle_tpu_plugin

ROOT = Path(__file__).resolve().parent.parent
TPU_COMPILER = ROOT / ".venv" / "tpu-compiler"  # `make install` puts libtpu there, off the import path


def test_only_an_idle_libtpu_on_a_cpu_host_is_kept_from_starting():
    cpu_host = {"CUDA_VISIBLE_DEVICES": ""}  # no GPUs (nvidia-smi is never asked)
    env = dict(cpu_host)
    assert quiet_idle_tpu_plugin(env, libtpu_installed=True) and env["JAX_PLATFORMS"] == "cpu"
    env = dict(cpu_host)
    assert not quiet_idle_tpu_plugin(env, libtpu_installed=False) and "JAX_PLATFORMS" not in env
    env = {**cpu_host, "JAX_PLATFORMS": "tpu,cpu"}  # the user's choice stands
    assert not quiet_idle_tpu_plugin(env, libtpu_installed=True) and env["JAX_PLATFORMS"] == "tpu,cpu"
    env = {**cpu_host, "TPU_ACCELERATOR_TYPE": "v5p-8"}  # a TPU VM
    assert not quiet_idle_tpu_plugin(env, libtpu_installed=True) and "JAX_PLATFORMS" not in env
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}  # a GPU host: its CUDA plugin must start
    assert not quiet_idle_tpu_plugin(env, libtpu_installed=True) and "JAX_PLATFORMS" not in env


@pytest.mark.skipif(not (TPU_COMPILER / "libtpu").is_dir(), reason="make install puts libtpu in .venv/tpu-compiler")
def test_with_libtpu_installed_mixlm_starts_jax_on_cpu_without_tpu_errors():
    # a CPU host's environment: this suite's in-process TPU compiles set TPU_ACCELERATOR_TYPE & co. in os.environ
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS") and not k.startswith("TPU_")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(TPU_COMPILER)]), CUDA_VISIBLE_DEVICES="")

    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                              check=True)

    probe = "from jax._src import xla_bridge as xb; print(jax.devices(), 'tpu' in xb._backend_factories, " \
            "repr(jax.config.jax_platforms))"
    # libtpu importable: JAX registers its TPU plugin and, with no platform chosen, starts it (which prints TPU
    # errors, unless another process holds libtpu's lock file: the compile tests in this suite may)
    bare = run(f"import jax; {probe}")
    assert "CpuDevice" in bare.stdout and " True " in bare.stdout and "None" in bare.stdout, bare.stdout
    with_mixlm = run(f"import mixlm, jax; {probe}")
    assert "CpuDevice" in with_mixlm.stdout and "'cpu'" in with_mixlm.stdout, with_mixlm.stdout
    assert "TPU" not in with_mixlm.stderr and "libtpu" not in with_mixlm.stderr, with_mixlm.stderr[-2000:]
