"""Test helper: the tiny study of tests/test_study.py (demo corpus, two proxy scales, two refinement rounds,
validation with two seeds), its stages in order, and where a stage's folder is."""

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PROXY = {
    "model": {"family": "llama", "num_layers": 1, "d_model": 32, "num_heads": 2, "mlp_dim": 64, "max_seq_len": 32,
              "vocab_multiple": 8},
    "data": {"source": "prepared", "seq_len": 32},
    "optimizer": {"lr": 1.0e-2},
    "schedule": {"kind": "constant", "warmup_steps": 2},
    "train": {"steps": 6, "global_batch_size": 8},
    "eval": {"batches": 1},
    "logging": {"every": 3, "tensorboard": False, "progress": False},
    "checkpoint": {"every": 0, "save_at_end": False},
}
STUDY = {
    "name": "tiny",
    "out": "unused",
    "data": {"demo": {"docs_per_domain": 150, "vocab_size": 320, "targets": ["office"]}, "target": ["office"]},
    "prior": {"max_epochs": 50},
    "search": {
        "mixtures": 8,
        # one run after another in this process: every proxy reuses one compiled step, where swarms compile one
        # per member count (a study took 114 s of CPU against 53 s); test_study_selection.py trains swarms
        "scales": [{"name": "small", "config": "proxy.yaml", "parallel": 0},
                   {"name": "large", "config": "proxy.yaml", "overrides": ["train.steps=12"], "mixtures": 6,
                    "parallel": 0}],
        "fit": {"regressors": ["linear", "loglinear"], "folds": 4},  # no gp: 4.5 s a fit here
        "propose": {"samples": 2000, "top_k": 16},
    },
    "refine": {"rounds": 2, "mixtures": 4, "stop_below": 0},
    "validation": {"config": "proxy.yaml", "overrides": ["train.steps=20"], "seeds": [0, 1]},
    "export": {"verify": False},
    "eval": {"limit": 20},
    "report": {"bootstrap": 200},
}
STAGES = (["data", "sample-r0", "sweep-small-r0", "sweep-large-r0", "fit-r0", "propose-r0"]
          + [f"{kind}-r{r}" for r in (1, 2) for kind in ("sample", "sweep-small", "fit", "propose")]
          + ["candidates", "candidates-small", "candidates-large"]
          + [f"validate-{c}-seed{s}" for s in (0, 1) for c in ("proposed", "natural", "uniform")]
          + [f"{kind}-{c}" for c in ("proposed", "natural", "uniform") for kind in ("export", "eval")] + ["report"])


def write_spec(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "proxy.yaml").write_text(yaml.safe_dump(PROXY))
    spec = folder / "study.yaml"
    spec.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    return spec


def stage_folder(out: Path, name: str) -> Path:
    found = [p for p in (out / "stages").iterdir() if re.fullmatch(re.escape(name) + r"-[0-9a-f]{10}", p.name)]
    assert len(found) == 1, (name, found)
    return found[0]
