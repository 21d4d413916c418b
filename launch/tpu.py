"""Run `mixlm train ... --distributed` (or a sweep of swarms spanning the slice, `mixlm sweep ... --swarm K
--distributed`) on every worker of a Cloud TPU VM pod slice, and (optionally) own the
slice's life: create it as a queued resource or reuse it, install mixlm on every worker, run, stream each
worker's output, stop or delete it on exit.

  1. slice   --create: reuse the TPU VM if `tpu-vm describe` finds it, else `queued-resources create
             QR --node-id TPU --accelerator-type T --runtime-version R [--spot|--reserved]` and poll
             `queued-resources describe` until ACTIVE (FAILED/SUSPENDED or --create-timeout: give up).
  2. install --setup: `make install` + the jax[tpu] extra in the repo already copied to --workdir;
             --install-ref REF --repo URL: clone (once) and check out REF there, then the same;
             --wheel W.whl: scp the wheel to every worker, install it with [tpu] into WORKDIR/.venv;
             --upload PATH (repeatable): scp files or folders (e.g. configs) into --workdir.
  3. run     `gcloud compute tpus tpu-vm ssh TPU --worker=all --command "cd DIR && mixlm train ...
             --distributed"`; with --workers N (or a known --accelerator-type) one ssh per worker instead,
             each line of worker i's output prefixed [w<i>], a failing worker stopping the others;
             --log: detached (nohup), each worker writing WORKDIR/<log>.<hostname>.
  4. exit    --stop-on-exit: `tpu-vm stop`; --delete-on-exit: delete the queued resource it created (or the
             TPU VM), after the run ends, fails or is interrupted.

Every worker runs the same command; jax detects the pod by itself. Every user string in a remote command is
shell-quoted (a leading ~/ of --workdir becomes "$HOME"/...); --tpu, --zone, --project, --queued-resource,
--accelerator-type and --runtime-version must be Cloud resource names and --install-ref a git ref name, so
none can become another gcloud or git option. --dry-run prints every gcloud command in order (the polling
and clean-up steps as commented lines) and runs none.

  python launch/tpu.py --tpu my-v4-32 --zone us-central2-b -- train configs/experiments/regmix-1b.yaml
  python launch/tpu.py --dry-run --tpu mix-v5p --zone us-east5-a --create --accelerator-type v5p-32 --spot \\
      --install-ref main --repo https://github.com/ORG/mixlm.git --delete-on-exit \\
      -- train configs/experiments/regmix-1b-human.yaml mesh.fsdp=16 train.grad_accum_steps=2
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if not __package__:  # run by path (python launch/tpu.py): import launch.* from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import common
from launch.local import run_processes
from mixlm.errors import ConfigError

# A Cloud resource name (TPU, zone); a project id may carry a `domain.com:` prefix. Nothing else reaches
# gcloud's argument list besides --command's value, so none can start another option (--tpu='--command=...').
RESOURCE_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
PROJECT_ID = re.compile(r"([a-z0-9.-]+:)?[a-z]([-a-z0-9]*[a-z0-9])?")
# A TPU software version (v2-alpha-tpuv5, tpu-ubuntu2204-base) and a git branch, tag or commit.
RUNTIME_VERSION = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
GIT_REF = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./@^~+-]*")
# Where scp puts a wheel or an upload on each worker (in the ssh user's home; a constant, never user text).
STAGING = ".mixlm-staging"
# The runtime a new slice gets when --runtime-version is not given (cloud.google.com/tpu/docs/runtimes).
DEFAULT_RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite",
                   "v6e": "v2-alpha-tpuv6e"}
POLL_S = 30.0  # between two `queued-resources describe` while a slice is provisioned


def resource_name(flag: str, value: str, pattern: re.Pattern = RESOURCE_NAME) -> str:
    """`value` unchanged if it is a Cloud resource name, else a ConfigError naming `flag`."""
    if not pattern.fullmatch(value):
        raise ConfigError(f"{flag} {value!r}: expected a Cloud resource name (lowercase letters, digits and -, "
                          "starting with a letter)")
    return value


def workers_for(accelerator_type: str) -> int | None:
    """TPU VM hosts of a slice type: v2/v3/v4/v5p-N count TensorCores (8 per host: 4 chips of 2 cores, v2/v3
    4 chips of 2), v5litepod/v6e-N count chips (up to 8 on one host, else 4 per host); None if unknown."""
    match = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)", accelerator_type)
    if not match:
        return None
    family, n = match.group(1), int(match.group(2))
    if family in ("v5litepod", "v6e"):
        return 1 if n <= 8 else n // 4
    return max(1, n // 8)


@dataclass(frozen=True)
class Slice:
    """A TPU VM slice: its name, zone and project, checked as Cloud resource names."""

    tpu: str
    zone: str
    project: str | None = None

    def __post_init__(self):
        if not self.tpu or not self.zone:
            raise ConfigError("a TPU launch needs --tpu NAME and --zone ZONE")
        resource_name("--tpu", self.tpu)
        resource_name("--zone", self.zone)
        if self.project:
            resource_name("--project", self.project, PROJECT_ID)

    def gcloud(self, *words: str) -> list[str]:
        """`gcloud compute tpus WORDS --zone=Z [--project=P]`."""
        cmd = ["gcloud", "compute", "tpus", *words, f"--zone={self.zone}"]
        return cmd + ([f"--project={self.project}"] if self.project else [])

    def ssh(self, command: str, worker: str = "all") -> list[str]:
        cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.tpu, f"--zone={self.zone}", f"--worker={worker}"]
        return cmd + ([f"--project={self.project}"] if self.project else []) + ["--command", command]

    def scp(self, local: str | Path, remote: str) -> list[str]:
        """Copies a local file or folder to `remote` (relative to the ssh user's home) on every worker; the
        local path is made absolute, so a name like `-x` is no option."""
        return [*self.gcloud("tpu-vm", "scp", "--recurse", os.path.abspath(local), f"{self.tpu}:{remote}"),
                "--worker=all"]


@dataclass(frozen=True)
class Creation:
    """How to get the slice: reuse it if it exists, else a queued resource `queued_resource` for it."""

    queued_resource: str
    accelerator_type: str
    runtime_version: str
    spot: bool = False
    reserved: bool = False


def creation(tpu: str, accelerator_type: str | None, runtime_version: str | None = None,
             queued_resource: str | None = None, *, spot: bool = False, reserved: bool = False) -> Creation:
    """The checked settings of `--create` (see the module docstring)."""
    if not accelerator_type:
        raise ConfigError("--create needs --accelerator-type, e.g. v5p-32 (16 chips on 4 hosts)")
    resource_name("--accelerator-type", accelerator_type, RUNTIME_VERSION)
    family = accelerator_type.split("-")[0]
    runtime = runtime_version or DEFAULT_RUNTIME.get(family)
    if not runtime:
        raise ConfigError(f"--accelerator-type {accelerator_type}: no default runtime for {family}; give "
                          "--runtime-version (cloud.google.com/tpu/docs/runtimes)")
    if spot and reserved:
        raise ConfigError("--spot and --reserved exclude each other; choose one")
    return Creation(resource_name("--queued-resource", queued_resource or tpu),
                    accelerator_type, resource_name("--runtime-version", runtime, RUNTIME_VERSION), spot, reserved)


def create_commands(tpu_slice: Slice, how: Creation) -> dict[str, list[str]]:
    """{'exists': describe the TPU VM (0: reuse it), 'create': the queued resource, 'state': its state}."""
    create = [*tpu_slice.gcloud("queued-resources", "create", how.queued_resource), f"--node-id={tpu_slice.tpu}",
              f"--accelerator-type={how.accelerator_type}", f"--runtime-version={how.runtime_version}"]
    create += ["--spot"] if how.spot else ["--reserved"] if how.reserved else []
    return {
        "exists": [*tpu_slice.gcloud("tpu-vm", "describe", tpu_slice.tpu), "--format=value(state)"],
        "create": create,
        "state": [*tpu_slice.gcloud("queued-resources", "describe", how.queued_resource),
                  "--format=value(state.state)"],
    }


def install_commands(
    tpu_slice: Slice,
    *,
    workdir: str,
    setup: bool = False,
    ref: str | None = None,
    repo: str | None = None,
    wheel: str | None = None,
    uploads: Sequence[str] = (),
) -> list[list[str]]:
    """The commands that put mixlm on every worker (at most one of setup, ref, wheel) and copy `uploads`
    into `workdir`; see the module docstring."""
    if sum(bool(x) for x in (setup, ref, wheel)) > 1:
        raise ConfigError("--setup, --install-ref and --wheel each install mixlm; give one of them")
    if repo and not ref:
        raise ConfigError("--repo needs --install-ref (the branch, tag or commit to check out)")
    wd = common.shell_path("--workdir", workdir)
    commands = []
    if ref:
        if not GIT_REF.fullmatch(common.plain_text("--install-ref", ref)):
            raise ConfigError(f"--install-ref {ref!r}: expected a git branch, tag or commit (letters, digits and "
                              "_ . / @ ^ ~ + -, not starting with -)")
        if not repo:
            raise ConfigError("--install-ref needs --repo URL (the git remote every worker clones)")
        url = shlex.quote(common.plain_text("--repo", repo))
        commands.append(tpu_slice.ssh(
            f"set -e; if [ ! -d {wd}/.git ]; then git clone --quiet -- {url} {wd}; fi; cd {wd} && "
            f"git fetch --quiet -- {url} {shlex.quote(ref)} && git checkout --quiet --detach FETCH_HEAD && "
            "make install && .venv/bin/pip install -e '.[tpu]'"))
    if wheel or uploads:
        commands.append(tpu_slice.ssh(f"rm -rf {STAGING} && mkdir -p {STAGING}/upload {wd}"))
    if wheel:
        name = Path(common.plain_text("--wheel", wheel)).name
        if not name.endswith(".whl"):
            raise ConfigError(f"--wheel {wheel!r}: expected a .whl file (python -m build --wheel)")
        commands.append(tpu_slice.scp(wheel, f"{STAGING}/"))
        commands.append(tpu_slice.ssh(f"cd {wd} && python3 -m venv .venv && .venv/bin/pip install --quiet "
                                      f'"$HOME"/{STAGING}/{shlex.quote(name + "[tpu]")}'))
    for path in uploads:
        commands.append(tpu_slice.scp(common.plain_text("--upload", path), f"{STAGING}/upload/"))
    if uploads:
        commands.append(tpu_slice.ssh(f'cp -R "$HOME"/{STAGING}/upload/. {wd}/'))
    if setup:
        commands.append(tpu_slice.ssh(f"cd {wd} && make install && .venv/bin/pip install -e '.[tpu]'"))
    return commands


def run_commands(
    tpu_slice: Slice,
    argv: Sequence[str],
    *,
    workdir: str,
    log: str | None = None,
    workers: int | None = None,
    executable: str = common.DEFAULT_EXECUTABLE,
) -> list[list[str]]:
    """`mixlm <argv> --distributed` in `workdir` on every worker: one `--worker=all` ssh, or with `workers`
    one ssh per worker (run together, output prefixed [w<i>] by `run`)."""
    argv = common.check_command(argv)
    cd = f"cd {common.shell_path('--workdir', workdir)}"
    run = common.shell_command(executable, [*argv, "--distributed"])
    if log:
        if workers:
            raise ConfigError("--log runs detached on every worker at once; leave out --workers (or --log)")
        run = f"nohup {run} > {common.shell_path('--log', log)}.$(hostname) 2>&1 &"
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}: expected at least 1 (the TPU VM hosts of the slice)")
    if not workers:
        return [tpu_slice.ssh(f"{cd} && {run}")]
    return [tpu_slice.ssh(f"{cd} && {run}", worker=str(i)) for i in range(workers)]


def cleanup_command(tpu_slice: Slice, *, delete: bool, stop: bool, queued_resource: str | None) -> list[str] | None:
    """What --delete-on-exit / --stop-on-exit run: delete the queued resource (and so its TPU VM) or the TPU
    VM; or stop the TPU VM. None when neither was asked for."""
    if delete and stop:
        raise ConfigError("--delete-on-exit and --stop-on-exit exclude each other; choose one")
    if delete and queued_resource:
        return [*tpu_slice.gcloud("queued-resources", "delete", queued_resource), "--force", "--quiet"]
    if delete:
        return [*tpu_slice.gcloud("tpu-vm", "delete", tpu_slice.tpu), "--quiet"]
    if stop:
        return tpu_slice.gcloud("tpu-vm", "stop", tpu_slice.tpu)
    return None


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
    workers: int | None = None,
) -> list[list[str]]:
    """The gcloud commands that run `mixlm <argv> --distributed` on every worker of an existing TPU VM slice.

    setup: first install the repo already copied to `workdir` on every worker (`make install` and the
    jax[tpu] extra). log: run detached with nohup, each worker writing WORKDIR/<log>.<hostname> (the
    run survives the ssh session); default: in the foreground, output streamed back."""
    argv = common.check_command(argv)
    tpu_slice = Slice(tpu, zone, project)
    return [*install_commands(tpu_slice, workdir=workdir, setup=setup),
            *run_commands(tpu_slice, argv, workdir=workdir, log=log, workers=workers, executable=executable)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tpu", required=True, help="TPU VM name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default=None)
    parser.add_argument("--workdir", default="~/mixlm", help="the repo's folder on the workers")
    slice_group = parser.add_argument_group("the slice (create or reuse, clean up)")
    slice_group.add_argument("--create", action="store_true",
                             help="reuse --tpu if it exists, else create it as a queued resource and wait")
    slice_group.add_argument("--accelerator-type", default=None, help="with --create: e.g. v5p-32, v4-32")
    slice_group.add_argument("--runtime-version", default=None,
                             help=f"with --create (default by type: {', '.join(f'{k} {v}' for k, v in DEFAULT_RUNTIME.items())})")
    slice_group.add_argument("--queued-resource", default=None, help="with --create: its id (default: --tpu)")
    slice_group.add_argument("--spot", action="store_true", help="with --create: spot capacity")
    slice_group.add_argument("--reserved", action="store_true", help="with --create: the project's reservation")
    slice_group.add_argument("--create-timeout", type=float, default=3600.0,
                             help="seconds to wait for the queued resource to become ACTIVE (default 3600)")
    slice_group.add_argument("--delete-on-exit", action="store_true",
                             help="delete the slice (its queued resource with --create) when the run ends")
    slice_group.add_argument("--stop-on-exit", action="store_true", help="stop the TPU VM when the run ends")
    install = parser.add_argument_group("installing mixlm on every worker (one of)")
    install.add_argument("--setup", action="store_true",
                         help="`make install` + jax[tpu] in the repo already copied to --workdir")
    install.add_argument("--install-ref", default=None, help="clone --repo into --workdir and check out this ref")
    install.add_argument("--repo", default=None, help="with --install-ref: the git URL every worker clones")
    install.add_argument("--wheel", default=None, help="scp this wheel and install it (with [tpu]) in WORKDIR/.venv")
    install.add_argument("--upload", action="append", default=[],
                         help="scp a file or folder into --workdir (repeatable), e.g. configs")
    parser.add_argument("--workers", type=int, default=None,
                        help="one ssh per worker, output prefixed [w<i>] (default: from --accelerator-type, "
                             "else one --worker=all ssh)")
    parser.add_argument("--log", default=None,
                        help="run detached (nohup), each worker logging to WORKDIR/LOG.<hostname>")
    common.add_dry_run_argument(parser, "print every gcloud command in order, run nothing")
    common.add_executable_argument(parser)
    common.add_command_argument(parser)


@dataclass(frozen=True)
class LaunchPlan:
    """Every command of one launch, in order (mixlm.commands.launch / `run` execute it)."""

    create: dict[str, list[str]] | None
    create_timeout_s: float
    install: list[list[str]]
    run: list[list[str]]
    cleanup: list[str] | None

    def dry_run_lines(self) -> list[str]:
        lines = []
        if self.create:
            lines += ["# reuse the TPU VM if this succeeds, else create it:", shlex.join(self.create["exists"]),
                      shlex.join(self.create["create"]),
                      f"# every {POLL_S:.0f} s until ACTIVE (at most {self.create_timeout_s:.0f} s):",
                      shlex.join(self.create["state"])]
        lines += [shlex.join(cmd) for cmd in self.install]
        if len(self.run) > 1:
            lines.append(f"# together, output prefixed [w<i>]: {len(self.run)} workers")
        lines += [shlex.join(cmd) for cmd in self.run]
        if self.cleanup:
            lines += ["# on exit (done, failed or interrupted):", shlex.join(self.cleanup)]
        return lines


def launch_plan(args: argparse.Namespace) -> LaunchPlan:
    """The checked commands of a launch from its parsed arguments (no gcloud call)."""
    argv = common.check_command(args.command)
    tpu_slice = Slice(args.tpu, args.zone, args.project)
    how = None
    if args.create:
        how = creation(args.tpu, args.accelerator_type, args.runtime_version, args.queued_resource,
                       spot=args.spot, reserved=args.reserved)
    else:
        given = [f for f, v in (("--accelerator-type", args.accelerator_type), ("--runtime-version",
                 args.runtime_version), ("--queued-resource", args.queued_resource), ("--spot", args.spot),
                 ("--reserved", args.reserved)) if v]
        if given:
            raise ConfigError(f"{given[0]} only applies with --create (make the slice); add --create or drop it")
    workers = args.workers
    if workers is None and how is not None and not args.log:
        workers = workers_for(how.accelerator_type)
    if (args.delete_on_exit or args.stop_on_exit) and args.log:
        raise ConfigError("--log detaches the run, so the slice would be stopped under it; drop --log or the "
                          "--delete-on-exit/--stop-on-exit flag")
    return LaunchPlan(
        create=create_commands(tpu_slice, how) if how else None,
        create_timeout_s=args.create_timeout,
        install=install_commands(tpu_slice, workdir=args.workdir, setup=args.setup, ref=args.install_ref,
                                 repo=args.repo, wheel=args.wheel, uploads=args.upload),
        run=run_commands(tpu_slice, argv, workdir=args.workdir, log=args.log, workers=workers,
                         executable=args.mixlm),
        cleanup=cleanup_command(tpu_slice, delete=args.delete_on_exit, stop=args.stop_on_exit,
                                queued_resource=how.queued_resource if how else None),
    )


def _call(cmd: list[str]) -> int:
    print("+ " + shlex.join(cmd), flush=True)
    return subprocess.call(cmd)


def _wait_active(state_cmd: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        done = subprocess.run(state_cmd, capture_output=True, text=True, check=False)
        state = done.stdout.strip()
        print(f"queued resource: {state or done.stderr.strip() or 'unknown'}", flush=True)
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            raise ConfigError(f"the queued resource is {state}; see `{shlex.join(state_cmd[:-1])}`")
        if time.monotonic() > deadline:
            raise ConfigError(f"the queued resource is still {state or 'not ready'} after {timeout_s:.0f} s; "
                              "raise --create-timeout or try another zone")
        time.sleep(POLL_S)


def execute(plan: LaunchPlan) -> int:
    """Runs a plan: the slice (reused or created and waited for), the installs, the run, then the clean-up
    whatever happened (also after a failure or Ctrl-C). Returns the first non-zero exit code, else 0."""
    try:
        if plan.create:
            if subprocess.run(plan.create["exists"], capture_output=True, check=False).returncode == 0:
                print(f"reusing {plan.create['exists'][5]}", flush=True)
            else:
                code = _call(plan.create["create"])
                if code:
                    return code
                _wait_active(plan.create["state"], plan.create_timeout_s)
        for cmd in plan.install:
            code = _call(cmd)
            if code:
                return code
        if len(plan.run) == 1:
            return _call(plan.run[0])
        for cmd in plan.run:
            print("+ " + shlex.join(cmd), flush=True)
        return run_processes(plan.run, label="w")
    finally:
        if plan.cleanup:
            _call(plan.cleanup)


def run(args: argparse.Namespace) -> int:
    plan = launch_plan(args)
    if args.dry_run:
        print("\n".join(plan.dry_run_lines()))
        return 0
    common.need_tool("gcloud")
    return execute(plan)


def main(argv: Sequence[str] | None = None, prog: str = "launch/tpu.py") -> int:
    return common.run_main(__doc__, add_arguments, run, argv, prog)


if __name__ == "__main__":
    sys.exit(main())
