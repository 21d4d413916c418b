"""Accelerators a train step can be compiled for on this host, with no accelerator present: TPU slices with
the TPU compiler (libtpu) and GPU hosts with the GPU compiler (the CUDA PJRT plugin), as compile-only devices.

    target = resolve_target("v5p-32")     # 16 TPU v5p chips, topology v5p:2x2x4, 4 hosts
    devices = compile_only_devices(target)  # jax devices to build a Mesh on; nothing can run on them

Names: `v5p-N` and `v4-N` count TensorCores (two per chip, as Cloud TPU names them), `v5e-N` / `v6e-N`
count chips; a libtpu topology name (`v5p:2x2x4`) is taken as it is. GPUs: `h100-N`, `h200-N`, `a100-N`
(SXM, 80 GB), 8 per host; their device descriptions are mixlm's own GpuTargetConfig files in
mixlm/compiled/gpu_specs/.

The compilers: an installed libtpu / CUDA plugin (`pip install mixlm[tpu]` on a TPU VM, `mixlm[cuda]` on a GPU
host), else the compile-only installs `make test` puts in <venv>/tpu-compiler and <venv>/gpu-compiler
(MIXLM_TPU_COMPILER / MIXLM_GPU_COMPILER override the folders). Those stay off the import path: JAX starts
every plugin it finds at start-up unless JAX_PLATFORMS is set, and an installed libtpu prints TPU warnings on
a CPU host (TPU_WORKER_HOSTNAMES, accelerator type), an installed CUDA plugin without its runtime a traceback.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from pathlib import Path

from mixlm.config import ConfigError

GPU_SPECS_DIR = Path(__file__).resolve().parent / "gpu_specs"
GPUS_PER_HOST = 8
TPU_CHIPS_PER_HOST = 4  # multi-host slices; single-host v5e / v6e machines hold up to 8


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    libtpu_name: str  # the prefix of libtpu topology names
    dims: int  # 3: a 3-D torus (v4, v5p); 2: a 2-D one (v5e, v6e)
    cores_per_chip_in_name: int  # Cloud TPU's v5p-N / v4-N count TensorCores, two per chip
    single_host_chips: int  # the largest slice on one host
    chip_config_name: str = "default"


TPU_GENERATIONS = {
    "v5p": TpuGeneration("v5p", 3, 2, 4, "megacore"),
    "v4": TpuGeneration("v4", 3, 2, 4, "megacore"),
    "v5e": TpuGeneration("v5e", 2, 1, 8),
    "v6e": TpuGeneration("v6e", 2, 1, 8),
}
TPU_ALIASES = {"v5litepod": "v5e"}
# GPU kind (mixlm.plan.DEVICE_MEMORY_GIB key) -> its spec file in mixlm/compiled/gpu_specs/
GPU_SPECS = {"h100": "h100_sxm.txtpb", "h200": "h200_sxm.txtpb", "a100": "a100_sxm_80gb.txtpb"}
EXAMPLES = "v5p-32, v5e-256, v6e-8, v4-8, v5p:2x2x4, h100-8, a100-32, h200-8"


@dataclasses.dataclass(frozen=True)
class CompileTarget:
    name: str  # as asked for, e.g. "v5p-32"
    platform: str  # "tpu" | "cuda"
    device_kind: str  # mixlm.plan.DEVICE_MEMORY_GIB key: its memory and peak
    chips: int  # JAX devices
    hosts: int
    topology: str  # libtpu topology ("v5p:2x2x4") or the GPU plugin's "<slices>x<hosts>x<GPUs per host>"

    def describe(self) -> str:
        """'v5p-32: 16 TPU v5p chips on 4 hosts (topology v5p:2x2x4)'."""
        unit = "TPU " + self.device_kind if self.platform == "tpu" else self.device_kind.upper()
        noun = ("chip" if self.platform == "tpu" else "GPU") + ("s" if self.chips > 1 else "")
        hosts = f"{self.hosts} host{'s' if self.hosts > 1 else ''}"
        return f"{self.name}: {self.chips} {unit} {noun} on {hosts} (topology {self.topology})"


def tpu_topology_shape(generation: TpuGeneration, chips: int) -> tuple[int, ...]:
    """The chip grid Cloud TPU builds for `chips` (a power of two): 3-D 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...;
    2-D 1x1, 2x2, 2x4, 4x4, 4x8, ... 16x16."""
    if chips < 1 or chips & (chips - 1):
        raise ConfigError(f"--compile-for: {chips} {generation.libtpu_name} chips is not a slice Cloud TPU offers "
                          "(a power of two); give a topology name instead, e.g. v5p:2x2x3")
    if generation.dims == 2:
        dims = [1, 1]
        while math.prod(dims) < chips:
            dims[1 if dims[0] == dims[1] else 0] *= 2
        return tuple(dims)
    if chips < 4:
        raise ConfigError(f"--compile-for: the smallest {generation.libtpu_name} slice has 4 chips, got {chips}")
    dims = [2, 2, 1]
    while math.prod(dims) < chips:
        smaller = [i for i in range(3) if dims[i] < max(dims)]
        dims[smaller[-1] if smaller else 2] *= 2
    return tuple(dims)


def resolve_target(name: str) -> CompileTarget:
    """The chips, hosts and topology a --compile-for name stands for (see the module docstring)."""
    text = name.strip().lower()
    if m := re.fullmatch(r"(h100|h200|a100)-(\d+)", text):
        kind, count = m.group(1), int(m.group(2))
        if count < 1:
            raise ConfigError(f"--compile-for {name}: expected at least one GPU")
        if count > GPUS_PER_HOST and count % GPUS_PER_HOST:
            raise ConfigError(f"--compile-for {name}: more than one host needs whole hosts of {GPUS_PER_HOST} GPUs "
                              f"(e.g. {kind}-{count - count % GPUS_PER_HOST})")
        hosts = -(-count // GPUS_PER_HOST)
        return CompileTarget(name, "cuda", kind, count, hosts, f"1x{hosts}x{count // hosts}")
    if m := re.fullmatch(r"(v\d+\w*)[-:](\d+(?:x\d+)*)", text):
        generation_name = TPU_ALIASES.get(m.group(1), m.group(1))
        generation = TPU_GENERATIONS.get(generation_name)
        if generation is not None:
            if "x" in m.group(2) or ":" in text:
                shape = tuple(int(n) for n in m.group(2).split("x"))
            else:
                shape = tpu_topology_shape(generation, int(m.group(2)) // generation.cores_per_chip_in_name)
            chips = math.prod(shape)
            hosts = 1 if chips <= generation.single_host_chips else -(-chips // TPU_CHIPS_PER_HOST)
            topology = f"{generation.libtpu_name}:{'x'.join(map(str, shape))}"
            return CompileTarget(name, "tpu", generation_name, chips, hosts, topology)
    raise ConfigError(f"--compile-for {name!r}: expected a TPU slice or GPU host such as {EXAMPLES}")


def compile_only_devices(target: CompileTarget) -> list:
    """The target's devices (no arrays can live on them; jit(...).lower(...).compile() works). Loads libtpu or
    the CUDA plugin; ConfigError naming what to install when the compiler is missing."""
    if target.platform == "tpu":
        return _tpu_devices(target)
    return _gpu_devices(target)


def _tpu_devices(target: CompileTarget) -> list:
    import importlib.util

    import jax
    from jax.experimental import topologies

    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        library = tpu_compiler_dir() / "libtpu" / "libtpu.so"
        if not library.is_file():
            raise ConfigError(f"--compile-for {target.name} needs the TPU compiler: `make test` installs it in "
                              f"{tpu_compiler_dir()} (pip install --no-deps --target {tpu_compiler_dir()} "
                              "'libtpu==0.0.42.*', what jax[tpu]==0.10.2 pins)")
        os.environ["TPU_LIBRARY_PATH"] = str(library)  # jax loads libtpu from here when asked for a topology
    # libtpu locks /tmp/libtpu_lockfile so two processes never share a TPU; compiling shares none.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    generation = TPU_GENERATIONS[target.device_kind]
    shape = [int(n) for n in target.topology.split(":")[1].split("x")]
    kwargs = {"chip_config_name": generation.chip_config_name}
    if target.hosts == 1:
        kwargs["chips_per_host_bounds"] = shape + [1] * (3 - len(shape))
    # With no TPU here libtpu asks the cloud metadata server who its workers are and warns; tell it while it
    # starts, then put the variables back: left set, they would make this process (and every worker it starts)
    # look like a TPU VM to detect_accelerator.
    hints = {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_ACCELERATOR_TYPE": f"{target.device_kind}-{target.chips}"}
    before = {k: os.environ.get(k) for k in hints}
    os.environ.update({k: v for k, v in hints.items() if before[k] is None})
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=target.topology, **kwargs).devices
    except jax.errors.JaxRuntimeError as e:  # libtpu's refusal names its reason
        raise ConfigError(f"--compile-for {target.name}: libtpu refuses topology {target.topology}: {e}") from None
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
    return list(devices)


def tpu_compiler_dir() -> Path:
    """Where `make test` installs libtpu for compiling only (MIXLM_TPU_COMPILER overrides)."""
    return Path(os.environ.get("MIXLM_TPU_COMPILER") or Path(sys.prefix) / "tpu-compiler")


def gpu_compiler_dir() -> Path:
    """Where `make test` installs the CUDA plugin for compiling only (MIXLM_GPU_COMPILER overrides)."""
    return Path(os.environ.get("MIXLM_GPU_COMPILER") or Path(sys.prefix) / "gpu-compiler")


def _gpu_devices(target: CompileTarget) -> list:
    import jax
    from jax.experimental import topologies

    spec = (GPU_SPECS_DIR / GPU_SPECS[target.device_kind]).read_text()
    kwargs = {"target_config": spec, "topology": target.topology}
    try:
        return list(topologies.get_topology_desc("", platform="cuda", **kwargs).devices)
    except NotImplementedError:  # no CUDA plugin registered with jax: take the compile-only install
        pass
    folder = gpu_compiler_dir()
    if not (folder / "jax_plugins" / "xla_cuda13").is_dir():
        raise ConfigError(f"--compile-for {target.name} needs the GPU compiler: `make test` installs it in "
                          f"{folder} (pip install --no-deps --target {folder} jax-cuda13-plugin==0.10.2 "
                          "jax-cuda13-pjrt==0.10.2), or pip install 'mixlm[cuda]'")
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    import importlib

    plugin = importlib.import_module("jax_plugins.xla_cuda13")
    if jax.config.jax_platforms != "cpu":
        raise ConfigError("--compile-for a GPU from the compile-only install needs JAX_PLATFORMS=cpu (there is "
                          "no CUDA runtime for the plugin to check)")
    plugin.initialize()  # registers the plugin's PJRT API with jax (its version check is skipped on cpu)
    return list(topologies.get_topology_desc("", platform="cuda", **kwargs).devices)


__all__ = ["EXAMPLES", "GPU_SPECS", "TPU_GENERATIONS", "CompileTarget", "compile_only_devices", "gpu_compiler_dir",
           "resolve_target", "tpu_compiler_dir", "tpu_topology_shape"]
