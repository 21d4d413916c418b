"""launch/ray.py (`mixlm launch ray`): the SLURM script starts a Ray head and workers and runs the data stage with
--engine ray on the head's address; on a pod's hosts every host starts Ray, the stage runs on the head and Ray
is stopped everywhere even when the stage fails. Hostile values are quoted or refused: the script and the
commands, run against fake scontrol/srun/ssh/ray/mixlm, call mixlm with exactly the asked-for arguments and no
injected command ever runs; usage errors are one line and exit code 2."""

from __future__ import annotations

import os
import subprocess

import pytest
from test_launch import _calls, _fake_tool, _hostile

from launch.ray import check_data_command, pod_commands, run_pod, slurm_script
from mixlm.cli import main
from mixlm.errors import ConfigError


def test_the_slurm_script_runs_the_stage_on_the_head_with_the_engine_flags(tmp_path):
    """The script under bash, with fake scontrol (3 nodes), srun (says the head's IP) and ray / mixlm in a hostile
    --workdir: Ray starts once as head and on each other node, and mixlm gets the command, then --engine ray
    --ray-address HEAD_IP:PORT, in --workdir; nothing injected runs."""
    marker, log, bin_dir = tmp_path / "pwned", tmp_path / "calls.jsonl", tmp_path / "bin"
    hostile = _hostile(marker)
    workdir = tmp_path / f"work {hostile}"
    _fake_tool(bin_dir, "scontrol", "print('n1\\nn2\\nn3')\n")
    _fake_tool(bin_dir, "srun", "print('10.1.2.3 fe80::1') if 'hostname' in sys.argv else None\n")
    _fake_tool(workdir / ".venv" / "bin", "ray", "print('node_a\\nnode_b\\nnode_c') if 'status' in sys.argv else None\n")
    _fake_tool(workdir / ".venv" / "bin", "mixlm")
    command = ["prepare", "--out", hostile, "--domain", f"web={hostile}"]
    script = tmp_path / "job.sbatch"
    script.write_text(slurm_script(command, nodes=3, cpus_per_node=16, gpus_per_node=2, workdir=str(workdir),
                                   port=6380))
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log),
               SLURM_JOB_NODELIST="n[1-3]")
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    calls = _calls(log)
    starts = [c["argv"] for c in calls if c["tool"] == "srun" and "start" in c["argv"]]
    assert len(starts) == 3 and sum("--head" in a for a in starts) == 1
    assert all("--num-cpus=16" in a and "--num-gpus=2" in a for a in starts)
    assert sorted(a[a.index("-w") + 1] for a in starts) == ["n1", "n2", "n3"]
    (stage,) = [c for c in calls if c["tool"] == "mixlm"]
    assert stage["argv"] == [*command, "--engine", "ray", "--ray-address", "10.1.2.3:6380"]
    assert stage["cwd"] == str(workdir)
    assert not marker.exists()


def _fake_ssh(bin_dir, homes):
    """ssh HOST LINE: runs LINE with bash in HOST's folder under `homes` (as HOME)."""
    return _fake_tool(bin_dir, "ssh", f"home = os.path.join({str(homes)!r}, sys.argv[1])\n"
                                      "os.makedirs(home, exist_ok=True)\n"
                                      "sys.exit(subprocess.call(['bash', '-c', sys.argv[2]], cwd=home, "
                                      "env=dict(os.environ, HOME=home)))\n")


@pytest.mark.parametrize("stage_fails", [False, True])
def test_a_pods_hosts_start_ray_run_the_stage_on_the_head_and_always_stop(stage_fails, tmp_path, monkeypatch,
                                                                          capsys):
    marker, log, bin_dir, homes = tmp_path / "pwned", tmp_path / "calls.jsonl", tmp_path / "bin", tmp_path / "hosts"
    hostile = _hostile(marker)
    folder = f"repo {hostile}"
    for host in ("g0", "g1", "g2"):
        _fake_tool(homes / host / folder / ".venv" / "bin", "ray")
        _fake_tool(homes / host / folder / ".venv" / "bin", "mixlm", "sys.exit(3)\n" if stage_fails else "")
    _fake_ssh(bin_dir, homes)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    command = ["select", "dedup", hostile, "--method", "minhash", "--out", hostile]
    code = main(["launch", "ray", "hosts", "--hosts", "g0,g1,g2", "--workdir", f"~/{folder}", "--", *command])
    assert code == (3 if stage_fails else 0), capsys.readouterr().err
    calls = [(c["tool"], c["argv"], os.path.relpath(c["cwd"], homes)) for c in _calls(log) if c["tool"] != "ssh"]
    assert calls[:3] == [("ray", ["start", "--head", "--port=6379"], f"g0/{folder}"),
                         ("ray", ["start", "--address=g0:6379"], f"g1/{folder}"),
                         ("ray", ["start", "--address=g0:6379"], f"g2/{folder}")]
    assert calls[3] == ("mixlm", [*command, "--engine", "ray", "--ray-address", "g0:6379"], f"g0/{folder}")
    assert calls[4:] == [("ray", ["stop"], f"{host}/{folder}") for host in ("g0", "g1", "g2")]
    assert not marker.exists()


def test_tpu_commands_start_the_head_on_worker_0_at_its_internal_ip():
    commands = pod_commands(["select", "signals", "a.jsonl", "--out", "s"],
                            lambda i, line: ["gcloud", f"--worker={i}", "--command", line], 3, "10.0.0.2", "~/mixlm",
                            head_is_ip=True)
    head = 'cd "$HOME"/mixlm && .venv/bin/ray start --head --port=6379 --node-ip-address=10.0.0.2'
    assert commands["head"] == [["gcloud", "--worker=0", "--command", head]]
    assert [c[1] for c in commands["workers"]] == ["--worker=1", "--worker=2"]
    assert commands["stage"][0][-1].endswith("--engine ray --ray-address 10.0.0.2:6379")
    ran = []
    assert run_pod(commands, dry_run=False, runner=lambda cmd: ran.append(cmd) or 0) == 0
    assert ran == commands["head"] + commands["workers"] + commands["stage"] + commands["stop"]


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "c.yaml"], "runs a data stage"),
    (["prepare", "--out", "o", "--engine", "local"], "--engine is set by the launcher"),
    (["select", "signals", "--ray-address=h:1"], "--ray-address is set by the launcher"),
])
def test_commands_that_are_no_data_stage_or_set_the_engine_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        check_data_command(argv)


@pytest.mark.parametrize(("args", "flag"), [
    (["slurm", "--nodes", "2", "--cpus-per-node", "8", "--workdir", "/w", "--job-name", "a b"], "--job-name"),
    (["hosts", "--hosts", "g0,-oProxyCommand=touch", "--workdir", "/w"], "--hosts"),
    (["tpu", "--tpu=--command=x", "--zone", "z", "--hosts", "2", "--workdir", "/w"], "--tpu"),
    (["hosts", "--hosts", "g0", "--workdir", "/w", "--port", "22"], "--port"),
])
def test_values_that_cannot_be_placed_are_refused_in_one_line(args, flag, capsys):
    assert main(["launch", "ray", *args, "--dry-run", "--", "prepare", "--out", "o"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0], err


def test_the_dry_run_prints_the_script_through_mixlm_launch(capsys):
    assert main(["launch", "ray", "slurm", "--nodes", "2", "--cpus-per-node", "8", "--workdir", "/w", "--dry-run",
                 "--", "select", "signals", "a.jsonl", "--out", "s"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash\n") and "--engine ray --ray-address \"$head_ip:$port\"" in out


def test_the_script_runs_by_path_from_anywhere(tmp_path):
    from test_launch import _script

    done = _script("ray", "hosts", "--hosts", "g0,g1", "--workdir", "/shared/my mixlm", "--dry-run", "--",
                   "tokenizer", "train", "--out", "tok", "--domain", "web=raw web/", cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.splitlines()[2] == ("ssh g0 'cd '\"'\"'/shared/my mixlm'\"'\"' && .venv/bin/mixlm tokenizer "
                                           "train --out tok --domain '\"'\"'web=raw web/'\"'\"' --engine ray "
                                           "--ray-address g0:6379'")
    assert list(tmp_path.iterdir()) == [] and _script("ray", "--help").returncode == 0
