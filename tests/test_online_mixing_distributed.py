"""Online mixing on 2 jax.distributed processes (4 fake devices each): every process holds the same weights after
every update (none computed other weights than process 0's); a run SIGKILLed after step 10 resumes from its step-8
checkpoint (an ADO window open) bitwise equal to the uninterrupted 2-process run, and on 1 process (8 devices)
with the same batches and weights."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from elastic_worker import run_job
from ports import launch
from test_online_mixing import prepared, run_cfg  # noqa: F401  (prepared: the shared corpus fixture)

WORKER = Path(__file__).with_name("elastic_worker.py")
STEPS, KILL_AT = 16, 10
MIXING = ["mixing.kind=ado", "mixing.every=3", "mixing.options={min_points: 3}", "data.packing=first_fit",
          "checkpoint.every=4", "checkpoint.save_at_end=false", "eval.batches=0"]


def job(cfg, out: Path, **extra) -> dict:
    return {"config": cfg.to_dict(), "out": str(out), **extra}


def start(tmp: Path, name: str, the_job: dict, processes: int, exit_code: int = 0):
    """Starts the job on `processes` localhost processes; returns a function that waits and returns every
    process's record (none when they were killed)."""
    job_file = tmp / f"{name}.json"
    job_file.write_text(json.dumps(the_job))
    wait_all = launch(tmp / f"{name}.logs", lambda i, port: [
        sys.executable, str(WORKER), str(i), str(processes), port, str(job_file)], processes, exit_code=exit_code)

    def wait() -> list[dict]:
        wait_all()
        if exit_code:
            return []
        out = the_job["out"]
        return [json.loads(Path(out if i == 0 else f"{out}.p{i}").read_text()) for i in range(processes)]

    return wait


@pytest.fixture(scope="module")
def runs(prepared, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("online_distributed")

    def cfg(name):
        return run_cfg(prepared, tmp / name, *MIXING, steps=STEPS)

    wait_whole = start(tmp, "whole", job(cfg("whole"), tmp / "whole.json"), 2)
    wait_killed = start(tmp, "killed", job(cfg("killed"), tmp / "killed.json", kill_at=KILL_AT), 2, exit_code=-9)
    out = {"whole": wait_whole()}
    wait_killed()
    assert sorted(p.name for p in (tmp / "killed" / "checkpoints").iterdir()) == ["4", "8"]  # nothing of step 10
    for name in ("resumed_two", "resumed_one"):
        shutil.copytree(tmp / "killed", tmp / name)
    wait_two = start(tmp, "resumed_two", job(cfg("resumed_two"), tmp / "resumed_two.json"), 2)
    try:
        out["resumed_one"] = [run_job(job(cfg("resumed_one"), tmp / "resumed_one.json"))]
    finally:
        out["resumed_two"] = wait_two()
    return out


def decisions(record: dict) -> list:
    return [(h["step"], h["weights"]) for h in record["online"]["history"]]


@pytest.mark.slow
def test_every_process_holds_the_same_weights_after_every_update(runs):
    for name in ("whole", "resumed_two"):
        first, second = runs[name]
        assert first["process_count"] == 2
        assert first["online"]["mismatches"] == second["online"]["mismatches"] == 0
        assert decisions(first) == decisions(second) and first["online"]["state"] == second["online"]["state"]
        assert first["data_state"] == second["data_state"]  # the same mixture updates, the same position
    assert [step for step, _ in decisions(runs["whole"][0])] == [9, 12, 15]  # fits from the 3rd window on


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_on_2_processes_and_the_same_on_1(runs):
    whole, two, one = runs["whole"][0], runs["resumed_two"][0], runs["resumed_one"][0]
    assert two["start_step"] == one["start_step"] == 8  # the newest checkpoint before the kill
    resumed = [str(s) for s in range(9, STEPS + 1)]
    assert list(two["batches"]) == list(one["batches"]) == resumed
    for s in resumed:
        assert two["batches"][s] == whole["batches"][s] == one["batches"][s], f"global batch of step {s}"
        assert two["losses"][s] == whole["losses"][s], s  # same processes, same devices: bitwise
        assert one["losses"][s] == pytest.approx(whole["losses"][s], rel=1e-5), s  # 1 process: same math, other reduction order
    assert decisions(two) == decisions(whole) and two["online"]["state"] == whole["online"]["state"]
    for (step_a, a), (step_b, b) in zip(decisions(one), decisions(whole), strict=True):
        assert step_a == step_b and a == pytest.approx(b, rel=1e-6)
    assert one["process_count"] == 1 and one["device_count"] == 8
