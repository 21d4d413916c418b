"""Which devices each worker process of a proxy runner gets (mixlm.proxies with --parallel N).

On a GPU host each of the `parallel` worker slots gets its own GPUs through CUDA_VISIBLE_DEVICES (G GPUs over P
workers: G/P each when P divides G; P/G workers per GPU, each capped by XLA_PYTHON_CLIENT_MEM_FRACTION, when G
divides P); a TPU host's chips belong to one process, so parallel > 1 is refused there; on CPU workers share the
host. Nothing here initialises jax (which would reserve GPU memory in the parent).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
from collections.abc import Mapping, Sequence

from mixlm.errors import ConfigError

ACCELERATORS = ("auto", "cpu", "gpu", "tpu")
SHARED_GPU_MEMORY = 0.9  # of one GPU, split evenly between the workers that share it


def visible_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES when set, else what `nvidia-smi` lists, else []."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return [g.strip() for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def detect_accelerator(env: Mapping[str, str] | None = None) -> str:
    """'cpu' | 'gpu' | 'tpu' for this host, without initialising jax (which would reserve GPU memory in the
    parent): JAX_PLATFORMS when it names one platform, else a TPU VM's devices or variables, else GPUs."""
    env = os.environ if env is None else env
    platforms = [p.strip().lower() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        first = platforms[0]
        return "gpu" if first in ("cuda", "gpu", "rocm") else first if first in ("cpu", "tpu") else "cpu"
    if env.get("TPU_ACCELERATOR_TYPE") or env.get("TPU_WORKER_ID") or glob.glob("/dev/accel[0-9]*"):
        return "tpu"
    return "gpu" if visible_gpus(env) else "cpu"


def quiet_idle_tpu_plugin(env=None, *, libtpu_installed: bool | None = None) -> bool:
    """On a host with no TPU, keeps an installed libtpu (`pip install mixlm[tpu]`, or a TPU VM image copied to a
    CPU or GPU machine) from starting: JAX starts every plugin it finds unless JAX_PLATFORMS is set, and libtpu
    with no TPU prints TPU_WORKER_HOSTNAMES / accelerator-type errors. Sets JAX_PLATFORMS=cpu in `env` (default
    os.environ) when libtpu is installed, JAX_PLATFORMS is unset, the host has no TPU and no GPU (a GPU host is
    left alone: its CUDA plugin must still start). Returns whether it set it. Call before jax initialises."""
    env = os.environ if env is None else env
    if env.get("JAX_PLATFORMS"):
        return False
    if libtpu_installed is None:
        libtpu_installed = importlib.util.find_spec("libtpu") is not None
    if not libtpu_installed or detect_accelerator(env) != "cpu":
        return False
    env["JAX_PLATFORMS"] = "cpu"
    return True


def worker_envs(parallel: int, accelerator: str, gpus: Sequence[str] = ()) -> list[dict[str, str]]:
    """The environment variables worker slot i (of `parallel`) adds to its process.

    cpu: none (workers share the host's cores, as before). tpu: one process owns all of a host's chips, so
    parallel > 1 is a ConfigError (spread a sweep over hosts with --shard instead). gpu with G GPUs:
    parallel <= G needs G % parallel == 0 and slot i sees GPUs [i*g, (i+1)*g), g = G / parallel; parallel > G
    needs parallel % G == 0 and slot i shares GPU i % G with parallel / G - 1 others, each capped at
    XLA_PYTHON_CLIENT_MEM_FRACTION = SHARED_GPU_MEMORY * G / parallel (JAX would otherwise reserve 75% of the
    GPU in the first worker). Anything else is a ConfigError naming the counts that work."""
    if parallel < 1:
        return []
    if accelerator == "cpu":
        return [{} for _ in range(parallel)]
    if accelerator == "tpu":
        if parallel > 1:
            raise ConfigError(f"--parallel {parallel}: on TPU one process owns all of a host's chips, so proxies "
                              "run one at a time per host (--parallel 1, or 0 in this process); spread a sweep over "
                              "hosts with --shard I/K (launch/sweep.py writes the job array)")
        return [{}]
    if accelerator != "gpu":
        raise ConfigError(f"--accelerator {accelerator!r}: expected one of {', '.join(ACCELERATORS)}")
    gpus = list(gpus)
    g = len(gpus)
    if g == 0:
        raise ConfigError("--accelerator gpu: no GPUs found (CUDA_VISIBLE_DEVICES is empty and nvidia-smi lists "
                          "none); pass --gpus 0,1,... or --accelerator cpu")
    if parallel <= g:
        if g % parallel:
            ok = [p for p in range(1, g + 1) if g % p == 0]
            raise ConfigError(f"--parallel {parallel}: {g} GPUs do not split evenly over {parallel} workers; use "
                              f"one of {ok} (GPUs each: {[g // p for p in ok]}) or a multiple of {g} to share GPUs")
        per = g // parallel
        return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * per:(i + 1) * per])} for i in range(parallel)]
    if parallel % g:
        raise ConfigError(f"--parallel {parallel}: more workers than the {g} GPUs must be a multiple of {g} so "
                          f"each GPU is shared by as many workers, e.g. {parallel // g * g or g} or "
                          f"{-(-parallel // g) * g}")
    share = parallel // g
    fraction = f"{int(SHARED_GPU_MEMORY / share * 100) / 100:.2f}"
    return [{"CUDA_VISIBLE_DEVICES": gpus[i % g], "XLA_PYTHON_CLIENT_MEM_FRACTION": fraction}
            for i in range(parallel)]
