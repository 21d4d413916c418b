"""CPU-only tests over 8 fake devices. The flags must be set before jax is imported anywhere."""

import os

# XLA:CPU aborts a collective whose 8 device threads do not all arrive within 40 s; on a loaded
# 2-core machine they can be starved that long, so tests allow much longer.
COLLECTIVE_TIMEOUTS = (
    "--xla_cpu_collective_call_terminate_timeout_seconds=1800 --xla_cpu_collective_timeout_seconds=1800 "
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=600"
)


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process (or subprocess) with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {COLLECTIVE_TIMEOUTS}"


os.environ["XLA_FLAGS"] = xla_flags(8)
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

# The slowest test files (seconds each on 2 CPU cores, make test's two workers), started first so that no long
# file begins last while the other worker idles: each file runs whole on one worker (--dist loadfile).
SLOWEST_FIRST = ("test_study.py", "test_compile_tpu.py", "test_object_store.py", "test_attention.py",
                 "test_checkpoint.py", "test_online_mixing.py", "test_launch.py", "test_ray_engine.py",
                 "test_swarm.py", "test_export.py", "test_train.py", "test_scan.py", "test_models.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order

