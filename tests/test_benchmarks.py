"""benchmarks/accelerator_mfu.py in its CPU mode: the whole parent/child pipeline (device probe, mixlm
configurations, the PyTorch step, one failing configuration that must not lose the others) writes its table."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_accelerator_mfu_cpu_smoke_writes_its_table(tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "accelerator_mfu.py"), "--cpu-smoke", "--out", str(out),
         "--attention", "blocked,no-such-kernel", "--remat", "none,full", "--config-timeout-s", "300"],
        check=False, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = out / "accelerator_mfu_cpu.md"
    assert written.is_file()
    text = written.read_text()
    assert text in proc.stdout  # printed too
    assert "Machine:" in text and "Command: `python benchmarks/accelerator_mfu.py --cpu-smoke" in text
    rows = [line for line in text.splitlines() if line.startswith("| tiny-smoke")]
    ok = [r for r in rows if r.rstrip().endswith("| ok |")]
    # PyTorch + blocked x (none, full) ran; the unknown kernel failed twice without losing the other rows
    assert len(rows) == 5 and len(ok) == 3, text
    assert sum("| PyTorch |" in r for r in ok) == 1
    assert {r.split("|")[5].strip() for r in ok if "| mixlm |" in r} == {"none", "full"}
    failed = [r for r in rows if "no-such-kernel" in r]
    assert len(failed) == 2 and all("failed" in r for r in failed)
    for r in ok:
        cells = [c.strip() for c in r.split("|")]
        assert float(cells[7].replace(",", "")) > 0  # tokens/s
        assert cells[9].endswith("%")  # MFU against the matmul peak measured in the same run


def test_train_throughput_smoke_alternates_runs_and_reports_medians(tmp_path):
    out = tmp_path / "train_throughput.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--model",
         str(ROOT / "configs" / "models" / "llama-tiny.yaml"), "--seq-len", "16", "--batch", "2", "--steps", "1",
         "--runs", "3", "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=900, cwd=ROOT,
        env={**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"},  # one device
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("round ")]
    assert [r.split()[2] for r in rounds] == ["mixlm", "transformers"] * 3  # mixlm, torch, mixlm, torch, ...
    text = out.read_text()
    assert "3 alternating runs of 1 timed steps each" in text and "--runs 3" in text and "Load average" in text
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith(("| mixlm", "| transformers"))}
    mixlm_row = rows["mixlm (JAX, fp32)"]
    median, low, high = (float(x) for x in mixlm_row[2].replace("(", " ").replace(")", " ").replace("-", " ").split())
    assert low <= median <= high  # the ratio: median (min-max) over the 3 pairs
    assert all(cell.count("(") == 1 for cell in mixlm_row)


def test_regmix_fit_default_panel_smoke_writes_its_timing_table(tmp_path):
    import numpy as np

    data = tmp_path / "regmix"
    data.mkdir()
    w_NxD = np.random.default_rng(0).dirichlet(np.ones(3), 12)
    (data / "train_mixture_1m.csv").write_text(
        "index,train_a,train_b,train_c\n" + "".join(f"{i}," + ",".join(str(float(v)) for v in w) + "\n"
                                                    for i, w in enumerate(w_NxD)))
    (data / "train_pile_loss_1m.csv").write_text(
        "index,metric/the_pile_pile_cc_val_loss\n" + "".join(f"{i},{5 - 0.3 * np.log(w[0] + 0.01)}\n"
                                                             for i, w in enumerate(w_NxD)))
    out = tmp_path / "regmix_fit_default.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "regmix_fit.py"), "--default-panel", "--data", str(data),
         "--targets", "pile_cc", "--folds", "2", "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "Load average" in text and "## Target `pile_cc` (1 loss column):" in text and " s in all" in text
    from mixlm.mixing.regressors import default_regressors

    for kind in default_regressors(1):
        assert f"| {kind} | " in text, kind  # timed, and scored in the cross-validation table
