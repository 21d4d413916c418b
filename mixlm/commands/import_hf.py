"""mixlm import HF_DIR OUT_DIR: a transformers LlamaForCausalLM / Qwen3ForCausalLM / GPT2LMHeadModel folder as a
mixlm checkpoint (params only) plus its model config, for continued pretraining via checkpoint.init_from."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", help="a transformers model folder (config.json + safetensors)")
    parser.add_argument("out_dir", help="the folder to write (checkpoints/0/, model.yaml, config.yaml, tokenizer/)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")


def run(args: argparse.Namespace) -> int:
    from mixlm.checkpoint import CheckpointError
    from mixlm.errors import ExportError
    from mixlm.hf.import_hf import import_hf

    try:
        result = import_hf(args.hf_dir, args.out_dir, overwrite=args.overwrite)
    except (ExportError, CheckpointError) as e:
        print(f"mixlm import: {e}", file=sys.stderr)
        return 2
    print(f"wrote {result.out_dir}: {result.num_params:,} params in {result.seconds:.1f} s\n"
          f"  model config: {result.model_config}\n  experiment config: {result.experiment_config}\n"
          f"  continue pretraining: `model: {result.model_config}` in an experiment YAML, then\n"
          f"    mixlm train EXPERIMENT.yaml checkpoint.init_from={result.out_dir}")
    return 0
