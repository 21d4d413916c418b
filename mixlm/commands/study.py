"""`mixlm study run|status STUDY.yaml [dotted.key=value ...]`: a whole data-mixture study from one YAML (mixlm.study).

  mixlm study run configs/studies/demo.yaml                  # every stage not done yet; a rerun resumes
  mixlm study run configs/studies/demo.yaml --dry-run        # the stages and the cost of their training
  mixlm study status configs/studies/demo.yaml               # done, running, left
  mixlm study run STUDY.yaml --stage sweep-1m-r0 --shard 3/16  # one stage as a job (a sweep: one shard of it)
  mixlm study run STUDY.yaml validation.seeds=[0,1,2]         # a changed setting reruns what depends on it

Exit codes: those of the verb a stage ran (2 for a bad study file or a stage another process holds)."""

from __future__ import annotations

import argparse
import sys

from mixlm.cli import add_overrides_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = __doc__.split("\n", 2)[2]
    parser.add_argument("action", choices=("run", "status"), help="run the stages left, or say what is done")
    parser.add_argument("study", help="the study YAML (configs/studies/*.yaml)")
    add_overrides_argument(parser, "validation.seeds=[0,1,2] (dotted keys of the study file)")
    parser.add_argument("--out", default=None, help="the study folder (default: the file's `out`)")
    parser.add_argument("--dry-run", action="store_true", help="print the stages and their cost; run nothing")
    parser.add_argument("--stage", default="", help="run this stage only (its inputs must be done): a cluster job")
    parser.add_argument("--shard", default="", help="with --stage SWEEP: train shard I/N of it and record nothing")


def run(args: argparse.Namespace) -> int:
    from mixlm.errors import ConfigError
    from mixlm.study.graph import StageError
    from mixlm.study.pipeline import Study, format_status
    from mixlm.study.spec import check_study_folder, load_study
    from mixlm.study.stages import walk

    spec = load_study(args.study, args.overrides)
    if args.out:
        check_study_folder(args.out, "--out")
    if args.shard and not args.stage:
        raise ConfigError("--shard I/N needs --stage NAME (the sweep stage the shard belongs to)")
    plan = args.action == "status" or args.dry_run
    study = Study(spec, out=args.out, mode="plan" if plan else "run", only=args.stage, shard=args.shard,
                  log=lambda line: print(line, flush=True))
    try:
        walk(study)
    except StageError as e:
        print(f"mixlm study: {e}", file=sys.stderr)
        return e.exit_code
    if args.action == "status":
        print(format_status(study))
    elif args.dry_run:
        from mixlm.study.cost import format_dry_run

        print(format_dry_run(study))
    elif not args.stage:
        report = study.records.get("report")
        print(f"study {spec.name} done ({len(study.ran)} stages run now, {len(study.planned) - len(study.ran)} "
              f"found done): {report['outputs']['html'] if report else study.root}")
    return 0
