"""CPU-only tests over 8 fake devices. The flags must be set before jax is imported anywhere."""

import os
import shutil
import tempfile

# XLA:CPU aborts a collective whose 8 device threads do not all arrive within 40 s; on a loaded
# 2-core machine they can be starved that long, so tests allow much longer.
# A trap of XLA:CPU (jaxlib 0.10.2) with fake devices: never dispatch ~32 sharded steps without reading a result.
# It keeps at most 32 computations in flight per device; a device's launch that waits for a slot holds one of the
# threads that the running step's collective needs, and the process deadlocks (all but one device in an all-gather,
# the last launch in Semaphore::Acquire). benchmarks/xla_cpu_inflight_deadlock.py measures it (3 processes at once on
# 2 cores: 200 unread steps stopped all 3, 30 unread or 200 read every 16 none in 45 rounds). The train loop reads
# each step one step late and evaluation every batch; tests that loop train_step themselves read each step too.
COLLECTIVE_TIMEOUTS = (
    "--xla_cpu_collective_call_terminate_timeout_seconds=1800 --xla_cpu_collective_timeout_seconds=1800 "
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=600"
)


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process (or subprocess) with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {COLLECTIVE_TIMEOUTS}"


os.environ["XLA_FLAGS"] = xla_flags(8)
# One persistent compilation cache for the whole test run (its worker processes and every subprocess they start
# inherit it): the many tiny runs compile the same programs again and again. A fresh folder per run, removed at
# the end, so each run still compiles every distinct program once; JAX_COMPILATION_CACHE_DIR= (empty) turns it off.
# No size limit: with one, JAX keeps access-time files, and one entry written without (a process that had no limit)
# made every later write fail here. A read that races a write fails to decompress and JAX compiles instead.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mixlm-tests-jax-cache-")
    os.environ["MIXLM_TESTS_OWN_JAX_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
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


def pytest_unconfigure(config):
    own = os.environ.get("MIXLM_TESTS_OWN_JAX_CACHE")
    if own and not hasattr(config, "workerinput"):  # the process that made the cache folder removes it
        shutil.rmtree(own, ignore_errors=True)
