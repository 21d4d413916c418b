"""The study runs mixlm's own verbs, in this process, so every stage folder holds exactly what the verb writes and
its record holds the command line that wrote it (a researcher can leave the study at any stage and go on by hand).

    run_verb(task, ["mix", "fit", "--mixtures", ..., "--out", str(task.folder)])

A proxy sweep is spelled in one place, mixlm.study.runner (the study's link to the proxy runner).
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

