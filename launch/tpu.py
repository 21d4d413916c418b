"""Run `mixlm train ... --distributed` on every worker of a Cloud TPU VM pod slice:
`gcloud compute tpus tpu-vm ssh NAME --worker=all --command "cd DIR && .venv/bin/mixlm train ...
--distributed"`. Every worker runs the same command; jax detects the pod by itself. Every user string in
the remote command is shell-quoted (a leading ~/ of --workdir becomes "$HOME"/...); --tpu, --zone and
--project must be Cloud resource names, so none can become another gcloud option.

  python launch/tpu.py --tpu my-v4-32 --zone us-central2-b -- train configs/experiments/regmix-1b.yaml
  python launch/tpu.py --dry-run --tpu my-v4-32 --zone us-central2-b --setup -- train CONFIG
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

if not __package__:  # run by path (python launch/tpu.py): import launch.* from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import common
from mixlm.config import ConfigError

# A Cloud resource name (TPU, zone); a project id may carry a `domain.com:` prefix. Nothing else reaches
# gcloud's argument list besides --command's value, so none can start another option (--tpu='--command=...').
RESOURCE_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
PROJECT_ID = re.compile(r"([a-z0-9.-]+:)?[a-z]([-a-z0-9]*[a-z0-9])?")


def resource_name(flag: str, value: str, pattern: re.Pattern = RESOURCE_NAME) -> str:
    """`value` unchanged if it is a Cloud resource name, else a ConfigError naming `flag`."""
    if not pattern.fullmatch(value):
        raise ConfigError(f"{flag} {value!r}: expected a Cloud resource name (lowercase letters, digits and -, "
                          "starting with a letter)")
    return value


def tpu_commands(
    argv: Sequence[str],
    *,
    tpu: str,
    zone: str,
    project: str | None = None,
    workdir: str = "~/mixlm",
    setup: bool = False,
    log: str | None = None,
    executable: str = common.DEFAULT_EXECUTABLE,
) -> list[list[str]]:
    """The gcloud commands that run `mixlm <argv> --distributed` on every worker of a TPU VM slice.

    setup: first install the repo already copied to `workdir` on every worker (`make install` and the
    jax[tpu] extra). log: run detached with nohup, each worker writing WORKDIR/<log>.<hostname> (the
    run survives the ssh session); default: in the foreground, output streamed back."""
    argv = common.check_command(argv)
    if not tpu or not zone:
        raise ConfigError("a TPU launch needs --tpu NAME and --zone ZONE")
    base = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", resource_name("--tpu", tpu),
            f"--zone={resource_name('--zone', zone)}", "--worker=all"]
    if project:
        base.append(f"--project={resource_name('--project', project, PROJECT_ID)}")
    cd = f"cd {common.shell_path('--workdir', workdir)}"
    commands = []
    if setup:
        commands.append([*base, "--command", f"{cd} && make install && .venv/bin/pip install -e '.[tpu]'"])
    run = common.shell_command(executable, [*argv, "--distributed"])
    if log:
        run = f"nohup {run} > {common.shell_path('--log', log)}.$(hostname) 2>&1 &"
    commands.append([*base, "--command", f"{cd} && {run}"])
    return commands


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tpu", required=True, help="TPU VM name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default=None)
    parser.add_argument("--workdir", default="~/mixlm", help="the repo's folder on the workers")
    parser.add_argument("--setup", action="store_true", help="first run `make install` + jax[tpu] on every worker")
    parser.add_argument("--log", default=None,
                        help="run detached (nohup), each worker logging to WORKDIR/LOG.<hostname>")
    common.add_dry_run_argument(parser, "print the gcloud commands, run nothing")
    common.add_executable_argument(parser)
    common.add_command_argument(parser)


def run(args: argparse.Namespace) -> int:
    commands = tpu_commands(args.command, tpu=args.tpu, zone=args.zone, project=args.project,
                            workdir=args.workdir, setup=args.setup, log=args.log, executable=args.mixlm)
    if args.dry_run:
        for cmd in commands:
            print(shlex.join(cmd))
        return 0
    common.need_tool("gcloud")
    for cmd in commands:
        print("+ " + shlex.join(cmd), flush=True)
        code = subprocess.call(cmd)
        if code:
            return code
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "launch/tpu.py") -> int:
    return common.run_main(__doc__, add_arguments, run, argv, prog)


if __name__ == "__main__":
    sys.exit(main())
