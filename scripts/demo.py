#!/usr/bin/env python
"""`make demo`: the main job on an embedded default, offline, in a few minutes on 2 CPU cores.

Train a ~5M-parameter Llama from scratch on the English documentation that ships with CPython (``pydoc_data``),
with the tokenizer trained on the same text, through the real user path:
``accelerate launch --config_file accelerate_configs/cpu_single.yaml recipes/train_clm.py --config ...``.
It prints where the model, the log and the loss plot are.

    python scripts/demo.py [--output-dir outputs/demo] [key=value overrides for the recipe ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = [
    "model_config.model_type=llama", "model_config.hidden_size=256", "model_config.intermediate_size=688",
    "model_config.num_hidden_layers=4", "model_config.num_attention_heads=8", "model_config.num_key_value_heads=4",
    "model_config.max_position_embeddings=512", "model_config.vocab_size=4096",
]
DEMO_TRAINING = [
    "block_size=128", "micro_batch_size=8", "gradient_accumulation_steps=1", "max_steps=200",
    "learning_rate=2e-3", "warmup_steps=20", "validation_split=0.05", "eval_every_n_steps=50",
    "eval_max_batches=20", "save_every_n_steps=50", "keep_last_k=2", "log_every_n_steps=10",
]


def write_corpus(path: Path) -> Path:
    from hf_optim.training.data import builtin_corpus

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(builtin_corpus()))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for the training recipe")
    args = parser.parse_args()
    output_dir = Path(args.output_dir).resolve()
    corpus = write_corpus(output_dir / "corpus" / "pydoc_topics.txt")
    train_dir = output_dir / "train"

    print(f"[demo] corpus: {corpus} ({corpus.stat().st_size / 1e3:.0f} kB of CPython documentation)")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO_ROOT / "accelerate_configs" / "cpu_single.yaml"),
        str(REPO_ROOT / "recipes" / "train_clm.py"),
        *DEMO_MODEL, *DEMO_TRAINING, f"train_files=[{corpus}]", f"output_dir={train_dir}", *args.overrides,
    ]
    print("[demo] $ accelerate launch --config_file accelerate_configs/cpu_single.yaml recipes/train_clm.py ...")
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    returncode = subprocess.call(cmd, env=env)
    if returncode:
        print(f"[demo] training failed with exit code {returncode}", file=sys.stderr)
        return returncode

    summary = json.loads((train_dir / "summary.json").read_text())
    print(f"\n[demo] trained {summary['steps']} steps in {time.perf_counter() - start:.0f} s; "
          f"held-out perplexity {summary.get('eval_perplexity', float('nan')):.1f}")
    print(f"[demo] model (Hugging Face folder): {train_dir / 'model'}")
    print(f"[demo] checkpoints (resume_from=latest): {train_dir / 'checkpoints'}")
    print(f"[demo] metrics log (JSON lines):    {train_dir / 'train_log.jsonl'}")
    print(f"[demo] loss curve:                  {train_dir / 'loss_curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
