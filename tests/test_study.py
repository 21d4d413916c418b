"""`mixlm study` end to end on CPU: a tiny study (demo corpus; two proxy scales; two refinement rounds; validation
with two seeds; export, eval, report), then the same study SIGKILLed at random stages and rerun (the same report,
timestamps and timings aside), a changed validation setting (only validation and the report run again), the
report's HTML page in headless chromium (every image loaded), and `--dry-run`'s cost against a hand count."""

import math
import os
import queue
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from tiny_study import REPO, STAGES, stage_folder, write_spec

from mixlm.cli import main
from mixlm.mixing import read_csv
from mixlm.run_dir import RunDir
from mixlm.study import Study, load_study, walk


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The tiny study, run once to the end in this process: (spec file, study folder)."""
    root = tmp_path_factory.mktemp("study")
    spec = write_spec(root)
    out = root / "out"
    assert main(["study", "run", str(spec), "--out", str(out)]) == 0
    return spec, out


def test_a_tiny_study_runs_end_to_end(study, capsys):
    spec, out = study
    # every stage is a folder keyed by its inputs, holding what its verb writes
    assert sorted(p.name.rsplit("-", 1)[0] for p in (out / "stages").iterdir()) == sorted(STAGES)
    sample = stage_folder(out, "sample-r0")
    assert sorted(p.name for p in sample.glob("mixture_*.yaml")) == [f"mixture_{i:04d}.yaml" for i in range(1, 9)]
    small, large = (read_csv(stage_folder(out, f"sweep-{s}-r0") / "results.csv") for s in ("small", "large"))
    assert sorted(small.index_N.tolist()) == list(range(1, 9)) and sorted(large.index_N.tolist()) == list(range(1, 7))
    assert (stage_folder(out, "fit-r2") / "model.json").is_file()
    assert (stage_folder(out, "propose-r2") / "best.yaml").is_file()
    # refinement rounds number their runs after the round before, the previous proposal first
    r1 = read_csv(stage_folder(out, "sample-r1") / "mixtures.csv")
    assert r1.index_N.tolist() == [9, 10, 11, 12]
    proposal = yaml.safe_load((stage_folder(out, "propose-r0") / "best.yaml").read_text())
    first = dict(zip(r1.columns, r1.values_NxC[0]))
    assert {d: w for d, w in first.items() if w > 0} == pytest.approx(proposal, abs=1e-9)
    assert read_csv(stage_folder(out, "sweep-small-r2") / "results.csv").index_N.tolist() == [13, 14, 15, 16]
    fit_r2 = yaml.safe_load((stage_folder(out, "fit-r2") / "model.json").read_text())
    assert fit_r2["runs"] == 16  # the fit pools every round

    # validation: 3 models x 2 seeds, each its own `mixlm train` run folder; the answer is their mean
    def target(name: str, seed: int) -> float:
        folder = stage_folder(out, f"validate-{name}-seed{seed}") / f"{name}-seed{seed}"
        return RunDir(folder).final_eval(20)["val_loss/office"]

    facts = yaml.safe_load((out / "report" / "report.json").read_text())
    for name in ("proposed", "natural", "uniform"):
        seeds = [target(name, s) for s in (0, 1)]
        assert seeds[0] != seeds[1]  # the seeds differ
        assert facts["validation"][name]["mean"] == pytest.approx(sum(seeds) / 2, rel=1e-12)
    assert (stage_folder(out, "export-proposed") / "hf" / "model.safetensors").is_file()
    assert (stage_folder(out, "eval-uniform") / "eval_local.json").is_file()

    # transfer: decision accuracy small -> large, recounted here from the two results tables
    by_index = {int(i): v for i, v in zip(small.index_N, small.select(["metric/office_val_loss"])[:, 0])}
    big = {int(i): v for i, v in zip(large.index_N, large.select(["metric/office_val_loss"])[:, 0])}
    shared = sorted(big)
    agree = total = 0.0
    for a in shared:
        for b in shared:
            if a < b and big[a] != big[b]:
                total += 1
                same = by_index[a] == by_index[b]
                agree += 0.5 if same else float((by_index[a] < by_index[b]) == (big[a] < big[b]))
    step = facts["transfer"]["steps"][0]
    assert (step["small"], step["large"], step["n"]) == ("small", "large", 6)
    assert step["accuracy"] == pytest.approx(agree / total, abs=1e-12)
    assert [s["small"] for s in facts["transfer"]["to_target"]] == ["small", "large", "regression"]

    report = (out / "report" / "report.md").read_text()
    for heading in ("## The answer", "## Search rounds", "## Calibrated transfer", "### Predicted against achieved",
                    "## Validation at the target scale", "## Evaluation", "## Compute", "## Provenance"):
        assert heading in report
    assert "| small -> large | 6 |" in report
    assert "manifest fingerprint" in report and "$STUDY/stages/" in report and str(out) not in report
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report):
        assert (out / "report" / image).is_file(), image

    # a rerun finds every stage done and runs nothing; status says so
    written = (out / "report" / "report.md").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["study", "run", str(spec), "--out", str(out)]) == 0
    assert "(0 stages run now, 30 found done)" in capsys.readouterr().out
    assert (out / "report" / "report.md").stat().st_mtime_ns == written
    assert main(["study", "status", str(spec), "--out", str(out)]) == 0
    assert "30 of 30 stages done" in capsys.readouterr().out


def comparable(report: str) -> str:
    """The report without what a rerun changes by nature: the compute section (timings) and the time stamp."""
    report = re.sub(r"## Compute\n.*?(?=\n## )", "## Compute\n", report, flags=re.DOTALL)
    return re.sub(r"Generated [^ ]+ by", "Generated by", report)


def _child_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
                JAX_DEFAULT_MATMUL_PRECISION="highest")  # as tests/conftest.py sets it in this process


def _run_until(argv: list[str], marker: str, delay: float, timeout: float = 900) -> int | None:
    """Starts `mixlm <argv>`; SIGKILLs it `delay` s after a line starts with `marker`. Returns its exit code when
    it ended by itself first (None when killed)."""
    proc = subprocess.Popen([sys.executable, "-m", "mixlm.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_child_env())
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        while True:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {marker!r} within {timeout}s") from None
            if line.startswith(marker):
                break
            if proc.poll() is not None and lines.empty():
                return proc.returncode
        threading.Event().wait(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        return None if proc.returncode == -signal.SIGKILL else proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigkill_at_random_stages_then_rerun_gives_the_same_report(study, tmp_path):
    spec, reference = study
    out = tmp_path / "killed"
    rng = random.Random(29)
    targets = sorted(rng.sample(STAGES[1:-1], 2), key=STAGES.index) + ["report"]  # a sweep, a training run
    for name in targets:
        ended = _run_until(["study", "run", str(spec), "--out", str(out)], f"study: stage {name} (",
                           delay=rng.uniform(0.0, 3.0))
        assert ended is None, f"the study ended (exit {ended}) before it could be killed in {name}"
    done = subprocess.run([sys.executable, "-m", "mixlm.cli", "study", "run", str(spec), "--out", str(out)],
                          capture_output=True, text=True, env=_child_env(), timeout=1800, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    got, want = ((p / "report" / "report.md").read_text() for p in (out, reference))
    assert comparable(got) == comparable(want), f"killed in {targets}"
    assert sorted(p.name for p in (out / "stages").iterdir()) == sorted(p.name for p in (reference / "stages").iterdir())


def test_a_changed_validation_setting_reruns_only_validation_and_the_report(study, tmp_path, capsys):
    spec, reference = study
    out = tmp_path / "moved"
    shutil.copytree(reference, out, symlinks=True)  # a moved study folder: its records say $STUDY, not a path
    more = ["validation.seeds=[0,1,2]"]
    # status names what is left and, for a training stage whose inputs are done, the command a launcher runs
    capsys.readouterr()
    assert main(["study", "status", str(spec), *more, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "29 of 33 stages done" in printed
    command = next(line.split(": ", 1)[1] for line in printed.splitlines()
                   if line.startswith("  validate-proposed-seed2: "))
    argv = shlex.split(command)[1:]
    assert argv[0] == "train" and "train.seed=2" in argv
    # step out of the study: train that run by hand, as a cluster job would
    assert main(argv) == 0
    run = Path(argv[-1].split("=", 1)[1])
    trained = (run / "metrics.jsonl").stat().st_mtime_ns
    walked = walk(Study(load_study(spec, more), out=str(out), log=lambda _: None))
    assert walked.ran == ["validate-proposed-seed2", "validate-natural-seed2", "validate-uniform-seed2", "report"]
    assert (run / "metrics.jsonl").stat().st_mtime_ns == trained  # recorded, not trained again
    facts = yaml.safe_load((out / "report" / "report.json").read_text())
    assert sorted(facts["validation"]["proposed"]["seeds"]) == ["0", "1", "2"]  # {seed: loss}, JSON keys
    # the export, eval and search stages were reused: their folders are the reference's
    assert stage_folder(out, "export-proposed").name == stage_folder(reference, "export-proposed").name


CHECK_IMAGES = """<script>window.addEventListener("load", function () {
  var out = [];
  for (const img of document.images) { out.push(img.getAttribute("src") + " " + img.naturalWidth); }
  var pre = document.createElement("pre"); pre.id = "image-check"; pre.textContent = out.join("\\n");
  document.body.appendChild(pre);
});</script>"""


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("chromium is not installed: `apt-get install -y chromium` (make test installs it)")
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--no-first-run", f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=300, check=False)


def test_the_html_report_renders_in_headless_chromium_with_every_image(study, tmp_path):
    _, out = study
    page = tmp_path / "report"
    shutil.copytree(out / "report", page)
    html = (page / "report.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', html)
    assert len(images) >= 8
    (page / "check.html").write_text(html.replace("</body>", CHECK_IMAGES + "</body>"))
    dom = chromium("--virtual-time-budget=10000", "--dump-dom", (page / "check.html").as_uri(),
                   profile=tmp_path / "profile-1")
    found = re.search(r'<pre id="image-check">(.*?)</pre>', dom.stdout, flags=re.DOTALL)
    assert found, dom.stdout[-2000:] + dom.stderr[-2000:]
    widths = dict(line.rsplit(" ", 1) for line in found.group(1).strip().splitlines())
    assert sorted(widths) == sorted(images)
    assert all(int(w) > 0 for w in widths.values()), widths  # naturalWidth 0: the image did not load
    shot = tmp_path / "report.png"
    done = chromium("--hide-scrollbars", "--window-size=1200,2400", f"--screenshot={shot}",
                    (page / "report.html").as_uri(), profile=tmp_path / "profile-2")
    assert shot.is_file() and shot.stat().st_size > 10_000, done.stderr[-2000:]
    print(f"screenshot: {shot}")


def test_dry_run_prices_each_training_stage_by_its_flops(tmp_path, capsys):
    spec = write_spec(tmp_path)
    assert main(["study", "run", str(spec), "--out", str(tmp_path / "dry"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / "dry").exists()  # nothing ran, nothing was written
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in printed.splitlines() if line.startswith("| ") and "---" not in line}
    assert list(rows)[1:] == STAGES  # the header row, then every stage in order
    # 1 layer, d 32, 2 heads, SwiGLU 64, vocab 320 (the demo tokenizer's size, before it is made), sequence 32:
    # 6 x (4 d^2 + 3 d x 64 + d x 320) + 12 x 32 x 1 x 2 x 16 / 2 FLOPs per token
    flops = 6 * (4 * 32 * 32 + 3 * 32 * 64 + 32 * 320) + 12 * 32 * 2 * 16 / 2
    h100 = 0.4 * 989e12
    for name, runs, steps in (("sweep-small-r0", 8, 6), ("sweep-large-r0", 6, 12), ("sweep-small-r2", 4, 6),
                              ("candidates-large", 3, 12), ("validate-uniform-seed1", 1, 20)):
        row = rows[name]
        tokens = steps * 8 * 32
        assert (int(row[3]), int(row[4].replace(",", ""))) == (runs, tokens)
        devices = 8 if name.startswith("validate") else 1
        assert float(row[5]) == pytest.approx(runs * tokens * flops / (h100 * devices) * devices / 3600, rel=5e-3)
        assert "fits" in row[7]
    assert math.isfinite(float(printed.split("training: ")[1].split()[0]))


def _one_sweep_dry_run(folder: Path, capsys, scale: dict, cost: dict | None = None) -> str:
    """The memory cell of sweep-small-r0 in `--dry-run` of the tiny study cut to that one sweep (one config)."""
    import copy

    from tiny_study import PROXY, STUDY

    tree = copy.deepcopy(STUDY)
    tree["search"]["scales"] = [{"name": "small", "config": "proxy.yaml", **scale}]
    for key in ("validation", "export", "eval"):
        tree.pop(key)
    tree.update(refine={"rounds": 0}, prior={"max_epochs": 50, "token_budget": "data"}, cost=cost or {})
    (folder / "proxy.yaml").write_text(yaml.safe_dump(PROXY))
    (folder / "study.yaml").write_text(yaml.safe_dump(tree))
    capsys.readouterr()
    assert main(["study", "run", str(folder / "study.yaml"), "--out", str(folder / "dry"), "--dry-run"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| sweep-small-r0 |"))
    return row.split("|")[-2].strip()


def test_dry_run_with_compile_for_prices_memory_with_the_target_compiler(tmp_path, capsys):
    """cost.compile_for: each training stage's memory is the GPU compiler's peak for its own device count."""
    memory = _one_sweep_dry_run(tmp_path, capsys, {"parallel": 0}, {"compile_for": "h100-{devices}"})
    assert memory == "0.0 of 72.0 GiB compiled for h100-1: fits"  # a 31k-parameter model: 1.8 MB at its peak


def test_dry_run_counts_every_swarm_member_a_device_holds(tmp_path, capsys):
    """A swarm of 8 on one device holds 8 runs' params, optimizer state and activations at once."""
    big = ["model.num_layers=8", "model.d_model=512", "model.mlp_dim=2048", "model.num_heads=8",
           "model.max_seq_len=512", "data.seq_len=512", "train.global_batch_size=32"]
    for name in ("one", "eight"):
        (tmp_path / name).mkdir()
    one = _one_sweep_dry_run(tmp_path / "one", capsys, {"parallel": 0, "overrides": big})
    eight = _one_sweep_dry_run(tmp_path / "eight", capsys, {"swarm": 8, "overrides": big})
    per_run = float(one.split(" of ")[0])
    assert re.fullmatch(r"[\d.]+ of 72\.0 GiB on 1 x h100: fits", one) and per_run > 0.5, one
    found = re.fullmatch(r"([\d.]+) of 72\.0 GiB on 1 x h100 \(8 swarm members per device x ([\d.]+)\): (.*)", eight)
    assert found and float(found.group(2)) == per_run, eight
    assert abs(float(found.group(1)) - 8 * per_run) <= 8 * 0.05  # each printed to 0.1 GiB
    assert found.group(3) == ("fits" if 8 * per_run < 72 else "does NOT fit")
