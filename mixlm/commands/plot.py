"""mixlm plot RUN_DIR... [--out DIR]: train loss, validation loss per domain and the mixture (over time, when it
changes) of one or more training runs, side by side, as PNGs (mixlm.training_curves)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training output folders (train.output_dir) "
                        "holding metrics.jsonl")
    parser.add_argument("--out", default="plots", help="folder for train_loss.png, val_loss.png, mixture.png "
                        "(each run's mixture; when a figure cannot be drawn the output says why) (default: plots)")


def run(args: argparse.Namespace) -> int:
    from mixlm import storage
    from mixlm.training_curves import PlotError, plot_runs

    for path in args.runs:
        storage.check_location(path, "RUN_DIR")
    storage.check_location(args.out, "--out")
    try:
        written = plot_runs(args.runs, args.out, log=lambda text: print(f"mixlm plot: {text}", file=sys.stderr))
    except PlotError as e:
        print(f"mixlm plot: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0
