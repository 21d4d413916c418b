"""`make demo`: the whole loop on CPU in a few minutes, offline.

  1. generate the demo corpus (4 domains), train a byte-level BPE tokenizer, prepare ArrayRecord shards
  2. train llama-demo on the uniform mixture, sharded over the (fake) devices, with checkpoints
  3. report per-domain validation loss
  4. export the checkpoint to a Hugging Face folder (verified against transformers)
  5. score it with lm-evaluation-harness on the project's offline demo tasks

    python -m mixlm.demo --out runs/demo [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixlm.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--docs-per-domain", type=int, default=2000)
    parser.add_argument("--eval-limit", type=int, default=100, help="examples per lm-eval task")
    args = parser.parse_args(argv)
    out = Path(args.out)
    t0 = time.time()

    import jax

    from mixlm.data.demo_corpus import prepare_demo_data
    from mixlm.data.tokenizer import load_tokenizer_spec
    from mixlm.run_config import load_run_config

    print(f"[1/5] demo data -> {out / 'data'} (corpus, tokenizer, prepared shards)", flush=True)
    data = prepare_demo_data(out / "data", docs_per_domain=args.docs_per_domain, progress=True)
    vocab_size = load_tokenizer_spec(str(data["tokenizer"])).vocab_size

    repo = Path(__file__).resolve().parent.parent
    cfg = load_run_config(
        repo / "configs/experiments/demo.yaml",
        [
            f"data.prepared_dir={data['prepared']}",
            f"data.tokenizer={data['tokenizer']}",
            f"model.vocab_size={vocab_size}",
            f"train.steps={args.steps}",
            f"train.output_dir={out / 'train'}",
        ],
    )
    n = jax.device_count()
    print(f"[2/5] train {cfg.model.name} on {n} device{'s' if n != 1 else ''} -> {cfg.train.output_dir}", flush=True)
    from mixlm.train import train

    result = train(cfg)

    print("[3/5] validation loss per domain (nats/token):", flush=True)
    for key, value in sorted(result.eval.items()):
        print(f"  {key:<28} {value:.4f}")
    from mixlm.cli import main as mixlm

    hf_dir = out / "hf"
    print(f"[4/5] export -> {hf_dir}", flush=True)
    if mixlm(["export", str(cfg.train.output_dir), str(hf_dir), "--verify", "--overwrite"]) != 0:
        return 1
    print("[5/5] lm-eval on the offline demo suite", flush=True)
    if mixlm(["eval", str(hf_dir), "--suite", "demo", "--limit", str(args.eval_limit),
              "--out", str(out / "eval_demo.json")]) != 0:
        return 1
    (out / "summary.json").write_text(json.dumps({"eval": result.eval, "seconds": time.time() - t0}, indent=2))
    print(f"demo finished in {time.time() - t0:.0f}s; outputs under {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
