"""What the launch scripts share: the check of the mixlm command they start on every process, the
quoting of that command for a shell line, the sbatch header and script output of slurm.py and
sweep.py, argument helpers, and `run_main`, which turns a usage or config error into one line on
stderr and exit code 2."""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mixlm.config import ConfigError

# Verbs that take --coordinator/--num-processes/--process-id (or --distributed).
MULTI_PROCESS_VERBS = ("train",)
# The mixlm command on the cluster's machines, relative to the repo folder (`make install` creates it).
DEFAULT_EXECUTABLE = ".venv/bin/mixlm"


def check_command(argv: Sequence[str]) -> list[str]:
    """`argv` is a mixlm command line without the program name: ['train', CONFIG, overrides...]."""
    argv = list(argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv or argv[0] not in MULTI_PROCESS_VERBS:
        raise ConfigError(
            f"launch runs one of {', '.join(MULTI_PROCESS_VERBS)} on every process, got "
            f"{shlex.join(argv) or 'nothing'}; e.g. `mixlm launch local -n 2 -- train CONFIG`"
        )
    for flag in ("--coordinator", "--num-processes", "--process-id", "--distributed"):
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            raise ConfigError(f"{flag} is set by the launcher; leave it out of the command")
    return argv


def shell_command(executable: str, argv: Sequence[str]) -> str:
    """`executable` (itself a command line, e.g. 'python -m mixlm.cli') and `argv`, quoted for a shell."""
    return shlex.join([*shlex.split(executable), *argv])


def sbatch_header(job_name: str, time_limit: str, output: str, partition: str | None,
                  account: str | None) -> list[str]:
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --time={time_limit}",
        f"#SBATCH --output={output}",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    return lines


def need_tool(tool: str) -> None:
    if shutil.which(tool) is None:
        raise ConfigError(f"{tool} is not on PATH here; install it, or use --dry-run to print the commands")


def add_command_argument(parser: argparse.ArgumentParser,
                         help: str = "-- train CONFIG [section.key=value ...]") -> None:
    parser.add_argument("command", nargs=argparse.REMAINDER, help=help)


def add_executable_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mixlm", default=DEFAULT_EXECUTABLE, help="the mixlm command there, from --workdir")


def add_dry_run_argument(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--dry-run", action="store_true", help=help)


def add_sbatch_arguments(parser: argparse.ArgumentParser, *, job_name: str, time_limit: str) -> None:
    """The options slurm.py and sweep.py share: where the repo is, the job's resources, the script file."""
    parser.add_argument("--workdir", required=True, help="the repo's folder on the shared file system")
    parser.add_argument("--job-name", default=job_name)
    parser.add_argument("--time", default=time_limit, help="time limit (HH:MM:SS)")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--cpus-per-task", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="write the script here (default: print it)")
    parser.add_argument("--submit", action="store_true", help="sbatch the script written to --out")
    add_dry_run_argument(parser, "print the script, write and submit nothing")


def emit_sbatch_script(script: str, out: Path | None, *, submit: bool, dry_run: bool) -> int:
    """Prints the script (no --out, or --dry-run), else writes it to `out` (never over an existing file)
    and, with submit, runs `sbatch OUT`."""
    if out is None and submit:
        raise ConfigError("--submit needs --out (the script file to submit)")
    if out is not None and out.exists():
        raise ConfigError(f"{out} exists; choose another --out (it is not overwritten)")
    if out is None or dry_run:
        print(script, end="")
        if out is not None:
            print(f"dry run: would write {out}" + (f" and run sbatch {out}" if submit else ""), file=sys.stderr)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(script)
    print(f"wrote {out}")
    if submit:
        need_tool("sbatch")
        return subprocess.call(["sbatch", str(out)])
    return 0


class LaunchParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit code 2, like the launchers' config errors."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def run_main(
    doc: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None,
    prog: str,
) -> int:
    """A launch script's main: parses `argv` (default sys.argv[1:]) and runs it; a ConfigError is one line
    `PROG: message` on stderr and exit code 2."""
    parser = LaunchParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        return int(run(args) or 0)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
