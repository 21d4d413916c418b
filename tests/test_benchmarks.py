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
