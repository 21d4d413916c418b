"""What a sweep tells its user while and after it runs: a swarm shows a progress bar with an ETA (as a single run
does) even when no log line is due; each finished run prints its loss on the search target (the eval-only domain
of eval.domains, else val_loss); every sweep, swarm or not, ends with the best runs on that target and their
mixtures; a second `sweep --swarm` on a folder another sweep is training gets one line and exit 2."""

import os
import re

import pytest
import yaml

from mixlm.cli import main
from mixlm.data.demo_corpus import GENERATORS, prepare_demo_data
from mixlm.data.tokenizer import load_tokenizer_spec
from mixlm.folder_lock import RunFolderLock
from mixlm.mixing import load_prior, mixtures_table, read_csv, sample_mixtures, write_csv
from mixlm.sweep import plan_sweep, search_target

STEPS = 4


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Prepared demo domains with an eval-only target ('office'), a tiny proxy config that logs a line only
    after its last step (logging.every > steps), and 4 sampled mixtures."""
    root = tmp_path_factory.mktemp("sweep_progress")
    data = prepare_demo_data(root / "data", docs_per_domain=100, vocab_size=320, target_domains=("office",))
    vocab = load_tokenizer_spec(str(data["tokenizer"])).vocab_size
    base = root / "proxy.yaml"
    base.write_text(yaml.safe_dump({
        "model": {"family": "llama", "num_layers": 1, "d_model": 32, "num_heads": 2, "mlp_dim": 64,
                  "vocab_size": vocab, "max_seq_len": 16, "vocab_multiple": 8},
        "data": {"source": "prepared", "prepared_dir": str(data["prepared"]), "seq_len": 16,
                 "mixture": {"arithmetic": 1.0}},
        "optimizer": {"lr": 1e-2},
        "schedule": {"kind": "constant", "warmup_steps": 2},
        "train": {"steps": STEPS, "global_batch_size": 8},
        "eval": {"batches": 1, "domains": ["office"]},
        "logging": {"every": 100, "tensorboard": False, "progress": False},
        "checkpoint": {"every": 0, "save_at_end": False},
    }))
    prior = load_prior(data["prepared"], domains=sorted(GENERATORS))
    write_csv(root / "mixtures.csv", mixtures_table(sample_mixtures(prior, 4, seed=0), prior.domains))
    return root, base, root / "mixtures.csv", list(prior.domains)


def _results(sweep):
    table = read_csv(sweep / "results.csv")
    office = table.select(["metric/office_val_loss"])[:, 0]
    total = table.select(["metric/val_loss"])[:, 0]
    return {int(i): (o, t) for i, o, t in zip(table.index_N, office, total)}


def _summary(printed: str, runs: int) -> list[tuple[int, str, str]]:
    lines = printed.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("sweep summary:"))
    assert lines[head] == (f"sweep summary: {runs} of {runs} runs finished; best {runs} on val_loss/office "
                           "(mix fit --target metric/office_val_loss), lowest first:")
    rows = [re.fullmatch(r"  run (\d+)  ([\d.]+)  (.+)", line) for line in lines[head + 1:head + 1 + runs]]
    return [(int(m[1]), m[2], m[3]) for m in rows]


@pytest.mark.parametrize("how, overrides", [(["--swarm", "2"], ["logging.progress=true"]), (["--parallel", "0"], [])])
def test_each_run_prints_the_search_target_and_the_sweep_ends_with_the_best(demo, capsys, how, overrides):
    """Per run: `val_loss/office` (the eval-only target) first, the trained domains' val_loss after it; at the
    end, the runs sorted by the target, each with its mixture. A swarm says which swarm of how many and, as
    logging.every (100) is past its last step, its progress bar alone shows the steps done and the time left."""
    root, base, mixtures, _ = demo
    sweep = root / f"sweep{how[0]}"
    assert main(["sweep", str(base), *overrides, "--mixtures", str(mixtures), "--out", str(sweep), *how]) == 0
    printed, err = capsys.readouterr()
    results = _results(sweep)
    for index, (office, total) in results.items():
        line = next(x for x in printed.splitlines() if x.startswith(f"sweep: run {index} done"))
        assert f", val_loss/office {office:.4f} (trained domains' val_loss {total:.4f})" in line
    ranked = sorted(results, key=lambda i: results[i][0])
    summary = _summary(printed, 4)
    assert [i for i, _, _ in summary] == ranked
    assert [v for _, v, _ in summary] == [f"{results[i][0]:.4f}" for i in ranked]
    weights = yaml.safe_load((sweep / "runs" / f"{ranked[0]:04d}" / "proxy.yaml").read_text())["data"]["mixture"]
    top = sorted(((w, d) for d, w in weights.items() if w > 0), reverse=True)
    assert summary[0][2] == ", ".join(f"{d} {100 * w:.1f}%" if w >= 0.001 else f"{d} <0.1%" for w, d in top)
    if how[0] == "--swarm":
        assert re.search(r"sweep: swarm 0001-0002 \(2 members\) done in \d+s; swarms 1/2, about \d+s left",
                         printed)
        assert "sweep: swarm 0003-0004 (2 members) done in" in printed and "swarms 2/2\n" in printed
        bars = re.findall(rf"{STEPS}/{STEPS} \[\d\d:\d\d<00:00", err)  # steps done [elapsed<left], per swarm
        assert len(bars) >= 2, err
    else:
        assert re.search(r"; runs 1/4, about \d+s left", printed) and "; runs 4/4\n" in printed


def test_the_target_is_val_loss_without_an_eval_only_domain(demo, tmp_path):
    _, base, mixtures, domains = demo
    table = read_csv(mixtures)
    assert search_target(plan_sweep(str(base), table, tmp_path / "a"), domains) == ("val_loss/office",)
    assert search_target(plan_sweep(str(base), table, tmp_path / "b", ["eval.domains=[]"]), domains) == ("val_loss",)
    # a trained domain named in eval.domains is no target
    assert search_target(plan_sweep(str(base), table, tmp_path / "c", ["eval.domains=[prose]"]), domains) == (
        "val_loss",)


def test_a_second_swarm_sweep_on_a_held_folder_is_one_line_and_exit_2(demo, capsys):
    """Another `mixlm sweep --swarm` holds the swarm's folder (its lock, taken here as that sweep would): this
    one says who holds it and what to do, in one line, and exits 2 without training."""
    root, base, mixtures, _ = demo
    sweep = root / "held"
    lock = RunFolderLock(sweep / "swarms" / "0001-0002").acquire()
    try:
        rc = main(["sweep", str(base), "--mixtures", str(mixtures), "--out", str(sweep), "--swarm", "2",
                   "--limit", "2"])
    finally:
        lock.release()
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"mixlm sweep: swarm {sweep / 'swarms' / '0001-0002'} is being trained by another process")
    assert f"pid {os.getpid()}" in err and "another --out" in err
    assert not (sweep / "runs" / "0001" / "metrics.jsonl").exists()
