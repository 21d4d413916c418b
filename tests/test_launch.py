"""mixlm launch: two real jax.distributed processes on localhost train exactly what one process does;
a SLURM step (its environment variables, `--distributed`) is detected by jax; the TPU and SLURM
launchers produce the commands and scripts they promise."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import xla_flags

from mixlm.config import ConfigError, load_config
from mixlm.launch import (
    check_command,
    free_port,
    launch_local,
    local_env,
    slurm_script,
    sweep_array_script,
    tpu_commands,
)
from mixlm.train import train

STEPS = 3


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"family": "llama", "num_layers": 2, "d_model": 32, "num_heads": 4, "num_kv_heads": 2,
                  "mlp_dim": 64, "vocab_size": 200, "max_seq_len": 16, "vocab_multiple": 8},
        "mesh": {"data": 2, "fsdp": -1},
        "data": {"source": "synthetic", "seq_len": 16},
        "optimizer": {"lr": 1e-2, "eps": 1e-3},
        "schedule": {"kind": "constant"},
        "train": {"steps": STEPS, "global_batch_size": 8},
        "eval": {"batches": 1},
        "logging": {"every": 1, "tensorboard": False, "progress": False},
        "checkpoint": {"every": 0, "save_at_end": True},
    }))
    return path


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


def test_two_local_processes_train_what_one_process_trains(config, tmp_path, capfd):
    two = tmp_path / "two"
    env = dict(os.environ, XLA_FLAGS=xla_flags(8))
    code = launch_local(["--", "train", str(config), f"train.output_dir={two}"], 2, cpu_devices=4,
                        log_dir=tmp_path / "logs", env=env)
    printed = capfd.readouterr().out
    assert code == 0, printed[-3000:]
    assert "[p0] " in printed and "[p1] " in printed
    for i in range(2):
        assert f"done: step {STEPS}" in (tmp_path / "logs" / f"process_{i}.log").read_text()
    one = tmp_path / "one"
    train(load_config(str(config), [f"train.output_dir={one}"]))  # this process: 8 devices, one host
    loss_two, val_two = _losses(two)
    loss_one, val_one = _losses(one)
    assert len(loss_two) == STEPS  # process 0 alone writes metrics
    assert loss_two == pytest.approx(loss_one, rel=1e-5) and val_two == pytest.approx(val_one, rel=1e-5)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == [str(STEPS)]


def test_a_failing_command_fails_the_launch(config, tmp_path, capfd):
    code = launch_local(["train", str(config), "model.bogus=1"], 2, cpu_devices=4)
    assert code == 2
    assert "model.bogus" in capfd.readouterr().out


def test_a_slurm_step_is_detected_by_distributed(config, tmp_path):
    """What `srun ... mixlm train --distributed` does in the generated sbatch script, on localhost: jax
    reads the coordinator, process count and id from SLURM's variables."""
    port = free_port()
    procs = []
    for i in range(2):
        env = local_env(4, dict(os.environ, XLA_FLAGS=xla_flags(4)))
        env.update(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2", SLURM_PROCID=str(i),
                   SLURM_LOCALID=str(i), SLURM_STEP_NUM_NODES="1", JAX_COORDINATOR_PORT=str(port))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "mixlm.cli", "train", str(config), f"train.output_dir={tmp_path / 'slurm'}",
             "--distributed"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in outputs[0]
    assert len(_losses(tmp_path / "slurm")[0]) == STEPS


def test_tpu_commands_run_the_same_command_on_every_worker():
    setup, run = tpu_commands(["train", "configs/experiments/regmix-1b.yaml", "optimizer.lr=1e-3"],
                              tpu="pod", zone="us-central2-b", project="p", setup=True)
    assert setup[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=us-central2-b", "--worker=all"]
    assert "--project=p" in run and "make install" in setup[-1]
    assert ".[tpu]" in setup[-1]
    assert run[-1] == ("cd ~/mixlm && .venv/bin/mixlm train configs/experiments/regmix-1b.yaml optimizer.lr=1e-3 "
                       "--distributed")
    (detached,) = tpu_commands(["train", "c.yaml"], tpu="pod", zone="z", log="train.log")
    assert detached[-1].endswith("nohup .venv/bin/mixlm train c.yaml --distributed > train.log.$(hostname) 2>&1 &")


def test_slurm_script_has_one_task_per_gpu_and_is_valid_bash(tmp_path):
    script = slurm_script(["train", "cfg with space.yaml"], nodes=4, gpus_per_node=8, workdir="/shared/mixlm",
                          partition="gpu", time_limit="02:00:00")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=02:00:00", "#SBATCH --signal=TERM@120",
                 "#SBATCH --requeue",
                 "srun --kill-on-bad-exit=1 .venv/bin/mixlm train 'cfg with space.yaml' --distributed"):
        assert line in script.splitlines()
    (tmp_path / "job.sbatch").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], check=True)


def test_launch_refuses_flags_it_sets_and_verbs_that_are_single_process():
    with pytest.raises(ConfigError, match="--coordinator is set by the launcher"):
        check_command(["train", "c.yaml", "--coordinator", "h:1"])
    with pytest.raises(ConfigError, match="launch runs one of train"):
        check_command(["eval", "hf/model"])
    with pytest.raises(ConfigError, match="nodes=0"):
        slurm_script(["train", "c.yaml"], nodes=0, gpus_per_node=8, workdir="/w")
    with pytest.raises(ConfigError, match="a job array runs `sweep"):
        sweep_array_script(["train", "c.yaml"], shards=2, workdir="/w")
    with pytest.raises(ConfigError, match="--shard is set by the job array"):
        sweep_array_script(["sweep", "b.yaml", "--shard", "0/2"], shards=2, workdir="/w")
