"""Proxy swarms (mixlm.train with K member configs, `mixlm sweep --swarm K`): each member of a K = 4 swarm trains
as its own separate run would (per-step losses and validation losses), its data stream holds its mixture, a swarm
resumes bitwise, a member that goes non-finite is isolated, the member axis sharded over 8 fake devices equals one
device, and a swarm sweep writes the results.csv a sweep of single runs writes, also sharded and resumed. The
loop's hooks work per member (a mixture update, checkpoint.init_from and live lm-eval tasks in a swarm of 2 equal
the same in 2 single runs). A swarm spread over two jax.distributed processes (and a distributed `mixlm sweep
--swarm`) equals the one-process swarm and its checkpoint resumes on one process."""

import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml
from ports import launch

import mixlm.train as train_module
from mixlm.cli import main
from mixlm.config import load_config
from mixlm.data.demo_corpus import GENERATORS, prepare_demo_data
from mixlm.data.tokenizer import load_tokenizer_spec
from mixlm.hooks import MixtureUpdateHook, StopAtStep, default_hooks
from mixlm.members import member_mesh, member_source
from mixlm.mixing import load_prior, mixtures_table, read_csv, sample_mixtures, write_csv
from mixlm.sharding import make_mesh
from mixlm.sweep import shard_of
from mixlm.train import build_setup, train

MIXTURES = [
    {"arithmetic": 1.0, "code": 0.0, "prose": 0.0, "records": 0.0},
    {"arithmetic": 0.2, "code": 0.0, "prose": 0.5, "records": 0.3},
    {"arithmetic": 0.0, "code": 0.5, "prose": 0.5, "records": 0.0},
    {"arithmetic": 0.1, "code": 0.2, "prose": 0.3, "records": 0.4},
]
STEPS = 4
LR, EPS = 1e-2, 1e-3


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("swarm")
    data = prepare_demo_data(root / "data", docs_per_domain=150, vocab_size=320, target_domains=("office",))
    vocab = load_tokenizer_spec(str(data["tokenizer"])).vocab_size
    base = root / "proxy.yaml"
    base.write_text(yaml.safe_dump({
        "model": {"family": "llama", "num_layers": 1, "d_model": 32, "num_heads": 2, "mlp_dim": 64,
                  "vocab_size": vocab, "max_seq_len": 16, "vocab_multiple": 8},
        "data": {"source": "prepared", "prepared_dir": str(data["prepared"]), "seq_len": 16,
                 "mixture": {"arithmetic": 1.0}},
        # eps 1e-3, not 1e-8: see test_sharded_member_axis_equals_one_device (and tests/test_train.py)
        "optimizer": {"lr": LR, "eps": EPS},
        "schedule": {"kind": "constant", "warmup_steps": 2},
        "train": {"steps": STEPS, "global_batch_size": 8},
        "eval": {"batches": 1, "every": 2, "domains": ["office"]},
        "logging": {"every": 1, "tensorboard": False, "progress": False},
        "checkpoint": {"every": 0, "save_at_end": False},
    }))
    return root, data, base


def member_cfgs(demo, name: str, *overrides: str):
    """The four members (own mixture, data.seed and train.seed), each with its own output folder."""
    root, _, base = demo
    return [load_config(base, [f"data.mixture={json.dumps(mix)}", f"data.seed={k}", f"train.seed={10 + k}",
                               f"train.output_dir={root / name / f'm{k}'}", *overrides])
            for k, mix in enumerate(MIXTURES)]


def logged(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def member_results(cfgs):
    """Each member's result.json, None where it has none."""
    files = [Path(c.train.output_dir) / "result.json" for c in cfgs]
    return [json.loads(f.read_text()) if f.exists() else None for f in files]


@pytest.fixture(scope="module")
def swarm_run(demo):
    """The K = 4 swarm on all 8 devices: members over data=4, each member's rows over fsdp=2."""
    cfgs = member_cfgs(demo, "swarm")
    result = train(cfgs, demo[0] / "swarm" / "swarm")
    return cfgs, result, jax.device_get(result.state.params)


def test_each_member_equals_its_separate_run(demo, swarm_run):
    cfgs, result, _ = swarm_run
    assert not result.failed
    for k, cfg in enumerate(cfgs):
        alone = dataclasses.replace(cfg.train, output_dir=str(demo[0] / "alone" / f"m{k}"))
        single = train(cfg.replace(train=alone))
        losses = [r["loss"] for r in single.history]
        assert len(losses) == STEPS
        member = result.members[k]
        np.testing.assert_allclose([r["loss"] for r in member.history], losses, rtol=1e-5)
        assert member.eval.keys() == single.eval.keys() and "val_loss/office" in single.eval
        for key, value in single.eval.items():
            assert member.eval[key] == pytest.approx(value, rel=1e-5), (k, key)
        # its result.json, as a single run's: finished at train.steps with the final evaluation
        done = member_results([cfg])[0]
        assert done["status"] == "finished" and done["step"] == STEPS and done["eval"] == pytest.approx(member.eval)
        # the member's own metrics.jsonl has the single run's rows: losses per step, the step-2 and final evals
        rows, single_rows = logged(Path(cfg.train.output_dir)), logged(demo[0] / "alone" / f"m{k}")
        evals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        single_evals = [(r["step"], r["val_loss"]) for r in single_rows if "val_loss" in r]
        assert [s for s, _ in evals] == [s for s, _ in single_evals] == [2, STEPS]
        np.testing.assert_allclose([v for _, v in evals], [v for _, v in single_evals], rtol=1e-5)
    # members really differ (own mixture and seed)
    assert len({round(m.eval["val_loss"], 6) for m in result.members}) == 4
    # the four separate runs compiled their step once: mixture, seeds and output folder are not in the program
    # (the step sums the loss of each of the 4 trained domains: train_loss/<domain>)
    steps = {id(build_setup(cfg, make_mesh(cfg.mesh), num_domains=4).train_step) for cfg in cfgs}
    assert len(steps) == 1
    assert build_setup(cfgs[0], make_mesh(cfgs[0].mesh), num_domains=4).train_step._cache_size() == 1
    other = load_config(demo[2], ["optimizer.lr=0.5"])
    assert build_setup(other, make_mesh(other.mesh), num_domains=4).train_step is not build_setup(
        cfgs[0], make_mesh(cfgs[0].mesh), num_domains=4).train_step


def test_member_streams_hold_their_mixture_shares(demo):
    sources = [member_source(cfg) for cfg in member_cfgs(demo, "shares")]
    try:
        for src, mix in zip(sources, MIXTURES):
            domain_N, _ = src.schedule.assign(np.arange(2000))  # the rows of the first 250 batches of 8
            shares = np.bincount(domain_N, minlength=len(src.domains)) / 2000
            assert dict(zip([d.name for d in src.domains], shares)) == pytest.approx(mix, abs=0.01)
            for _ in range(3):
                src.next_batch()
            seen = src.tokens_seen()  # what the served batches held
            assert sum(seen.values()) == 3 * 8 * 16
            assert all(seen[d] == 0 for d, w in mix.items() if w == 0)
    finally:
        for src in sources:
            src.close()


def test_resume_mid_swarm_is_bitwise(demo, swarm_run):
    _, reference, params = swarm_run
    cfgs = member_cfgs(demo, "resumed", "checkpoint.every=2", "checkpoint.async_save=false")
    where = demo[0] / "resumed" / "swarm"
    stopped = train(cfgs, where, hooks=default_hooks(cfgs[0], StopAtStep(3)))
    assert stopped.preempted_at == 3 and member_results(cfgs) == [None] * 4
    assert sorted(p.name for p in (where / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    resumed = train(cfgs, where)
    assert [r["status"] for r in member_results(cfgs)] == ["finished"] * 4
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed.state.params)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    for k in range(4):
        assert logged(demo[0] / "resumed" / f"m{k}") == logged(demo[0] / "swarm" / f"m{k}")
    assert [m.eval for m in resumed.members] == [m.eval for m in reference.members]
    # a rerun of the finished swarm trains nothing and writes nothing
    before = [(Path(c.train.output_dir) / "metrics.jsonl").read_text() for c in cfgs]
    again = train(cfgs, where)
    assert again.already_finished and [m.eval for m in again.members] == [m.eval for m in reference.members]
    assert [(Path(c.train.output_dir) / "metrics.jsonl").read_text() for c in cfgs] == before


def test_sharded_member_axis_equals_one_device(demo, swarm_run):
    _, sharded, params = swarm_run
    spec = sharded.state.params["embed_tokens"].sharding.spec
    assert spec[0] == "data" and dict(sharded.state.params["embed_tokens"].sharding.mesh.shape)["data"] == 4
    cfgs = member_cfgs(demo, "one_device")
    one = train(cfgs, demo[0] / "one_device" / "swarm", mesh=member_mesh(4, cfgs[0], jax.devices()[:1]))
    # The two runs start from bitwise-equal params (initialisation does not depend on the sharding) and read
    # bitwise-equal batches: they differ only in the order float32 sums are taken (fsdp=2 splits each member's
    # 8 rows over two devices; XLA tiles each layout's matmuls its own way).
    # Losses: a mean of 128 token NLLs (~5.8) whose sums round at ~sqrt(n)*2^-24 relative: rtol 1e-5 is 10x that.
    # Params: the gradients agree to that rounding, |dg| <~ 1e-6 (sums of n <~ 1e3 terms, gradients clipped to
    # global norm 1). AdamW moves a weight by lr_t * u, u = m/(sqrt(v) + eps), |u| <= C ~ 1.2 for (b1, b2) =
    # (0.9, 0.95) (Cauchy-Schwarz over the bias-corrected averages), and u changes by at most (1 + C)/eps per
    # unit of gradient. With eps = 1e-8 a weight whose gradient is within rounding of zero can take any update
    # in [-C lr, C lr]: no tolerance below 2 C lr * steps holds for every weight (an Intel Xeon host saw 1.65e-5,
    # 0.73% of one weight, after 4 steps). With EPS = 1e-3 the first-order bound per step is
    # |du| <= 2.2 * 1e-6 / EPS = 2.2e-3, and over the schedule (warmup 2: sum of lr_t = 3.5 LR) |d theta| <= 7.7e-5:
    # atol 1e-4. Norm scales sit near 1, where adding an update rounds to 2^-24 per step: rtol STEPS * 2^-23.
    # Seen: <= 1.2e-7 (AMD EPYC). A sharding that mixed members' rows or weights fails it: one changed token in
    # member 2's first batch moved 8,747 of its 10,240 lm_head weights past this tolerance (max 0.03).
    atol, rtol = 1e-4, STEPS * 2.0**-23
    for k in range(4):
        np.testing.assert_allclose([r["loss"] for r in one.members[k].history],
                                   [r["loss"] for r in sharded.members[k].history], rtol=1e-5)
        for key, value in one.members[k].eval.items():
            assert sharded.members[k].eval[key] == pytest.approx(value, rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol),
                 jax.device_get(one.state.params), params)


@pytest.fixture(scope="module")
def sweep_inputs(demo):
    """8 sampled mixtures and the results.csv of today's sweep (single runs, in this process) over them."""
    root, data, base = demo
    prior = load_prior(data["prepared"], domains=sorted(GENERATORS))
    write_csv(root / "mixtures.csv", mixtures_table(sample_mixtures(prior, 8, seed=0), prior.domains))
    assert main(["sweep", str(base), "--mixtures", str(root / "mixtures.csv"), "--out", str(root / "single"),
                 "--parallel", "0"]) == 0
    return root / "mixtures.csv", read_csv(root / "single" / "results.csv")


def assert_same_results(results, reference, indices):
    assert results.columns == reference.columns  # the same layout: `mix fit` reads it unchanged
    np.testing.assert_allclose(results.rows(indices).values_NxC, reference.rows(indices).values_NxC, rtol=1e-5)


def test_a_swarm_sweep_writes_todays_results_sharded_and_resumed(demo, sweep_inputs, capsys):
    _, _, base = demo
    mixtures, reference = sweep_inputs
    sweep = demo[0] / "swarm_sweep"
    command = ["sweep", str(base), "--mixtures", str(mixtures), "--out", str(sweep), "--swarm", "4"]
    for shard in ("0/2", "1/2"):  # the two tasks of a job array: one whole swarm each
        assert main([*command, "--shard", shard]) == 0
        assert f"shard {shard}: 4 runs trained" in capsys.readouterr().out
        assert not (sweep / "results.csv").exists()
    assert sorted(p.name for p in (sweep / "swarms").iterdir()) == ["0001-0004", "0005-0008"]
    trained = {p.parent.name: p.stat().st_mtime_ns for p in (sweep / "runs").glob("*/metrics.jsonl")}
    assert main(command) == 0  # the record pass trains nothing
    assert {p.parent.name: p.stat().st_mtime_ns for p in (sweep / "runs").glob("*/metrics.jsonl")} == trained
    results = read_csv(sweep / "results.csv")
    assert sorted(results.index_N.tolist()) == list(range(1, 9))
    assert_same_results(results, reference, list(range(1, 9)))
    capsys.readouterr()
    assert main(command) == 0
    assert "sweep: 8 runs, 8 finished before, 0 to run" in capsys.readouterr().out
    # --limit and --shard compose with --swarm: the first 6 mixtures in swarms of 4, shard 1/2 is the last 2
    assert shard_of(read_csv(mixtures).rows(list(range(1, 7))), "1/2", group=4).index_N.tolist() == [5, 6]


def test_a_member_that_goes_non_finite_is_isolated(demo, sweep_inputs, monkeypatch, capsys):
    """Member 2 (run 3) trains step 1, then gets a NaN in its step-2 batch (its loss mask: its loss, gradients
    and update go NaN): it is marked failed at step 2 and its state stays at step 1's, bitwise, to the end (the
    mask in the member step: without it the NaN update would be kept); it gets no row in results.csv (as a failed
    single run) but a result.json saying it failed, the sweep says so in one line (exit 3), and the other members'
    rows equal their separate runs'."""
    mixtures, reference = sweep_inputs
    real_source = train_module.member_source

    def poisoned(cfg):
        source = real_source(cfg)
        if not cfg.train.output_dir.endswith("0003"):
            return source
        next_batch, calls = source.next_batch, []

        def next_poisoned():
            batch = next_batch()
            calls.append(1)
            if len(calls) == 2:  # step 2's batch
                batch = dict(batch, loss_mask=batch["loss_mask"].copy())
                batch["loss_mask"][0, 0] = np.nan
            return batch

        source.next_batch = next_poisoned
        return source

    monkeypatch.setattr(train_module, "member_source", poisoned)
    sweep = demo[0] / "failing"
    command = ["sweep", str(demo[2]), "checkpoint.every=1", "checkpoint.keep_last=0", "--mixtures", str(mixtures),
               "--out", str(sweep), "--swarm", "4", "--limit", "4"]
    assert main(command) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(r"runs \[3\] failed \(run 3: loss is nan.* at step 2", err), err
    results_csv = read_csv(sweep / "results.csv")
    assert sorted(results_csv.index_N.tolist()) == [1, 2, 4]
    assert_same_results(results_csv, reference, [1, 2, 4])
    swarm_dir = sweep / "swarms" / "0001-0004"
    failed = json.loads((sweep / "runs" / "0003" / "result.json").read_text())
    assert failed["status"] == "failed" and failed["step"] == 2 and failed["reason"].startswith("loss is nan")
    # the swarm's checkpoints hold which member failed (a resumed swarm keeps it failed)
    data = json.loads((swarm_dir / "checkpoints" / str(STEPS) / "data" / "metadata").read_text())
    assert list(data["failed"]) == ["2"] and data["failed"]["2"]["step"] == 2
    rows = logged(sweep / "runs" / "0003")
    assert [r["step"] for r in rows if "loss" in r] == [1] and math.isfinite(rows[0]["loss"])
    assert rows[-1] == {"step": 2, "failed": rows[-1]["failed"]} and rows[-1]["failed"].startswith("loss is nan")
    assert not any("val_loss" in r for r in rows)
    assert all(math.isfinite(r["loss"]) for r in logged(sweep / "runs" / "0002") if "loss" in r)
    # the failed member's state (params and Adam moments) is its step-1 state in every later checkpoint; the
    # others moved on
    with ocp.PyTreeCheckpointer() as ckptr:
        saved = {s: ckptr.restore(swarm_dir / "checkpoints" / str(s) / "state") for s in (1, STEPS)}
    for a, b in zip(jax.tree.leaves(saved[1]), jax.tree.leaves(saved[STEPS]), strict=True):
        np.testing.assert_array_equal(np.asarray(a)[2], np.asarray(b)[2])
    first, last = (np.asarray(saved[s]["params"]["lm_head"]["kernel"]) for s in (1, STEPS))
    assert all(not np.array_equal(first[m], last[m]) for m in (0, 1, 3))
    # a rerun trains nothing and reports the failed member again
    before = (sweep / "runs" / "0002" / "metrics.jsonl").stat().st_mtime_ns
    assert main(command) == 3
    assert re.search(r"runs \[3\] failed", capsys.readouterr().err)
    assert (sweep / "runs" / "0002" / "metrics.jsonl").stat().st_mtime_ns == before
    assert sorted(read_csv(sweep / "results.csv").index_N.tolist()) == [1, 2, 4]


def test_hooks_work_in_a_swarm_as_in_single_runs(demo, swarm_run, tmp_path):
    """A swarm of 2 with checkpoint.init_from, a mixture update at step 2 and a live lm-eval task (mixlm's own
    offline demo task), its members micro-batching (train.grad_accum_steps=2), equals 2 single runs with the
    same: every member starts from the checkpoint's params (its first loss is the single run's, not the seeded
    swarm's), gets the update from its own statistics, and is scored on its own params."""
    root, data, base = demo
    start = root / "hooks_start"
    assert main(["train", str(base), f"train.output_dir={start}", "checkpoint.save_at_end=true", "train.steps=2"]) == 0
    extra = [f"checkpoint.init_from={start}", f"data.tokenizer={data['tokenizer']}", "eval.tasks=[mixlm_demo_prose]",
             "eval.limit=4", "eval.every=2", "train.grad_accum_steps=2"]

    class Shift:
        """Moves weight onto `records` at step 2 (a rule of the statistics alone: members get their own)."""

        def __init__(self):
            self.seen = []

        def __call__(self, stats):
            self.seen.append(stats)
            return {**stats.weights, "records": 2.0} if stats.step == 2 else None

    cfgs = member_cfgs(demo, "hooks", *extra)[:2]
    rule = Shift()
    swarm = train(cfgs, root / "hooks" / "swarm", hooks=default_hooks(cfgs[0], MixtureUpdateHook(2, rule)))
    assert [(s.member, s.step) for s in rule.seen] == [(0, 2), (1, 2), (0, 4), (1, 4)]
    assert [s.weights for s in rule.seen[:2]] == [pytest.approx(MIXTURES[0]), pytest.approx(MIXTURES[1])]
    assert rule.seen[2].weights["records"] == pytest.approx(2.0 / 3.0)  # member 0: arithmetic 1 + records 2
    _, seeded, _ = swarm_run
    for k, cfg in enumerate(cfgs):
        alone = cfg.replace(train=dataclasses.replace(cfg.train, output_dir=str(tmp_path / f"alone{k}")))
        single = train(alone, hooks=default_hooks(alone, MixtureUpdateHook(2, Shift())))
        member = swarm.members[k]
        np.testing.assert_allclose([r["loss"] for r in member.history], [r["loss"] for r in single.history],
                                   rtol=1e-5)
        assert member.history[0]["loss"] != pytest.approx(seeded.members[k].history[0]["loss"], rel=1e-3)
        tasks = {key: v for key, v in single.eval.items() if key.startswith("lm_eval/")}
        assert "lm_eval/mixlm_demo_prose/acc" in tasks
        assert {key: v for key, v in member.eval.items() if key.startswith("lm_eval/")} == tasks
        for key, value in single.eval.items():
            assert member.eval[key] == pytest.approx(value, rel=1e-5), (k, key)
        rows = logged(Path(cfg.train.output_dir))
        assert [r["step"] for r in rows if "lm_eval/mixlm_demo_prose/acc" in r] == [2, STEPS]


WORKER = Path(__file__).with_name("swarm_worker.py")


def test_a_swarm_over_two_processes_equals_one_process_and_resumes_on_one(demo, swarm_run, sweep_inputs, capsys):
    """Two processes x 4 devices: members over data=4 (members 0-1 on process 0, 2-3 on process 1), each
    member's rows over fsdp=2 (a swarm of 1, whose member would span both processes, is refused). Stopped
    after step 3 and resumed in this process (8 devices): every member's
    logged losses and validation losses equal the one-process swarm's. Beside it, `mixlm sweep --swarm 4`
    over the same two-process layout writes the results.csv of today's sweep."""
    root = demo[0]
    _, reference, _ = swarm_run
    cfgs = member_cfgs(demo, "two_processes", "checkpoint.every=2", "checkpoint.async_save=false")
    where = root / "two_processes" / "swarm"
    job = root / "two_processes.json"
    job.write_text(json.dumps({"configs": [c.to_dict() for c in cfgs], "swarm_dir": str(where),
                               "stop_after_step": 3, "out": str(root / "two_processes")}))
    swarm_wait = launch(root / "two_processes_logs",
                        lambda i, port: [sys.executable, str(WORKER), str(i), "2", port, str(job)], 2)
    mixtures, results = sweep_inputs
    sweep = root / "distributed_sweep"
    sweep_wait = launch(root / "distributed_sweep_logs", lambda i, port: [
        sys.executable, "-m", "mixlm.cli", "sweep", str(demo[2]), "--mixtures", str(mixtures), "--out", str(sweep),
        "--swarm", "4", "--limit", "4", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
        "--process-id", str(i)], 2)
    swarm_logs = swarm_wait()
    records = [json.loads((root / f"two_processes.p{i}.json").read_text()) for i in range(2)]
    assert [r["local"] for r in records] == [[0, 1], [2, 3]] and all(r["process_count"] == 2 for r in records)
    assert [r["preempted_at"] for r in records] == [3, 3] and "2 on each of 2 processes" in swarm_logs[0]
    # a swarm of 1 on the 8 devices of both processes: that member would span them, refused in one line
    assert "swarm member 0 of 1 would span processes [0, 1]" in records[0]["refused"]
    for r in records:
        for m, rows in r["history"].items():
            np.testing.assert_allclose([x["loss"] for x in rows],
                                       [x["loss"] for x in reference.members[int(m)].history[:3]], rtol=1e-5)
    assert sorted(p.name for p in (where / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    resumed = train(cfgs, where)  # one process, 8 devices: the data states of both processes' members
    assert [r["status"] for r in member_results(cfgs)] == ["finished"] * 4 and not resumed.failed
    for k in range(4):
        rows, one = logged(root / "two_processes" / f"m{k}"), logged(root / "swarm" / f"m{k}")
        assert [r["step"] for r in rows] == [r["step"] for r in one]
        np.testing.assert_allclose([r.get("loss", r.get("val_loss")) for r in rows],
                                   [r.get("loss", r.get("val_loss")) for r in one], rtol=1e-5)
        for key, value in reference.members[k].eval.items():
            assert resumed.members[k].eval[key] == pytest.approx(value, rel=1e-5), (k, key)
    # a distributed sweep trains swarms: without --swarm it is refused in one line, before any device work
    assert main(["sweep", str(demo[2]), "--mixtures", str(mixtures), "--out", str(root / "refused"),
                 "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "0"]) == 2
    assert "--distributed/--coordinator need --swarm K" in capsys.readouterr().err
    sweep_logs = sweep_wait()
    assert "results:" in sweep_logs[0]
    assert_same_results(read_csv(sweep / "results.csv"), results, [1, 2, 3, 4])
    assert len((sweep / "results.csv").read_text().splitlines()) == 5  # process 0 alone wrote it

