"""End to end on the demo corpus: sample 8 mixtures → 8 short proxy runs → fit → optimize → a mixture
YAML that trains. The target is an eval-only domain (`eval.domains`) that no run trains on, as in RegMix.
Also: a rerun of the sweep skips finished runs."""

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from launch.sweep import sweep_array_script
from mixlm.cli import main
from mixlm.data.demo_corpus import GENERATORS, prepare_demo_data
from mixlm.data.tokenizer import load_tokenizer_spec
from mixlm.errors import ConfigError
from mixlm.mixing import load_prior, mixtures_table, read_csv, sample_mixtures, write_csv
from mixlm.sweep import shard_of


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    data = prepare_demo_data(root / "data", docs_per_domain=150, vocab_size=320, target_domains=("office",))
    vocab = load_tokenizer_spec(str(data["tokenizer"])).vocab_size
    base = root / "proxy.yaml"
    base.write_text(yaml.safe_dump({
        "model": {"family": "llama", "num_layers": 1, "d_model": 32, "num_heads": 2, "mlp_dim": 64,
                  "vocab_size": vocab, "max_seq_len": 32, "vocab_multiple": 8},
        "data": {"source": "prepared", "prepared_dir": str(data["prepared"]), "seq_len": 32,
                 "mixture": {"arithmetic": 1.0}},
        "optimizer": {"lr": 1e-2},
        "schedule": {"kind": "constant", "warmup_steps": 2},
        "train": {"steps": 6, "global_batch_size": 8},
        "eval": {"batches": 1, "domains": ["office"]},
        "logging": {"every": 3, "tensorboard": False, "progress": False},
        "checkpoint": {"every": 0, "save_at_end": False},
    }))
    return root, data, base


def test_sweep_fit_optimize_train(demo, capsys):
    root, data, base = demo
    prior = load_prior(data["prepared"], domains=sorted(GENERATORS))  # the target is never mixed in
    assert "office" in load_prior(data["prepared"]).domains and "office" not in prior.domains
    mixtures = sample_mixtures(prior, 8, seed=0)
    write_csv(root / "mixtures.csv", mixtures_table(mixtures, prior.domains))

    sweep = root / "sweep"
    command = ["sweep", str(base), "--mixtures", str(root / "mixtures.csv"), "--out", str(sweep), "--parallel", "0"]
    assert main(command) == 0
    results = read_csv(sweep / "results.csv")
    assert sorted(results.index_N.tolist()) == list(range(1, 9))
    assert "office" not in results.weight_columns()
    losses = results.select([f"metric/{d}_val_loss" for d in [*prior.domains, "office"]])
    assert all(math.isfinite(x) and x > 0 for x in losses.ravel())
    # each run trained on its own mixture: the config each run trained with (config.yaml, written by train()
    # from the config its data source was built from, not the table results.csv copies its weights from) holds
    # its own row of the table, and no two runs share one
    for index, mixture in enumerate(mixtures, start=1):
        run_dir = sweep / "runs" / f"{index:04d}"
        trained = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["mixture"]
        assert trained == pytest.approx({d: mixture.get(d, 0.0) for d in prior.domains}, rel=1e-9), index
    assert len({json.dumps(yaml.safe_load((sweep / "runs" / f"{i:04d}" / "config.yaml").read_text())["data"]
                           ["mixture"], sort_keys=True) for i in range(1, 9)}) == 8

    # a rerun finds every run finished and trains nothing: it says so, starts no run, rewrites no run's
    # metrics log and leaves results.csv as it was
    def metrics_logs():  # run -> (mtime, text) of its metrics.jsonl
        return {p.parent.name: (p.stat().st_mtime_ns, p.read_text()) for p in (sweep / "runs").glob("*/metrics.jsonl")}

    trained = metrics_logs()
    assert len(trained) == 8
    recorded = (sweep / "results.csv").read_text()
    capsys.readouterr()
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "sweep: 8 runs, 8 finished before, 0 to run" in printed
    assert "sweep: run " not in printed  # the line each run that trains (or is recorded) prints
    assert metrics_logs() == trained
    assert (sweep / "results.csv").read_text() == recorded
    assert len(read_csv(sweep / "results.csv")) == 8
    # "is this run done?" is its result.json alone: a torn metrics.jsonl (a writer killed mid-line) and a lost
    # results.csv change nothing; results.csv is derived again, the same
    torn = sweep / "runs" / "0003" / "metrics.jsonl"
    torn.write_text(torn.read_text() + '{"step": 7, "lo')
    trained = metrics_logs()
    (sweep / "results.csv").unlink()
    assert main(command) == 0
    assert (sweep / "results.csv").read_text() == recorded and metrics_logs() == trained
    assert all(json.loads((sweep / "runs" / f"{i:04d}" / "result.json").read_text())["status"] == "finished"
               for i in range(1, 9))
    # another config on the finished runs: kept as they are (each proxy.yaml still says what it trained), and
    # the sweep says so instead of skipping them silently
    capsys.readouterr()
    assert main([*command, "optimizer.lr=0.02"]) == 0
    assert f"sweep: runs {list(range(1, 9))} finished with another config" in capsys.readouterr().out
    assert metrics_logs() == trained and (sweep / "results.csv").read_text() == recorded
    assert yaml.safe_load((sweep / "runs" / "0001" / "proxy.yaml").read_text())["optimizer"]["lr"] == 1e-2

    assert main(["mix", "fit", "--mixtures", str(root / "mixtures.csv"), "--results", str(sweep / "results.csv"),
                 "--target", "metric/office_val_loss", "--out", str(root / "fit"),
                 "--regressors", "linear,loglinear", "--folds", "4"]) == 0
    best = root / "best.yaml"
    assert main(["mix", "optimize", "--model", str(root / "fit"), "--prior", str(data["prepared"]),
                 "--out", str(best), "--samples", "2000", "--top-k", "16"]) == 0
    weights = yaml.safe_load(best.read_text())
    # the prepared folder's prior also holds the target: optimize narrows it to the model's domains
    assert set(weights) <= set(prior.domains) and sum(weights.values()) == pytest.approx(1.0, abs=1e-6)

    assert main(["train", str(base), f"data.mixture={best}", "train.steps=2",
                 f"train.output_dir={root / 'best_run'}"]) == 0
    assert (root / "best_run" / "metrics.jsonl").is_file()


def test_failed_runs_end_the_sweep_in_one_line_and_exit_3(demo, tmp_path, capsys):
    """Every run goes non-finite (lr 1e30, no clipping): each is tried (the first failure does not stop the
    sweep), none gets a row, and the sweep ends in one line naming them and exit 3, not a traceback."""
    _, data, base = demo
    prior = load_prior(data["prepared"], domains=sorted(GENERATORS))
    write_csv(tmp_path / "mixtures.csv", mixtures_table(sample_mixtures(prior, 2, seed=4), prior.domains))
    rc = main(["sweep", str(base), "optimizer.lr=1e30", "optimizer.clip_norm=0.0", "train.steps=2", "--mixtures",
               str(tmp_path / "mixtures.csv"), "--out", str(tmp_path / "sweep"), "--parallel", "0"])
    out, err = capsys.readouterr()
    assert rc == 3 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("mixlm sweep: runs [1, 2] failed (run 1: param_norm is inf"), err
    assert "sweep summary: 0 of 2 runs finished" in out
    assert len(read_csv(tmp_path / "sweep" / "results.csv")) == 0


def test_a_slurm_array_sweep_trains_shards_then_one_pass_records_them(demo, tmp_path):
    """The job-array script run as its two tasks would run (SLURM_ARRAY_TASK_ID 0 and 1): each trains its
    shard and leaves results.csv alone; the plain sweep afterwards records all without training again."""
    _, data, base = demo
    prior = load_prior(data["prepared"], domains=sorted(GENERATORS))
    write_csv(tmp_path / "mixtures.csv", mixtures_table(sample_mixtures(prior, 4, seed=1), prior.domains))
    sweep = tmp_path / "sweep"
    command = ["sweep", str(base), "--mixtures", str(tmp_path / "mixtures.csv"), "--out", str(sweep),
               "--parallel", "0"]
    script = tmp_path / "array.sbatch"
    script.write_text(sweep_array_script(command, shards=2, workdir=os.getcwd(), gpus_per_task=0,
                                         executable=f"{sys.executable} -m mixlm.cli"))
    assert "#SBATCH --array=0-1" in script.read_text()
    for task in range(2):
        done = subprocess.run(["bash", str(script)], env=dict(os.environ, SLURM_ARRAY_TASK_ID=str(task)),
                              capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert f"shard {task}/2: 2 runs trained" in done.stdout
        assert not (sweep / "results.csv").exists()
    trained = {p.name: (p / "metrics.jsonl").stat().st_mtime_ns for p in (sweep / "runs").iterdir()}
    assert sorted(trained) == ["0001", "0002", "0003", "0004"]
    assert main(command) == 0
    assert sorted(read_csv(sweep / "results.csv").index_N.tolist()) == [1, 2, 3, 4]
    assert {p.name: (p / "metrics.jsonl").stat().st_mtime_ns for p in (sweep / "runs").iterdir()} == trained
    with pytest.raises(ConfigError, match="--shard '2/2'"):
        shard_of(read_csv(tmp_path / "mixtures.csv"), "2/2")


def test_worker_envs_give_each_gpu_worker_its_own_devices():
    from mixlm.worker_devices import detect_accelerator, visible_gpus, worker_envs

    gpus = [str(i) for i in range(8)]
    assert worker_envs(2, "cpu") == [{}, {}]  # CPU: today's behaviour, workers share the host
    assert worker_envs(0, "gpu", gpus) == []  # in this process: nothing to assign
    assert worker_envs(4, "gpu", gpus) == [{"CUDA_VISIBLE_DEVICES": f"{2 * i},{2 * i + 1}"} for i in range(4)]
    assert worker_envs(8, "gpu", gpus) == [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(8)]
    assert worker_envs(1, "gpu", ["3", "5"]) == [{"CUDA_VISIBLE_DEVICES": "3,5"}]  # the visible ids, not 0..G-1
    # more workers than GPUs: each GPU shared by the same number of workers, each capped to its share
    shared = worker_envs(8, "gpu", ["0", "1", "2", "3"])
    assert [e["CUDA_VISIBLE_DEVICES"] for e in shared] == ["0", "1", "2", "3"] * 2
    assert {e["XLA_PYTHON_CLIENT_MEM_FRACTION"] for e in shared} == {"0.45"}
    with pytest.raises(ConfigError, match=r"8 GPUs do not split evenly over 3 workers; use one of \[1, 2, 4, 8\]"):
        worker_envs(3, "gpu", gpus)
    with pytest.raises(ConfigError, match="must be a multiple of 4"):
        worker_envs(6, "gpu", ["0", "1", "2", "3"])
    with pytest.raises(ConfigError, match="no GPUs found"):
        worker_envs(2, "gpu", [])
    with pytest.raises(ConfigError, match="on TPU one process owns all of a host's chips"):
        worker_envs(2, "tpu")
    assert worker_envs(1, "tpu") == [{}]

    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 5"}) == ["2", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert detect_accelerator({"JAX_PLATFORMS": "cpu"}) == "cpu"
    assert detect_accelerator({"JAX_PLATFORMS": "cuda"}) == "gpu"
    assert detect_accelerator({"JAX_PLATFORMS": "tpu"}) == "tpu"
    assert detect_accelerator({"TPU_ACCELERATOR_TYPE": "v5p-32"}) == "tpu"


def test_a_parallel_tpu_sweep_is_refused_before_any_run(demo, tmp_path, capsys):
    _, data, base = demo
    prior = load_prior(data["prepared"], domains=sorted(GENERATORS))
    write_csv(tmp_path / "mixtures.csv", mixtures_table(sample_mixtures(prior, 2, seed=3), prior.domains))
    assert main(["sweep", str(base), "--mixtures", str(tmp_path / "mixtures.csv"), "--out", str(tmp_path / "sweep"),
                 "--parallel", "2", "--accelerator", "tpu"]) == 2
    assert "one process owns all of a host's chips" in capsys.readouterr().err
    assert not (tmp_path / "sweep" / "runs" / "0001" / "train.log").exists()


def test_parallel_2_runs_two_worker_processes_each_on_its_own_gpu(demo, tmp_path, monkeypatch):
    """Two real worker processes at once; --accelerator gpu --gpus 0,1 on this CPU host (JAX_PLATFORMS=cpu is
    inherited, so they train on CPU) checks the env each worker is started with."""
    import mixlm.proxies as proxies_module

    _, data, base = demo
    prior = load_prior(data["prepared"], domains=sorted(GENERATORS))
    write_csv(tmp_path / "mixtures.csv", mixtures_table(sample_mixtures(prior, 2, seed=2), prior.domains))
    started = []
    real_popen = subprocess.Popen

    def recording_popen(command, **kwargs):
        started.append(kwargs["env"])
        return real_popen(command, **kwargs)

    monkeypatch.setattr(proxies_module.subprocess, "Popen", recording_popen)
    sweep = tmp_path / "sweep"
    assert main(["sweep", str(base), "train.steps=2", "logging.every=1", "--mixtures", str(tmp_path / "mixtures.csv"),
                 "--out", str(sweep), "--parallel", "2", "--accelerator", "gpu", "--gpus", "0,1"]) == 0
    assert sorted(read_csv(sweep / "results.csv").index_N.tolist()) == [1, 2]
    assert len(started) == 2 and sorted(env["CUDA_VISIBLE_DEVICES"] for env in started) == ["0", "1"]
    assert all(env["JAX_PLATFORMS"] == "cpu" and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in env for env in started)
    heads = sorted((sweep / "runs" / r / "train.log").read_text().splitlines()[0] for r in ("0001", "0002"))
    assert heads == ["mixlm sweep: worker 0: CUDA_VISIBLE_DEVICES=0", "mixlm sweep: worker 1: CUDA_VISIBLE_DEVICES=1"]
