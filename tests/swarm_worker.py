"""Test helper: one jax.distributed process of a proxy swarm (mixlm.train.train with K member configs).

    python tests/swarm_worker.py PROCESS_ID NUM_PROCESSES PORT JOB_JSON

JOB_JSON: {"configs": [ExperimentConfig.to_dict() of each member], "swarm_dir": path, "stop_after_step": k or
null, "out": path}. Every process writes `<out>.p<i>.json`: {"local": its members, "history": {member: logged
rows}, "eval": {member: final validation losses}, "failed", "preempted_at", "process_count", "refused": the
error member_owners raises for a swarm of one member on every device}.
"""

from __future__ import annotations

import json
import sys

from ports import start_worker


def main(argv: list[str]) -> int:
    process_id, num_processes, port, job_path = int(argv[0]), int(argv[1]), argv[2], argv[3]
    start_worker(process_id, num_processes, port)
    import jax

    from mixlm.config import config_from_dict
    from mixlm.errors import ConfigError
    from mixlm.hooks import StopAtStep, default_hooks
    from mixlm.members import member_mesh, member_owners
    from mixlm.train import train

    with open(job_path) as f:
        job = json.load(f)
    cfgs = [config_from_dict(c) for c in job["configs"]]
    try:  # one member on every device of every process: refused
        member_owners(member_mesh(1, cfgs[0]), 1)
        refused = ""
    except ConfigError as e:
        refused = str(e)
    mesh = member_mesh(len(cfgs), cfgs[0])
    stop = [StopAtStep(job["stop_after_step"])] if job.get("stop_after_step") else []
    result = train(cfgs, job["swarm_dir"], mesh=mesh, hooks=default_hooks(cfgs[0], *stop))
    local = [m for m, p in enumerate(member_owners(mesh, len(cfgs))) if p == process_id]
    record = {
        "local": local,
        "history": {str(m): result.members[m].history for m in local},
        "eval": {str(m): result.members[m].eval for m in local},
        "failed": {str(m): v for m, v in result.failed.items()},
        "preempted_at": result.preempted_at,
        "process_count": jax.process_count(),
        "refused": refused,
    }
    with open(f"{job['out']}.p{process_id}.json", "w") as f:
        json.dump(record, f)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
