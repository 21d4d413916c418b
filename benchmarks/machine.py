"""One line describing the host, for every benchmark's results file."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe_machine() -> str:
    """e.g. '2-core x86_64 CPU (Intel(R) Xeon(R) Processor, avx512), 24 GiB RAM, Linux; accelerators: none'."""
    cpu, avx512 = "unknown CPU", False
    try:
        info = Path("/proc/cpuinfo").read_text()
        for line in info.splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        avx512 = " avx512f" in info
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    accel = "none"
    try:
        import jax

        devices = jax.devices()
        if devices[0].platform != "cpu":
            accel = f"{len(devices)} x {devices[0].device_kind}"
    except (ImportError, RuntimeError):  # jax missing or no backend: the CPU line still stands
        accel = "unknown (jax unavailable)"
    isa = ", avx512" if avx512 else ""
    return (f"{os.cpu_count()}-core {platform.machine()} CPU ({cpu}{isa}), {mem:.0f} GiB RAM, "
            f"{platform.system()}; accelerators: {accel}")
