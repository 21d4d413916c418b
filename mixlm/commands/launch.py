"""`mixlm launch local|tpu|slurm [options] -- train CONFIG [overrides]`: one training on many processes;
`mixlm launch slurm-sweep [options] -- sweep BASE --mixtures M --out O`: a proxy sweep as a job array;
`mixlm launch ray slurm|tpu|hosts [options] -- prepare|select ...`: a data stage on a Ray cluster.

  mixlm launch local -n 2 --cpu-devices 4 -- train configs/experiments/demo.yaml   # 2 processes here
  mixlm launch tpu --tpu my-v4-32 --zone us-central2-b -- train configs/experiments/regmix-1b.yaml
  mixlm launch slurm --nodes 2 --gpus-per-node 8 --workdir /shared/mixlm --out job.sbatch \\
      -- train configs/experiments/regmix-1b.yaml          # writes the script; --submit runs sbatch
  mixlm launch slurm-sweep --shards 16 --workdir /shared/mixlm -- sweep configs/experiments/regmix-proxy.yaml \\
      --mixtures mixtures/ --out sweep/                    # then `mixlm sweep ...` once records the runs
  mixlm launch ray slurm --nodes 8 --cpus-per-node 64 --workdir /shared/mixlm --out prep.sbatch \\
      -- prepare --out /shared/prepared --tokenizer /shared/tok --domain web=/shared/raw/web/   # a Ray cluster

The launchers are the repo's launch/ scripts (launch/local.py, tpu.py, slurm.py, sweep.py, ray.py), not part of
the library: this verb finds that folder next to the mixlm package and runs the script's main() with the
arguments after WHERE, exactly as `python launch/<script>.py ARGS` would.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# WHERE -> (script in launch/, one-line help)
SCRIPTS: dict[str, tuple[str, str]] = {
    "local": ("local", "N jax.distributed processes on this machine"),
    "tpu": ("tpu", "every worker of a Cloud TPU VM slice, over gcloud ssh"),
    "slurm": ("slurm", "an sbatch script: one task per GPU, srun ... --distributed"),
    "slurm-sweep": ("sweep", "a proxy sweep as a SLURM job array: task I runs --shard I/K"),
    "ray": ("ray", "a Ray cluster (SLURM nodes, a TPU pod's or ssh hosts) running one data stage, --engine ray"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = "\n".join(f"  {name:<12} {help_text}" for name, (_, help_text) in SCRIPTS.items())
    parser.epilog = f"WHERE (`mixlm launch WHERE --help` for its options):\n{where}\n\n{__doc__}"
    # argparse.PARSER: WHERE and every argument after it, options included, go to the script's own parser.
    parser.add_argument("where", nargs=argparse.PARSER, choices=list(SCRIPTS), metavar="WHERE",
                        help="local | tpu | slurm | slurm-sweep | ray, then its options and -- COMMAND")


def launch_folder() -> Path:
    """The repo's launch/ folder: next to the mixlm package in a clone (an editable install)."""
    import mixlm

    return Path(mixlm.__file__).resolve().parents[1] / "launch"


def run(args) -> int:
    where, argv = args.where[0], args.where[1:]
    folder = launch_folder()
    script = folder / f"{SCRIPTS[where][0]}.py"
    if not (script.is_file() and (folder / "__init__.py").is_file()):
        print(f"mixlm launch: no {script}: the launchers are the repo's launch/ scripts, not part of the "
              "installed package; run from a clone (pip install -e .)", file=sys.stderr)
        return 2
    if str(folder.parent) not in sys.path:
        sys.path.insert(0, str(folder.parent))
    module = importlib.import_module(f"launch.{SCRIPTS[where][0]}")
    return module.main(argv, prog=f"mixlm launch {where}")
