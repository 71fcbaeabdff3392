#!/usr/bin/env python
"""Fused QKV + gate/up projections vs the stock model: forward latency in eager mode and under torch.compile.

A ~50M-parameter Llama shape (random init, fp32, CPU): prefill (batch 1 x 128 tokens) and one decode step (1 token on
a KV cache of 128). Fused and unfused runs are interleaved so that machine noise hits both alike; medians are
reported, with the max |logits difference| of each fused variant against the unfused eager model.

    python scripts/bench_fusion.py [--no-compile] [--repeats 20] [--threads 2] [--output-dir outputs/bench_fusion]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from hf_optim.compression.fusion import fuse_projections  # noqa: E402

PROMPT_LEN = 128


def build_model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()


def make_steps(model: Callable, prompt: torch.Tensor) -> tuple[Callable, Callable, torch.Tensor, torch.Tensor]:
    """(prefill(), decode_step()) closures for ``model``, and the logits each returns once."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        prefill_logits = model(prompt, cache=cache, use_cache=True).logits
    next_token = prompt[:, -1:]

    def prefill() -> torch.Tensor:
        return model(prompt, use_cache=False).logits

    def decode() -> torch.Tensor:
        logits = model(next_token, cache=cache, use_cache=True).logits
        cache.crop(-1)  # back to 128 cached tokens: every step sees the same shapes
        return logits

    with torch.no_grad():
        decode_logits = decode()
    return prefill, decode, prefill_logits, decode_logits


def time_interleaved(fns: dict[str, Callable], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per call of each function, calling them round-robin."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for i in range(warmup + repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                if i >= warmup:
                    samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-compile", action="store_true", help="eager only (torch.compile is slow on 2 cores)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "outputs" / "bench_fusion")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    unfused = build_model()
    fused = fuse_projections(copy.deepcopy(unfused))
    params = sum(p.numel() for p in unfused.parameters())
    prompt = torch.randint(2, 32000, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))

    variants = {"eager": {"unfused": unfused, "fused": fused}}
    if not args.no_compile:
        variants["compile"] = {name: torch.compile(model) for name, model in variants["eager"].items()}

    steps: dict[tuple[str, str], tuple] = {}
    compile_s: dict[str, float] = {}
    for mode, models in variants.items():
        for name, model in models.items():
            start = time.perf_counter()
            steps[mode, name] = make_steps(model, prompt)  # compiles both shapes once, outside the timing
            compile_s[f"{mode}/{name}"] = round(time.perf_counter() - start, 2)
    ref_prefill, ref_decode = steps["eager", "unfused"][2:]

    rows = []
    for mode in variants:
        for phase, index in (("prefill", 0), ("decode", 1)):
            ms = time_interleaved({name: steps[mode, name][index] for name in ("unfused", "fused")}, args.repeats)
            reference = ref_prefill if phase == "prefill" else ref_decode
            diff = (steps[mode, "fused"][2 + index] - reference).abs().max().item()
            rows.append({
                "mode": mode, "phase": phase, "unfused_ms": round(ms["unfused"], 3), "fused_ms": round(ms["fused"], 3),
                "speedup": round(ms["unfused"] / ms["fused"], 3), "max_abs_logit_diff": diff,
            })

    result = {
        "model": "llama hidden 512, 8 layers, intermediate 1376, 8 heads / 4 kv heads, vocab 32000, fp32, sdpa",
        "parameters": params, "prompt_len": PROMPT_LEN, "batch": 1, "threads": args.threads,
        "repeats": args.repeats, "torch": torch.__version__, "setup_s (incl. compile)": compile_s, "rows": rows,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"{params / 1e6:.1f}M-parameter Llama, fp32 CPU, {args.threads} threads, median of {args.repeats}",
        "",
        "| mode | phase | unfused ms | fused ms | speedup | max abs logit diff |",
        "|---|---|---|---|---|---|",
        *(f"| {r['mode']} | {r['phase']} | {r['unfused_ms']:.2f} | {r['fused_ms']:.2f} | {r['speedup']:.3f}x "
          f"| {r['max_abs_logit_diff']:.1e} |" for r in rows),
    ]
    markdown = "\n".join(lines)
    (args.output_dir / "results.md").write_text(markdown + "\n")
    print(markdown)
    return result


if __name__ == "__main__":
    main()
