"""The study runs mixlm's own verbs, in this process, so every stage folder holds exactly what the verb writes and
its record holds the command line that wrote it (a researcher can leave the study at any stage and go on by hand).

    run_verb(task, ["mix", "fit", "--mixtures", ..., "--out", str(task.folder)])
    sweep_argv(config, overrides, mixtures_csv, out, swarm=8)     # the one place a proxy sweep is spelled

`sweep_argv` is the study's only link to the proxy runner: it spells `mixlm sweep`, whose flags stay when the
runner moves (issue 25), so the study follows it unchanged.
"""

from __future__ import annotations

import os
import shlex
import sys

from mixlm.study.graph import StageError, StageWork


def shown(argv: list[str]) -> str:
    return "mixlm " + shlex.join(argv)


def run_verb(task: StageWork, argv: list[str]) -> None:
    """`mixlm <argv>` through mixlm.cli.main in this process; a non-zero exit is a StageError with its code (the
    verb has printed its own line saying why)."""
    from mixlm.cli import main

    argv = [os.fspath(a) for a in argv]
    task.commands.append(argv)
    task.log(f"study: $ {shown(argv)}")
    sys.stdout.flush()
    try:
        code = main(argv)
    except RuntimeError as e:  # a sweep whose runs failed, a preempted swarm: the verb's own one-line reason
        raise StageError(f"stage {task.stage.name}: `{shown(argv)}` stopped: {e}") from None
    if code:
        raise StageError(f"stage {task.stage.name}: `{shown(argv)}` exited {code} (its reason is above); fix it and "
                         "rerun the study: finished stages are kept", code)


def sweep_argv(config: str, overrides: list[str], mixtures_csv, out, *, swarm: int = 0, parallel: int = 0,
               limit: int = 0, shard: str = "") -> list[str]:
    """The `mixlm sweep` command of a proxy sweep: `config` + `overrides` for every run, one run per row of
    `mixtures_csv` (the first `limit`), into the sweep folder `out`; K at a time in one program (`swarm`) or
    `parallel` processes (0: one after another here); `shard` I/N trains one shard and records nothing."""
    argv = ["sweep", config, *overrides, "--mixtures", os.fspath(mixtures_csv), "--out", os.fspath(out)]
    argv += ["--swarm", str(swarm)] if swarm else ["--parallel", str(parallel)]
    if limit:
        argv += ["--limit", str(limit)]
    if shard:
        argv += ["--shard", shard]
    return argv
