"""Test helper: one process of a real `mixlm.train.train` run that records every global batch it trains on.

    python tests/elastic_worker.py PROCESS_ID NUM_PROCESSES PORT JOB_JSON     # one jax.distributed process
    run_job(job)                                                             # in-process (one process)

JOB_JSON: {"config": ExperimentConfig.to_dict(), "stop_at": k or null (stop after step k, as on SIGTERM: the
checkpoint hook saves step k), "kill_at": k or null (every process SIGKILLs itself after step k's hooks: no
checkpoint of it, the run resumes from an earlier one), "update": [step, {domain: weight}] or null (a
`set_weights` made by a MixtureUpdateHook after that step), "devices": n or null (a mesh over the first n
devices), "out": path}. The run resumes from the newest checkpoint in train.output_dir, as `mixlm train` does.
Process 0 writes to `out` {"batches": {step: {key: sha256 of the global array}}, "losses": {step: loss},
"process_count", "device_count", "start_step", "data_state", "log": the run's messages, "online": the online
mixing hook's {history, mismatches, state} (mixing.kind other than static)}; process i > 0 writes its own record
to `out`.p<i>. The global array is gathered from all processes after `to_global_batch` (what the train step
gets), so the row order across processes is checked too.
"""

from __future__ import annotations

import hashlib
import json
import sys


def _digest(array) -> str:
    import numpy as np

    a = np.ascontiguousarray(array)
    return hashlib.sha256(f"{a.dtype}{a.shape}".encode() + a.tobytes()).hexdigest()


def run_job(job: dict) -> dict:
    """Runs the job's training in this process (jax.distributed already initialised when multi-process);
    returns the record (see module docstring)."""
    import jax
    from jax.experimental import multihost_utils

    import mixlm.setup
    import mixlm.train
    from mixlm.config import config_from_dict
    from mixlm.data import make_train_source
    from mixlm.hooks import Hook, MixtureUpdateHook, default_hooks
    from mixlm.sharding import make_mesh

    cfg = config_from_dict(job["config"])
    source = make_train_source(cfg, process_index=jax.process_index(), process_count=jax.process_count())
    trained: dict[str, dict] = {}  # step -> the global arrays it trained on (gathered once, at the end)
    real_to_global_batch = mixlm.setup.to_global_batch

    def recording_to_global_batch(host_batch, layout):
        arrays = real_to_global_batch(host_batch, layout)
        step = source.get_state()["step"]  # the step this batch trains (next_batch just advanced it)
        trained[str(step)] = arrays
        return arrays

    class StopAt(Hook):
        """Stops the run after step `stop_at`, as SIGTERM does: the checkpoint hook then saves that step."""

        def due(self, run, step):
            return step == job.get("stop_at")

        def after_step(self, run, step):
            run.stop(f"the test's stop at step {step}")

    class KillAt(Hook):
        """Every process kills itself after step `kill_at` (once all reached it): a crash, not a stop."""

        def due(self, run, step):
            return step == job.get("kill_at")

        def after_step(self, run, step):
            import os
            import signal

            multihost_utils.sync_global_devices("kill")
            os.kill(os.getpid(), signal.SIGKILL)

    extra: list = [StopAt(), KillAt()]
    if job.get("update"):
        at, weights = job["update"]
        extra.insert(0, MixtureUpdateHook(at, lambda stats: weights if stats.step == at else None))
    mesh = make_mesh(cfg.mesh, devices=jax.devices()[: job["devices"]]) if job.get("devices") else None
    log: list[str] = []
    hooks = default_hooks(cfg, *extra)
    online = [h for h in hooks if getattr(h, "state_key", "") == "online_mixing"]
    mixlm.setup.to_global_batch = recording_to_global_batch  # what TrainSetup.put_batch places a batch with
    try:
        result = mixlm.train.train(cfg, mesh=mesh, sources=[source], hooks=hooks, log_fn=log.append)
    finally:
        mixlm.setup.to_global_batch = real_to_global_batch
    gathered = multihost_utils.process_allgather(trained, tiled=True)  # one collective for every step and key
    return {
        "batches": {
            step: {k: _digest(v) for k, v in sorted(gathered[step].items())}
            for step in sorted(gathered, key=int)
        },
        "losses": {str(m["step"]): m["loss"] for m in result.history},
        "process_count": jax.process_count(),
        "device_count": (mesh or result.state.step.sharding.mesh).size,
        "start_step": min(int(s) for s in trained) - 1 if trained else None,
        "data_state": source.get_state(),
        "log": log,
        "online": {"history": online[0].history, "mismatches": online[0].mismatches, "state": online[0].state}
        if online else None,
    }


def main(argv: list[str]) -> int:
    process_id, num_processes, port, job_path = int(argv[0]), int(argv[1]), argv[2], argv[3]
    from ports import start_worker

    start_worker(process_id, num_processes, port)
    import jax

    with open(job_path) as f:
        job = json.load(f)
    record = run_job(job)
    with open(job["out"] if process_id == 0 else f"{job['out']}.p{process_id}", "w") as f:
        json.dump(record, f)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
