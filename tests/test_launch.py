"""launch/ and `mixlm launch`: two real jax.distributed processes on localhost train exactly what one
process does; a SLURM step (its environment variables, `--distributed`) is detected by jax; the TPU and
SLURM launchers produce the commands and scripts they promise; each script runs by path with --dry-run,
`mixlm launch WHERE` runs the same script, and usage or config errors are one line and exit code 2.
Hostile values for every flag are quoted or refused (golden files in tests/golden/launch/, rewritten with
MIXLM_UPDATE_GOLDEN=1) and never run when the script or commands run against fake srun/sbatch/gcloud; a
killed process is noticed by the local launcher within a poll, and a process whose peer died exits on the
coordination service's heartbeat (train.heartbeat_timeout_s)."""

import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import pytest
import yaml
from conftest import xla_flags
from ports import free_port

from launch.common import check_command
from launch.local import launch_local, local_env, run_processes
from launch.slurm import slurm_script
from launch.sweep import sweep_array_script
from launch.tpu import tpu_commands
from mixlm.cli import main
from mixlm.commands import launch as launch_verb
from mixlm.config import load_config
from mixlm.errors import ConfigError
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
    assert run[-1] == ('cd "$HOME"/mixlm && .venv/bin/mixlm train configs/experiments/regmix-1b.yaml '
                       "optimizer.lr=1e-3 --distributed")
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
    with pytest.raises(ConfigError, match="launch runs one of train, sweep"):
        check_command(["eval", "hf/model"])
    with pytest.raises(ConfigError, match="launch runs `sweep` on every process only as swarms spanning them"):
        check_command(["sweep", "b.yaml", "--mixtures", "m/", "--out", "s/"])
    assert check_command(["sweep", "b.yaml", "--mixtures", "m/", "--out", "s/", "--swarm", "8"])[-1] == "8"
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
        assert run.endswith("""'cd "$HOME"/mixlm && .venv/bin/mixlm train '"'"'cfg with space.yaml'"'"' --distributed'""")
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


# --- hostile input: every user string is quoted or refused (golden files + runs against fake tools) ---

GOLDEN = Path(__file__).parent / "golden" / "launch"
# Shell syntax of every kind: a command separator, a substitution, backticks, both quotes.
HOSTILE = """x'; touch /tmp/pwned; echo "$(touch /tmp/pwned)" `touch /tmp/pwned` \\"""
NEWLINE = "x\ntouch /tmp/pwned"
HOSTILE_MIXLM = ".venv/bin/mixlm 'a; touch /tmp/pwned' '$(touch /tmp/pwned)' '`touch /tmp/pwned`'"
TPU = ["--dry-run", "--tpu", "pod", "--zone", "us-central2-b", "--project", "p", "--setup"]
SLURM = ["--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--workdir", "/shared/mixlm"]
SWEEP = ["--dry-run", "--shards", "2", "--workdir", "/w"]
TRAIN = ["--", "train", "c.yaml"]
CREATE = ["--dry-run", "--tpu", "pod", "--zone", "us-east5-a", "--project", "p", "--create", "--spot",
          "--accelerator-type", "v5p-32"]
SWEEP_CMD = ["--", "sweep", "b.yaml", "--mixtures", "m/", "--out", "s/"]
GOLDEN_CASES = {  # file name -> `mixlm launch` arguments
    "local-command": ["local", "--dry-run", "-n", "2", "--", "train", HOSTILE, f"train.output_dir={HOSTILE}"],
    "tpu-tpu": ["tpu", *TPU[:2], HOSTILE, *TPU[3:], *TRAIN],
    "tpu-tpu-option": ["tpu", "--dry-run", "--tpu=--command=touch /tmp/pwned", *TPU[3:], *TRAIN],
    "tpu-zone": ["tpu", *TPU[:4], HOSTILE, *TPU[5:], *TRAIN],
    "tpu-project": ["tpu", *TPU[:6], "p --command=touch", *TPU[7:], *TRAIN],
    "tpu-workdir": ["tpu", *TPU, "--workdir", "/d; touch /tmp/pwned", *TRAIN],
    "tpu-workdir-hostile": ["tpu", *TPU, "--workdir", HOSTILE, *TRAIN],
    "tpu-workdir-tilde": ["tpu", *TPU, "--workdir", f"~/my dir/{HOSTILE}", *TRAIN],
    "tpu-workdir-tilde-user": ["tpu", *TPU, "--workdir", "~root/mixlm", *TRAIN],
    "tpu-workdir-newline": ["tpu", *TPU, "--workdir", NEWLINE, *TRAIN],
    "tpu-log": ["tpu", *TPU, "--log", HOSTILE, *TRAIN],
    "tpu-log-newline": ["tpu", *TPU, "--log", NEWLINE, *TRAIN],
    "tpu-mixlm": ["tpu", *TPU, "--mixlm", HOSTILE_MIXLM, *TRAIN],
    "tpu-mixlm-unbalanced": ["tpu", *TPU, "--mixlm", HOSTILE, *TRAIN],
    "tpu-command": ["tpu", *TPU, "--", "train", HOSTILE, f"train.output_dir={HOSTILE}"],
    "tpu-command-newline": ["tpu", *TPU, "--", "train", "c.yaml", f"train.output_dir={NEWLINE}"],
    "slurm-job-name": ["slurm", *SLURM, "--job-name", HOSTILE, *TRAIN],
    "slurm-job-name-newline": ["slurm", *SLURM, "--job-name", NEWLINE, *TRAIN],
    "slurm-job-name-option": ["slurm", *SLURM, "--job-name", "x --output=/etc/passwd", *TRAIN],
    "slurm-time": ["slurm", *SLURM, "--time", "1:00 #", *TRAIN],
    "slurm-partition": ["slurm", *SLURM, "--partition", HOSTILE, *TRAIN],
    "slurm-account": ["slurm", *SLURM, "--account", NEWLINE, *TRAIN],
    "slurm-workdir": ["slurm", *SLURM[:-1], HOSTILE, *TRAIN],
    "slurm-workdir-tilde": ["slurm", *SLURM[:-1], f"~/{HOSTILE}", *TRAIN],
    "slurm-workdir-newline": ["slurm", *SLURM[:-1], NEWLINE, *TRAIN],
    "slurm-mixlm": ["slurm", *SLURM, "--mixlm", HOSTILE_MIXLM, *TRAIN],
    "slurm-command": ["slurm", *SLURM, "--partition", "gpu,a100", "--account", "lab-1", "--job-name", "r_1.b",
                      "--time", "1-00:00:00", "--", "train", HOSTILE, f"train.output_dir={HOSTILE}"],
    "slurm-command-newline": ["slurm", *SLURM, "--", "train", NEWLINE],
    "sweep-job-name": ["slurm-sweep", *SWEEP, "--job-name", NEWLINE, *SWEEP_CMD],
    "sweep-account": ["slurm-sweep", *SWEEP, "--account", HOSTILE, *SWEEP_CMD],
    "sweep-workdir": ["slurm-sweep", *SWEEP[:-1], f"~/{HOSTILE}", *SWEEP_CMD],
    "sweep-mixlm": ["slurm-sweep", *SWEEP, "--mixlm", HOSTILE_MIXLM, *SWEEP_CMD],
    "sweep-command": ["slurm-sweep", *SWEEP, "--", "sweep", HOSTILE, "--mixtures", HOSTILE, "--out", "s/"],
    "sweep-command-newline": ["slurm-sweep", *SWEEP, "--", "sweep", "b.yaml", "--out", NEWLINE],
    # a job array of swarms (each task: mixlm sweep ... --swarm K --shard I/N)
    "sweep-swarm": ["slurm-sweep", *SWEEP, "--swarm", "8", "--", "sweep", HOSTILE, "--mixtures", HOSTILE,
                    "--out", f"s/{HOSTILE}", f"train.output_dir={HOSTILE}"],
    "sweep-swarm-twice": ["slurm-sweep", *SWEEP, "--swarm", "8", *SWEEP_CMD, "--swarm", "4"],
    # the slice's life: create (queued resource) or reuse, install at a ref / a wheel, per-worker run, delete
    "tpu-create": ["tpu", *CREATE, "--install-ref", "v1.2", "--repo", "https://example.com/o/mixlm.git",
                   "--delete-on-exit", "--", "train", HOSTILE, f"train.output_dir={HOSTILE}"],
    "tpu-create-workers-stop": ["tpu", *CREATE[:8], "--accelerator-type", "v4-8", "--workers", "2", "--setup",
                                "--stop-on-exit", *TRAIN],
    "tpu-repo": ["tpu", *TPU[:-1], "--install-ref", "main", "--repo", HOSTILE, *TRAIN],
    "tpu-install-ref": ["tpu", *TPU[:-1], "--install-ref", HOSTILE, "--repo", "r", *TRAIN],
    "tpu-install-ref-option": ["tpu", *TPU[:-1], "--install-ref=--upload-pack=touch /tmp/pwned", "--repo", "r",
                               *TRAIN],
    "tpu-wheel": ["tpu", *TPU[:-1], "--wheel", f"/dist/{HOSTILE}.whl", "--upload", f"/cfg/{HOSTILE}",
                  "--upload", "/cfg/two words", "--workdir", f"~/{HOSTILE}", *TRAIN],
    "tpu-wheel-newline": ["tpu", *TPU[:-1], "--wheel", f"/dist/{NEWLINE}.whl", *TRAIN],
    "tpu-accelerator-type": ["tpu", *CREATE[:-1], HOSTILE, *TRAIN],
    "tpu-runtime-version-option": ["tpu", *CREATE, "--runtime-version=--zone=elsewhere", *TRAIN],
    "tpu-queued-resource": ["tpu", *CREATE, "--queued-resource", "qr; touch /tmp/pwned", *TRAIN],
    "tpu-spot-without-create": ["tpu", *TPU, "--spot", *TRAIN],
    "tpu-delete-detached": ["tpu", *TPU, "--log", "run.log", "--delete-on-exit", *TRAIN],
}


def _launch_transcript(args, capsys) -> tuple[int, str, str, str]:
    """`mixlm launch ARGS`: (exit code, stdout, stderr, all three as text with the arguments as JSON)."""
    try:
        code = main(["launch", *args])
    except SystemExit as e:
        code = e.code
    done = capsys.readouterr()
    stdout = done.out.replace(sys.executable, "PYTHON")  # the same file on every machine
    text = f"mixlm launch {json.dumps(args)}\nexit {code}\n--- stdout\n{stdout}--- stderr\n{done.err}"
    return code, stdout, done.err, text


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_hostile_values_match_the_golden_outputs(name, capsys):
    """MIXLM_UPDATE_GOLDEN=1 rewrites tests/golden/launch/NAME.txt from the code; otherwise each is checked.
    Every value is either quoted (exit 0, the script/commands printed) or refused in one line (exit 2)."""
    code, stdout, stderr, text = _launch_transcript(GOLDEN_CASES[name], capsys)
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("MIXLM_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; rerun with MIXLM_UPDATE_GOLDEN=1 if the change is meant"
    if code:
        assert code == 2 and len(stderr.splitlines()) == 1 and stdout == "", text
    else:
        assert stderr == ""
    if name.startswith(("slurm", "sweep")) and code == 0:
        header = [line for line in stdout.splitlines() if line.startswith("#SBATCH")]
        assert "pwned" not in "".join(header) and all(" " not in line[8:] for line in header)


@pytest.mark.parametrize("name, flag", [
    ("slurm-job-name-newline", "--job-name"), ("slurm-job-name", "--job-name"), ("slurm-account", "--account"),
    ("slurm-time", "--time"), ("tpu-workdir-newline", "--workdir"), ("tpu-tpu", "--tpu"), ("tpu-zone", "--zone"),
    ("tpu-project", "--project"), ("tpu-log-newline", "--log"), ("tpu-mixlm-unbalanced", "--mixlm"),
    ("sweep-job-name", "--job-name"), ("slurm-command-newline", "the command after --"),
    ("tpu-install-ref", "--install-ref"), ("tpu-install-ref-option", "--install-ref"), ("tpu-wheel-newline", "--wheel"),
    ("tpu-accelerator-type", "--accelerator-type"), ("tpu-runtime-version-option", "--runtime-version"),
    ("tpu-queued-resource", "--queued-resource"), ("tpu-spot-without-create", "--spot"), ("sweep-swarm-twice", "--swarm"),
])
def test_values_that_cannot_be_placed_are_refused_naming_the_flag(name, flag, capsys):
    code, _, stderr, _ = _launch_transcript(GOLDEN_CASES[name], capsys)
    assert code == 2 and f": {flag} " in stderr


def _fake_tool(bin_dir: Path, name: str, body: str = "") -> Path:
    """An executable BIN_DIR/NAME that appends {"tool", "argv", "cwd"} to $FAKE_LOG, then runs `body`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!{sys.executable}\nimport json, os, subprocess, sys\n"
                    f"with open(os.environ['FAKE_LOG'], 'a') as f:\n"
                    f"    f.write(json.dumps({{'tool': {name!r}, 'argv': sys.argv[1:], 'cwd': os.getcwd()}}) + '\\n')\n"
                    + body)
    path.chmod(0o755)
    return path


def _calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _hostile(marker: Path) -> str:
    """Shell syntax of every kind, each part creating `marker` if a shell ever runs it."""
    return f"""x'; touch {marker}; echo "$(touch {marker})" `touch {marker}` \\"""


def test_a_hostile_sbatch_script_runs_only_the_legit_command(tmp_path, monkeypatch, capsys):
    """`mixlm launch slurm --out ... --submit` with hostile --workdir, --mixlm, --out and command, submitted to
    a fake sbatch that runs the script with bash, whose srun records its argv: srun gets exactly the
    arguments asked for, in the asked-for folder, and no injected command ever runs."""
    marker, log, bin_dir = tmp_path / "pwned", tmp_path / "calls.jsonl", tmp_path / "bin"
    hostile = _hostile(marker)
    workdir = tmp_path / f"work {hostile}"
    workdir.mkdir(parents=True)
    _fake_tool(bin_dir, "srun")
    _fake_tool(bin_dir, "sbatch", "sys.exit(subprocess.call(['bash', sys.argv[-1]]))\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    out = tmp_path / f"job {hostile}.sbatch"
    executable = f".venv/bin/mixlm '{hostile.replace(chr(39), '')}'"
    command = ["train", hostile, f"train.output_dir={hostile}"]
    args = ["--nodes", "1", "--gpus-per-node", "2", "--workdir", str(workdir), "--mixlm", executable,
            "--out", str(out), "--submit", "--", *command]
    assert main(["launch", "slurm", *args]) == 0, capsys.readouterr().err
    sbatch, srun = _calls(log)
    assert sbatch["argv"] == [str(out)]
    assert srun["argv"] == ["--kill-on-bad-exit=1", *shlex.split(executable), *command, "--distributed"]
    assert Path(srun["cwd"]) == workdir
    assert not marker.exists()
    # a newline in an #SBATCH value is refused before anything is written or submitted
    log.unlink()
    assert main(["launch", "slurm", *args[:-5], "--job-name", "x\ntouch " + str(marker),
                 "--out", str(tmp_path / "other.sbatch"), "--submit", "--", *command]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--job-name" in err
    assert not (tmp_path / "other.sbatch").exists() and not log.exists() and not marker.exists()


def test_a_hostile_sweep_array_task_runs_only_the_legit_command(tmp_path):
    marker, log = tmp_path / "pwned", tmp_path / "calls.jsonl"
    hostile = _hostile(marker)
    workdir = tmp_path / f"w {hostile}"
    _fake_tool(workdir / ".venv" / "bin", "mixlm")
    command = ["sweep", hostile, "--mixtures", hostile, "--out", "s/"]
    script = tmp_path / "array.sbatch"
    script.write_text(sweep_array_script(command, shards=2, workdir=str(workdir)))
    done = subprocess.run(["bash", str(script)], env=dict(os.environ, SLURM_ARRAY_TASK_ID="1", FAKE_LOG=str(log)),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    (call,) = _calls(log)
    assert call["argv"] == [*command, "--parallel", "1", "--shard", "1/2"] and Path(call["cwd"]) == workdir
    assert not marker.exists()


def test_hostile_tpu_commands_run_only_the_legit_command(tmp_path, monkeypatch, capsys):
    """`mixlm launch tpu --setup` (and --log) against a fake gcloud that `bash -c`s its --command in a fake
    worker's home: make, pip and mixlm run with the arguments asked for, in WORKDIR (~/ expanded to
    $HOME), and no injected command runs."""
    marker, log, bin_dir, home = tmp_path / "pwned", tmp_path / "calls.jsonl", tmp_path / "bin", tmp_path / "home"
    hostile = _hostile(marker)
    workdir = home / f"my dir {hostile}"
    for tool in ("mixlm", "pip"):
        _fake_tool(workdir / ".venv" / "bin", tool)
    _fake_tool(bin_dir, "make")
    _fake_tool(bin_dir, "gcloud", "home = os.environ['FAKE_HOME']\n"
                                  "command = sys.argv[sys.argv.index('--command') + 1]\n"
                                  "sys.exit(subprocess.call(['bash', '-c', command], cwd=home,"
                                  " env=dict(os.environ, HOME=home)))\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_HOME", str(home))
    executable = f".venv/bin/mixlm '{hostile.replace(chr(39), '')}'"
    command = ["train", hostile, f"train.output_dir={hostile}"]
    args = ["--tpu", "pod", "--zone", "us-central2-b", "--workdir", f"~/{workdir.relative_to(home)}",
            "--mixlm", executable]
    assert main(["launch", "tpu", *args, "--setup", "--", *command]) == 0, capsys.readouterr()
    gcloud_setup, make, pip, gcloud_run, mixlm = _calls(log)
    assert gcloud_setup["argv"][:7] == ["compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=us-central2-b",
                                        "--worker=all"]
    assert make["argv"] == ["install"] and pip["argv"] == ["install", "-e", ".[tpu]"]
    assert mixlm["argv"] == [*shlex.split(executable)[1:], *command, "--distributed"]
    assert {Path(c["cwd"]) for c in (make, pip, mixlm)} == {workdir}
    assert gcloud_run["tool"] == "gcloud" and not marker.exists()
    # detached (--log): nohup in the background, the log next to the repo, named per host
    log.unlink()
    log_name = f"run {_hostile(Path('pwned'))}.log"  # a file name: its injected parts would touch ./pwned
    assert main(["launch", "tpu", *args, "--log", log_name, "--", *command]) == 0
    for _ in range(100):  # the background process
        if len(_calls(log)) == 2:
            break
        time.sleep(0.1)
    assert _calls(log)[1]["argv"] == mixlm["argv"]
    assert [p.name for p in workdir.glob("run *.log.*")] == [f"{log_name}.{socket.gethostname()}"]
    assert not marker.exists() and not any(p.name == "pwned" for p in tmp_path.rglob("*"))


def test_a_created_slice_is_installed_at_a_ref_run_per_worker_and_deleted_even_when_a_worker_fails(
        tmp_path, monkeypatch, capsys):
    """`mixlm launch tpu --create ... --install-ref --delete-on-exit` against a fake gcloud: the TPU VM is not
    found, so the queued resource is created and polled until ACTIVE; each worker clones and checks out the
    ref (git, make, pip and mixlm are fakes in the worker's home) with hostile --repo and command; one ssh
    per worker, every line prefixed [w<i>]; worker 1 fails, the launch fails with its code, the queued
    resource is deleted all the same, and no injected command ever runs."""
    from launch import tpu as launch_tpu

    marker, log, bin_dir, home = tmp_path / "pwned", tmp_path / "calls.jsonl", tmp_path / "bin", tmp_path / "home"
    hostile = _hostile(marker)
    workdir = home / "mixlm"
    _fake_tool(workdir / ".venv" / "bin", "pip")
    _fake_tool(workdir / ".venv" / "bin", "mixlm", "print('hello from', os.environ['WORKER'], flush=True)\n"
                                                     "sys.exit(3 if os.environ['WORKER'] == '1' else 0)\n")
    _fake_tool(bin_dir, "make")
    _fake_tool(bin_dir, "git", "if sys.argv[1] == 'clone':\n    os.makedirs(os.path.join(sys.argv[-1], '.git'))\n")
    _fake_tool(bin_dir, "gcloud", "home = os.environ['FAKE_HOME']\n"
                                  "if sys.argv[3:5] == ['tpu-vm', 'describe']:\n    sys.exit(1)\n"
                                  "if sys.argv[3:5] == ['queued-resources', 'describe']:\n    print('ACTIVE')\n"
                                  "if '--command' in sys.argv:\n"
                                  "    worker = [a for a in sys.argv if a.startswith('--worker=')][0][9:]\n"
                                  "    sys.exit(subprocess.call(['bash', '-c', sys.argv[sys.argv.index('--command') + 1]],"
                                  " cwd=home, env=dict(os.environ, HOME=home, WORKER=worker)))\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_HOME", str(home))
    monkeypatch.setattr(launch_tpu, "POLL_S", 0.0)
    command = ["train", hostile, f"train.output_dir={hostile}"]
    repo = f"https://example.com/{hostile}"
    code = main(["launch", "tpu", "--tpu", "pod", "--zone", "us-east5-a", "--create", "--accelerator-type", "v4-16",
                 "--install-ref", "v1.2", "--repo", repo, "--delete-on-exit", "--", *command])
    out = capsys.readouterr().out
    assert code == 3, out
    calls = _calls(log)
    gcloud = [c["argv"][:4] for c in calls if c["tool"] == "gcloud"]
    assert gcloud[:4] == [["compute", "tpus", "tpu-vm", "describe"], ["compute", "tpus", "queued-resources", "create"],
                          ["compute", "tpus", "queued-resources", "describe"], ["compute", "tpus", "tpu-vm", "ssh"]]
    assert gcloud[-1] == ["compute", "tpus", "queued-resources", "delete"]
    git = [c["argv"] for c in calls if c["tool"] == "git"]
    assert git == [["clone", "--quiet", "--", repo, str(workdir)], ["fetch", "--quiet", "--", repo, "v1.2"],
                   ["checkout", "--quiet", "--detach", "FETCH_HEAD"]]
    runs = [c for c in calls if c["tool"] == "mixlm"]
    assert len(runs) == 2 and all(c["argv"] == [*command, "--distributed"] for c in runs)
    assert {Path(c["cwd"]) for c in runs} == {workdir}
    assert "[w0] hello from 0" in out and "[w1] hello from 1" in out and "[w1] exited with 3" in out
    assert not marker.exists()


def test_a_job_array_of_swarms_passes_swarm_and_no_parallel(tmp_path):
    """Each array task runs `mixlm sweep BASE --mixtures M --out O --swarm K --shard I/N`: a swarm trains its
    members in one program, so no --parallel is added, whether --swarm comes from the launcher or the command."""
    cmd = ["sweep", "b.yaml", "--mixtures", "m/", "--out", "s/"]
    for script in (sweep_array_script(cmd, shards=4, workdir="/w", swarm=8),
                   sweep_array_script([*cmd, "--swarm", "8"], shards=4, workdir="/w")):
        run = [line for line in script.splitlines() if line.startswith(".venv/bin/mixlm")]
        assert run == ['.venv/bin/mixlm sweep b.yaml --mixtures m/ --out s/ --swarm 8 --shard "$SLURM_ARRAY_TASK_ID/4"']
    with pytest.raises(ConfigError, match="--swarm -1"):
        sweep_array_script(cmd, shards=4, workdir="/w", swarm=-1)


def test_workers_of_a_slice_type():
    from launch.tpu import workers_for

    assert [workers_for(t) for t in ("v5p-32", "v4-8", "v4-32", "v5litepod-8", "v5litepod-16", "v6e-256")] == \
        [4, 1, 4, 1, 4, 64]
    assert workers_for("v9-8") is None


def test_tilde_is_expanded_explicitly_and_only_at_the_start():
    (run,) = tpu_commands(["train", "c.yaml"], tpu="pod", zone="z", workdir="~/a b")
    assert run[-1].startswith("""cd "$HOME"/'a b' && """)
    (run,) = tpu_commands(["train", "c.yaml"], tpu="pod", zone="z", workdir="/x/~/y")
    assert run[-1].startswith("cd '/x/~/y' && ")  # quoted: no shell expands it
    assert "cd \"$HOME\"\n" in slurm_script(["train", "c.yaml"], nodes=1, gpus_per_node=1, workdir="~")
    with pytest.raises(ConfigError, match="only a leading ~/ is expanded"):
        tpu_commands(["train", "c.yaml"], tpu="pod", zone="z", workdir="~root/x")


# --- a dead process is noticed at once; a process whose peer died exits on the heartbeat ---

WORKER = """import os, pathlib, signal, sys, time
folder, ignore_term, index = pathlib.Path(sys.argv[1]), sys.argv[2] == "ignore", sys.argv[3]
def on_term(*_):
    (folder / f"term{index}").touch()
    if not ignore_term:
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
(folder / f"ready{index}").write_text(str(os.getpid()))
print("working", flush=True)
while True:
    time.sleep(0.05)
"""


def _run_in_thread(commands, **kwargs):
    result, out = {}, io.StringIO()

    def target():
        result["code"] = run_processes(commands, out=out, **kwargs)
        result["at"] = time.monotonic()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result, out


@pytest.mark.parametrize("p0_ignores_sigterm", [False, True])
def test_a_killed_process_1_is_noticed_and_the_others_are_stopped(tmp_path, p0_ignores_sigterm):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    modes = ["ignore" if p0_ignores_sigterm else "exit", "exit"]
    commands = [[sys.executable, str(script), str(tmp_path), mode, str(i)] for i, mode in enumerate(modes)]
    thread, result, out = _run_in_thread(commands, stop_grace_s=1.0)
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(list(tmp_path.glob("ready*"))) == 2, out.getvalue()
    os.kill(int((tmp_path / "ready1").read_text()), signal.SIGKILL)
    killed_at = time.monotonic()
    thread.join(timeout=30)
    assert "code" in result, "run_processes did not return"
    assert result["at"] - killed_at < 5
    assert result["code"] == 128 + signal.SIGKILL
    assert "[p1] exited with -9; stopping the others" in out.getvalue()
    assert [p.name for p in tmp_path.glob("term*")] == ["term0"]  # p0 got SIGTERM (and, ignoring it, a kill)


FOLLOWER = """import os, sys, time
marker = sys.argv[1]
while not os.path.exists(marker):
    time.sleep(0.0005)
pid = open(marker).read()
while True:  # until the leader is dead (a zombie, or gone)
    try:
        if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
            break
    except OSError:
        break
    time.sleep(0.0005)
time.sleep(0.02)
os.abort()  # as a jax.distributed peer aborts on a broken collective
"""
LEADER = """import os, signal, sys, time
time.sleep(0.2)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_process_that_died_first_is_named_though_a_peer_aborts_20ms_later(tmp_path):
    """Process 1 is killed; process 0, like a peer whose collective broke, aborts 20 ms after it: both are dead
    before the next poll could tell them apart, and the launcher must still name process 1 (a poll of every
    process named the lowest index: process 0's SIGABRT, exit 134, hiding the kill). Four rounds."""
    for round_ in range(4):
        marker = tmp_path / f"leader-dead-{round_}"
        commands = [[sys.executable, "-c", FOLLOWER, str(marker)], [sys.executable, "-c", LEADER, str(marker)]]
        out = io.StringIO()
        code = run_processes(commands, out=out, stop_grace_s=1.0)
        assert (code, out.getvalue()) == (128 + signal.SIGKILL, "[p1] exited with -9; stopping the others\n"), round_


def _pids_with(*parts: str) -> list[int]:
    """Processes whose command line holds every one of `parts` as an argument (read from /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:  # it ended meanwhile
            continue
        if all(part.encode() in args for part in parts):
            pids.append(int(cmdline.parent.name))
    return pids


def test_launch_local_notices_a_killed_train_process_and_stops_the_others(config, tmp_path):
    """launch_local itself (its commands, its environment, run_processes) on two real `mixlm train` processes:
    SIGKILL process 1 once training runs; the launch names it, returns 128+9 within a poll plus the stop
    grace it was given (process 0, whose peer is dead, cannot finish its SIGTERM checkpoint and is killed), and
    leaves no process behind."""
    out_dir, printed, result = tmp_path / "run", io.StringIO(), {}
    argv = ["--", "train", str(config), f"train.output_dir={out_dir}", "train.steps=100000",
            "checkpoint.save_at_end=false", "train.heartbeat_timeout_s=600"]

    def target():
        result["code"] = launch_local(argv, 2, cpu_devices=4, env=dict(os.environ, XLA_FLAGS=xla_flags(4)),
                                      out=printed, stop_grace_s=2.0)
        result["at"] = time.monotonic()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    metrics, deadline = out_dir / "metrics.jsonl", time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline and thread.is_alive(), printed.getvalue()[-3000:]
        time.sleep(0.2)
    (p1,) = _pids_with(f"train.output_dir={out_dir}", "--process-id", "1")
    os.kill(p1, signal.SIGKILL)
    killed_at = time.monotonic()
    thread.join(timeout=60)
    assert "code" in result, "launch_local did not return"
    took = result["at"] - killed_at
    assert result["code"] == 128 + signal.SIGKILL and took < 2.0 + 5, (result, took)
    text = printed.getvalue()
    assert "[p1] exited with -9; stopping the others" in text
    assert "[p0] mixlm train: " in text  # p0's own output, prefixed
    assert not _pids_with(f"train.output_dir={out_dir}")  # both processes are gone


def test_heartbeat_timeout_reaches_distributed_initialize(config, monkeypatch, capsys):
    calls = []

    class Stop(Exception):
        pass

    def initialize(**kwargs):
        calls.append(kwargs)
        raise Stop

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    for extra in (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "1"], ["--distributed"]):
        with pytest.raises(Stop):
            main(["train", str(config), "train.heartbeat_timeout_s=7", *extra])
    assert calls == [{"coordinator_address": "127.0.0.1:1", "num_processes": 2, "process_id": 1,
                      "heartbeat_timeout_seconds": 7}, {"heartbeat_timeout_seconds": 7}]
    assert main(["train", str(config), "train.heartbeat_timeout_s=0"]) == 2
    assert "train.heartbeat_timeout_s=0 is out of range: must be >= 1" in capsys.readouterr().err
    assert load_config(str(config)).train.heartbeat_timeout_s == 100  # jax's own default


def test_a_process_whose_peer_died_exits_on_the_heartbeat(config, tmp_path):
    """Two real `mixlm train` processes with train.heartbeat_timeout_s=5: SIGKILL process 1 once training
    runs, and process 0 exits non-zero in seconds (the coordination service's heartbeat), not after the
    collective timeouts (30 minutes in these tests)."""
    port, out_dir = free_port(), tmp_path / "run"
    env = local_env(4, dict(os.environ, XLA_FLAGS=xla_flags(4)))
    logs = [open(tmp_path / f"p{i}.log", "w") for i in range(2)]  # noqa: SIM115
    procs = [subprocess.Popen(
        [sys.executable, "-m", "mixlm.cli", "train", str(config), f"train.output_dir={out_dir}",
         "train.steps=100000", "train.heartbeat_timeout_s=5", "checkpoint.save_at_end=false",
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=env, stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
    try:
        deadline = time.monotonic() + 240
        metrics = out_dir / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert time.monotonic() < deadline and procs[0].poll() is None, (tmp_path / "p0.log").read_text()[-3000:]
            time.sleep(0.2)
        procs[1].kill()
        killed_at = time.monotonic()
        code = procs[0].wait(timeout=60)
        took = time.monotonic() - killed_at
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for f in logs:
            f.close()
    print(f"process 0 exited {code}, {took:.1f} s after process 1 was killed")
    assert code != 0
    assert took < 30, f"process 0 took {took:.0f} s"
