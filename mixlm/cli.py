"""`mixlm <verb>`: one entry point. Each verb lives in mixlm/commands/<verb>.py and defines
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when their verb runs,
so `mixlm params` does not pay for lm-eval or torch imports."""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> (module under mixlm.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "params": ("params", "print the exact parameter count of a model config (no allocation)"),
    "plan": ("plan", "per-device memory, fit, FLOPs/token and days to train on N GPUs/TPUs (no allocation)"),
    "train": ("train", "train a model: mixlm train CONFIG [section.key=value ...]"),
    "launch": ("launch", "train on many processes (local | tpu | slurm) or a sweep as a SLURM job array (slurm-sweep)"),
    "prepare": ("prepare", "tokenize raw documents per domain into shuffled ArrayRecord shards + manifests"),
    "tokenizer": ("tokenizer", "tokenizer train: a byte-level BPE saved as a HF tokenizer folder"),
    "sweep": ("sweep", "RegMix proxy sweep: one base config x N mixtures -> results.csv"),
    "mix": ("mix", "RegMix mixture search: mix prior | sample | fit | predict | optimize | fidelity"),
    "select": ("select", "data selection: quality signals, weighted top-k to a budget, classifier filter"),
    "export": ("export", "Orbax checkpoint -> transformers folder (+ tokenizer, model card); --verify logits"),
    "import": ("import_hf", "transformers Llama/Qwen3/GPT-2 folder -> mixlm checkpoint + model config"),
    "release": ("release", "upload an exported folder to the Hugging Face Hub (--dry-run lists the files)"),
    "eval": ("eval", "lm-eval suites, per-domain perplexity, local multiple choice on an export or a run"),
    "plot": ("plot", "train/val loss per domain and the mixture over time of runs side by side -> PNGs"),
    "study": ("study", "a whole mixture study from one YAML: search rounds, transfer, validation, report (resumable)"),
}


DESCRIPTION = """\
JAX/Flax pretraining for data-mixture and data-selection research: prepare domains, search mixtures
(RegMix), select data (Meta-rater, DCLM-style filters), train sharded, export to Hugging Face, evaluate
with lm-eval, release. `mixlm VERB -h` shows a verb's flags and their defaults."""


def _says_something(default) -> bool:
    return not (default is None or default is False or default == "" or default == []
                or default is argparse.SUPPRESS)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that ends each option with its default (not for None, False, '' and [] defaults, which say
    nothing, nor where the help text already names one); descriptions and epilogs keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not _says_something(action.default):
            return text
        if not (action.option_strings or action.nargs in ("?", "*")):
            return text
        return f"{text} (default: %(default)s)".strip()


class ArgumentParser(argparse.ArgumentParser):
    """Every mixlm parser: HelpFormatter unless told otherwise; sub-verbs made with add_subparsers are of
    this class too, so `mixlm tokenizer train -h` shows defaults like `mixlm prepare -h`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def format_help(self) -> str:
        for action in self._actions:  # an option without help text still shows its default
            if action.option_strings and action.help is None and _says_something(action.default):
                action.help = "(default: %(default)s)"
        return super().format_help()


OVERRIDES = "overrides"  # the positional of every verb that takes section.key=value config overrides


def add_overrides_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """The `section.key=value ...` positional of a verb that takes config overrides (after its CONFIG
    positional); `parse_verb_args` lets them stand anywhere on the command line, before or after flags."""
    parser.add_argument(OVERRIDES, nargs="*", metavar="section.key=value", help=f"config overrides, e.g. {example}")


def parse_verb_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`argv` parsed by a verb's parser. For a verb with an overrides positional (add_overrides_argument)
    flags and positionals may interleave, so `mixlm plan C --devices 8 model.remat=full` works as it reads
    (argparse's intermixed parsing); an unknown --flag is still an error (exit 2)."""
    if any(action.dest == OVERRIDES and not action.option_strings for action in parser._actions):
        return parser.parse_intermixed_args(argv)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = ArgumentParser(prog="mixlm", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (_, help_text) in COMMANDS.items():
        sub.add_parser(verb, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help()
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nmixlm: unknown verb {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    verb = argv[0]
    module = importlib.import_module(f"mixlm.commands.{COMMANDS[verb][0]}")
    verb_parser = ArgumentParser(prog=f"mixlm {verb}", description=COMMANDS[verb][1])
    module.add_arguments(verb_parser)
    args = parse_verb_args(verb_parser, argv[1:])
    from mixlm.errors import USER_ERRORS, ConfigError, exit_code

    try:
        return int(module.run(args) or 0)
    except ConfigError as e:
        print(f"mixlm {verb}: config error: {e}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:  # one a verb did not turn into its own line: still one line, never a traceback
        print(f"mixlm {verb}: {e}", file=sys.stderr)
        return exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
