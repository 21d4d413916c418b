"""What the launch scripts share: the check of the mixlm command they start on every process, the
quoting of every user string for a shell line or an `#SBATCH` line, the sbatch header and script output
of slurm.py and sweep.py, argument helpers, and `run_main`, which turns a usage or config error into one
line on stderr and exit code 2.

Quoting rules (a user string never becomes shell syntax): everything placed in a shell command is
`shlex.quote`d, word by word; a leading `~/` of a path is expanded explicitly as `"$HOME"/...`, never by
leaving the path unquoted; a value with a control character (newline, NUL, ...) is refused, since it
could end a line of a generated script; `#SBATCH` values are limited to a safe set of characters, since
sbatch splits those lines on blanks and quotes itself."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mixlm.errors import ConfigError

# Verbs that take --coordinator/--num-processes/--process-id (or --distributed); `sweep` only with --swarm K.
MULTI_PROCESS_VERBS = ("train", "sweep")
# The mixlm command on the cluster's machines, relative to the repo folder (`make install` creates it).
DEFAULT_EXECUTABLE = ".venv/bin/mixlm"


def check_command(argv: Sequence[str]) -> list[str]:
    """`argv` is a mixlm command line without the program name: ['train', CONFIG, overrides...] or
    ['sweep', CONFIG, ..., '--swarm', K] (one sweep of swarms spanning every process)."""
    argv = list(argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv or argv[0] not in MULTI_PROCESS_VERBS:
        raise ConfigError(
            f"launch runs one of {', '.join(MULTI_PROCESS_VERBS)} on every process, got "
            f"{shlex.join(argv) or 'nothing'}; e.g. `mixlm launch local -n 2 -- train CONFIG`"
        )
    if argv[0] == "sweep" and not any(a == "--swarm" or a.startswith("--swarm=") for a in argv):
        raise ConfigError(f"launch runs `sweep` on every process only as swarms spanning them: add --swarm K "
                          f"(K a multiple of the process count) to {shlex.join(argv)}, or run a job array of "
                          "shards with `mixlm launch slurm-sweep`")
    for flag in ("--coordinator", "--num-processes", "--process-id", "--distributed"):
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            raise ConfigError(f"{flag} is set by the launcher; leave it out of the command")
    return argv


# What an `#SBATCH --flag=VALUE` value may hold: sbatch splits those lines on blanks, reads quotes and
# backslashes, and ends them at `#`, so anything else could add an option or drop the rest of the line.
SBATCH_VALUE = re.compile(r"[A-Za-z0-9_.,:@%+=/-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def plain_text(flag: str, value: str) -> str:
    """`value` unchanged; a ConfigError naming `flag` if it holds a control character (newline, NUL, ...)."""
    if _CONTROL.search(value):
        raise ConfigError(f"{flag} {value!r}: contains a control character (newline, tab, NUL, ...); remove it")
    return value


def shell_path(flag: str, path: str) -> str:
    """`path` as one shell word; a leading `~/` (or a bare `~`) becomes `"$HOME"/...`, expanded by the shell
    that runs the command, the rest quoted. `~user/...` is refused (give the absolute path)."""
    if not plain_text(flag, path):
        raise ConfigError(f"{flag} is empty; give a folder")
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        rest = path[2:].lstrip("/")
        return '"$HOME"' + (f"/{shlex.quote(rest)}" if rest else "")
    if path.startswith("~"):
        raise ConfigError(f"{flag} {path!r}: only a leading ~/ is expanded (to $HOME); give the absolute path")
    return shlex.quote(path)


def shell_command(executable: str, argv: Sequence[str]) -> str:
    """`executable` (itself a command line, e.g. 'python -m mixlm.cli', split as a shell would) and `argv`,
    each word quoted for a shell."""
    try:
        words = shlex.split(plain_text("--mixlm", executable))
    except ValueError as e:  # e.g. an unbalanced quote
        raise ConfigError(f"--mixlm {executable!r}: not a command line ({e})") from None
    if not words:
        raise ConfigError("--mixlm is empty; give the mixlm command there, e.g. .venv/bin/mixlm")
    for arg in argv:
        plain_text("the command after --", arg)
    return shlex.join([*words, *argv])


def sbatch_value(flag: str, value: str) -> str:
    """`value` unchanged if it is safe after `#SBATCH --flag=`; else a ConfigError naming `flag`."""
    if not SBATCH_VALUE.fullmatch(value):
        raise ConfigError(f"{flag} {value!r}: an #SBATCH value may hold only letters, digits and _ . , : @ % + = / -")
    return value


def sbatch_header(job_name: str, time_limit: str, output: str, partition: str | None,
                  account: str | None) -> list[str]:
    """The first lines of an sbatch script; each user value is checked by `sbatch_value`."""
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={sbatch_value('--job-name', job_name)}",
        f"#SBATCH --time={sbatch_value('--time', time_limit)}",
        f"#SBATCH --output={sbatch_value('--output', output)}",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={sbatch_value('--partition', partition)}")
    if account:
        lines.append(f"#SBATCH --account={sbatch_value('--account', account)}")
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
        return subprocess.call(["sbatch", str(out.resolve())])  # absolute: a name like -x is no option
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
