"""launch/ and `mixlm launch`: two real jax.distributed processes on localhost train exactly what one
process does; a SLURM step (its environment variables, `--distributed`) is detected by jax; the TPU and
SLURM launchers produce the commands and scripts they promise; each script runs by path with --dry-run,
`mixlm launch WHERE` runs the same script, and usage or config errors are one line and exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import xla_flags
from ports import free_port

from launch.common import check_command
from launch.local import launch_local, local_env
from launch.slurm import slurm_script
from launch.sweep import sweep_array_script
from launch.tpu import tpu_commands
from mixlm.cli import main
from mixlm.commands import launch as launch_verb
from mixlm.config import ConfigError, load_config
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


ROOT = Path(__file__).resolve().parents[1]
DRY_RUNS = {
    "local": ["--dry-run", "-n", "2", "--", "train", "configs/experiments/demo.yaml"],
    "tpu": ["--dry-run", "--tpu", "pod", "--zone", "z", "--setup", "--", "train", "cfg with space.yaml"],
    "slurm": ["--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--workdir", "/shared/my mixlm", "--",
              "train", "configs/experiments/regmix-1b.yaml"],
    "sweep": ["--dry-run", "--shards", "4", "--workdir", "/w", "--", "sweep", "configs/experiments/regmix-proxy.yaml",
              "--mixtures", "m/", "--out", "s/"],
}


def _script(name, *args, cwd=ROOT):
    """`python launch/<name>.py ARGS`, run by path as a user would (sys.path[0] is launch/)."""
    return subprocess.run([sys.executable, str(ROOT / "launch" / f"{name}.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("name", sorted(DRY_RUNS))
def test_each_script_runs_by_path_and_its_dry_run_prints_what_it_would_run(name, tmp_path):
    done = _script(name, *DRY_RUNS[name], cwd=tmp_path)  # from anywhere: the script finds the repo itself
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    if name == "local":
        assert done.stdout.splitlines() == [
            f"{sys.executable} -m mixlm.cli train configs/experiments/demo.yaml --coordinator 127.0.0.1:12345 "
            f"--num-processes 2 --process-id {i}" for i in range(2)]
    elif name == "tpu":
        setup, run = done.stdout.splitlines()
        assert "make install" in setup
        assert run.endswith("""'cd ~/mixlm && .venv/bin/mixlm train '"'"'cfg with space.yaml'"'"' --distributed'""")
    else:
        (tmp_path / "job.sbatch").write_text(done.stdout)
        subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], check=True)
        assert ("cd '/shared/my mixlm'" if name == "slurm" else '--shard "$SLURM_ARRAY_TASK_ID/4"') in done.stdout
    assert list(tmp_path.iterdir()) == ([] if name in ("local", "tpu") else [tmp_path / "job.sbatch"])
    assert _script(name, "--help").returncode == 0


def test_mixlm_launch_runs_the_scripts_with_the_same_arguments(capsys):
    for where, name in (("local", "local"), ("tpu", "tpu"), ("slurm", "slurm"), ("slurm-sweep", "sweep")):
        assert main(["launch", where, *DRY_RUNS[name]]) == 0
        assert capsys.readouterr().out == _script(name, *DRY_RUNS[name]).stdout


@pytest.mark.parametrize("args, message", [
    (["local", "--dry-run", "-n", "2", "--", "eval", "hf/model"], "launch runs one of train"),
    (["local", "--dry-run", "--", "train", "c.yaml"], "the following arguments are required: -n/--num-processes"),
    (["tpu", "--dry-run", "--tpu", "p", "--", "train", "c.yaml"], "--zone"),
    (["slurm", "--nodes", "1", "--gpus-per-node", "1", "--workdir", "/w", "--submit", "--", "train", "c.yaml"],
     "--submit needs --out"),
    (["slurm-sweep", "--dry-run", "--shards", "2", "--workdir", "/w", "--", "sweep", "b.yaml", "--shard", "0/2"],
     "--shard is set by the job array"),
])
def test_usage_and_config_errors_are_one_line_and_exit_2(args, message, capsys):
    try:
        code = main(["launch", *args])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err
    assert err.startswith(f"mixlm launch {args[0]}: ")


def test_an_existing_script_file_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "job.sbatch"
    args = ["--nodes", "1", "--gpus-per-node", "1", "--workdir", "/w", "--out", str(out), "--", "train", "c.yaml"]
    assert main(["launch", "slurm", *args]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n" and "srun" in out.read_text()
    out.write_text("mine")
    assert main(["launch", "slurm", *args]) == 2
    assert "exists; choose another --out" in capsys.readouterr().err and out.read_text() == "mine"


def test_mixlm_launch_without_the_launch_folder_says_to_run_from_a_clone(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(launch_verb, "launch_folder", lambda: tmp_path / "launch")
    assert main(["launch", "local", "--dry-run", "-n", "2", "--", "train", "c.yaml"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "run from a clone" in err
