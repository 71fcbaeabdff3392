#!/usr/bin/env python
"""Inference benchmark: PyTorch vs ONNX Runtime (fp32, fused, INT8, INT4) side by side, in one run.

For each model — the real pretrained ``../shared/models/stories260K`` (quality and speed) and a ~50M-parameter random
Llama shape (speed) — every runtime variant is built, then measured in interleaved rounds: prefill latency (batch 1,
``--prompt-tokens``), greedy decode tokens/s (``--new-tokens``), perplexity on TinyStories text (pretrained model
only), size on disk, speed relative to PyTorch fp32 eager, and how close decode gets to the memory-bandwidth bound
(measured copy bandwidth / bytes of weights read per token). JSON, Markdown and a plot.

    python scripts/bench_inference.py [--models stories260K,llama-50m] [--rows eager,ort-fp32,ort-int8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import hf_optim  # noqa: E402
from hf_optim.core.evaluation import evaluate_perplexity, size_on_disk  # noqa: E402
from hf_optim.core.texts import load_texts  # noqa: E402

SHARED = REPO_ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
EVAL_TEXT = SHARED / "corpora" / "tinystories" / "niklas6_tinystories.txt"
CALIBRATION_TEXT = SHARED / "corpora" / "tinystories" / "cs336_tinystories_sample.txt"


def build_model(name: str, workdir: Path):
    """(model, tokenizer, folder) for a named model; the random shape is saved so every runtime loads the same."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if name == "stories260K":
        return AutoModelForCausalLM.from_pretrained(STORIES), AutoTokenizer.from_pretrained(STORIES), STORIES
    if name == "llama-50m":
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024)
        model = LlamaForCausalLM(config).eval()
        tokenizer = AutoTokenizer.from_pretrained(STORIES)  # only its pad/eos ids are used for speed runs
        folder = workdir / "llama-50m"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return model, tokenizer, folder
    raise SystemExit(f"Unknown model {name!r}; use stories260K or llama-50m.")


def build_rows(model, folder: Path, workdir: Path, calibration: list[str]) -> dict[str, Callable[[], tuple[object, Path]]]:
    """Row name -> builder returning (runnable model, folder whose size counts)."""
    onnx_dir = workdir / "onnx-fp32"

    def eager():
        return model, folder

    def compiled():
        compiled_model = model
        compiled_model.forward = torch.compile(model.forward, dynamic=True)
        return compiled_model, folder

    def ort_fp32():
        hf_optim.export_onnx(model, onnx_dir)
        return hf_optim.OnnxCausalLM.from_pretrained(onnx_dir), onnx_dir

    def ort_variant(name: str, build: Callable[[Path, Path], object]):
        def make():
            if not onnx_dir.exists():
                hf_optim.export_onnx(model, onnx_dir)
            out = workdir / name
            build(onnx_dir, out)
            return hf_optim.OnnxCausalLM.from_pretrained(out), out

        return make

    rows: dict[str, Callable] = {"eager": eager, "ort-fp32": ort_fp32}
    if hasattr(hf_optim, "optimize_onnx"):
        rows["ort-O2"] = ort_variant("ort-O2", lambda src, dst: hf_optim.optimize_onnx(src, dst, level="O2"))
    if hasattr(hf_optim, "quantize_onnx"):
        rows["ort-int8"] = ort_variant("ort-int8", lambda src, dst: hf_optim.quantize_onnx(src, dst, mode="dynamic-int8"))
        rows["ort-int4"] = ort_variant("ort-int4", lambda src, dst: hf_optim.quantize_onnx(src, dst, mode="int4"))
    rows["compile"] = compiled  # last: it patches the shared PyTorch model in place
    return rows


def copy_bandwidth(megabytes: int = 512) -> float:
    """Bytes/s of a large tensor copy (read + write counted), the ceiling for streaming weights."""
    src = torch.empty(megabytes * 2**20 // 4)
    src.fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def weight_bytes_per_token(folder: Path) -> int:
    """Bytes of weights streamed per decode step: the weight files' size (all weights are read once per token)."""
    return size_on_disk(folder)


def measure(models: dict[str, object], tokenizer, prompt_tokens: int, new_tokens: int, rounds: int) -> dict[str, dict]:
    """Prefill seconds and decode tokens/s per runtime, alternating runtimes every round; medians."""
    vocab = next(iter(models.values())).config.vocab_size
    input_ids = torch.randint(3, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(input_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = {name: {"prefill": [], "decode": []} for name in models}
    with torch.no_grad():
        for name, m in models.items():  # warm-up (and compilation)
            m.generate(input_ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=pad)
        for _ in range(rounds):
            for name, m in models.items():
                start = time.perf_counter()
                m(input_ids=input_ids, attention_mask=mask)
                prefill = time.perf_counter() - start
                start = time.perf_counter()
                # never stop at EOS, so every runtime decodes the same number of tokens
                no_eos = {"min_new_tokens": new_tokens} if isinstance(m, torch.nn.Module) else {"eos_token_id": -1}
                out = m.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=pad, **no_eos)
                total = time.perf_counter() - start
                produced = out.shape[1] - prompt_tokens
                samples[name]["prefill"].append(prefill)
                samples[name]["decode"].append((produced - 1) / max(total - prefill, 1e-9))
    return {name: {"prefill_s": statistics.median(v["prefill"]), "decode_tokens_per_s": statistics.median(v["decode"])}
            for name, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="stories260K,llama-50m")
    parser.add_argument("--rows", default=None, help="Comma-separated subset (default: all available).")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=20000, help="Perplexity text budget (pretrained model).")
    parser.add_argument("--output-dir", default="outputs/bench_inference")
    args = parser.parse_args(argv)

    if not STORIES.exists():
        print(f"{STORIES} not found: this benchmark needs ../shared (see ../shared/README.md).", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    eval_texts = load_texts(EVAL_TEXT)
    calibration = load_texts(CALIBRATION_TEXT)
    bandwidth = copy_bandwidth()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models.split(","):
            workdir = Path(tmp) / model_name
            workdir.mkdir()
            model, tokenizer, folder = build_model(model_name, workdir)
            rows = build_rows(model, folder, workdir, calibration)
            selected = args.rows.split(",") if args.rows else list(rows)
            runtimes, table = {}, {}
            for row in selected:
                if row not in rows:
                    table[row] = {"error": f"unknown or unavailable row; available: {', '.join(rows)}"}
                    continue
                try:
                    runtimes[row], row_folder = rows[row]()
                    table[row] = {"size_bytes": size_on_disk(row_folder)}
                    if model_name == "stories260K":
                        table[row]["perplexity"] = evaluate_perplexity(
                            runtimes[row], tokenizer, eval_texts, 256, 128, args.max_tokens)
                except Exception as exc:  # one failing runtime must not lose the others
                    table[row] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                    runtimes.pop(row, None)
                print(f"[{model_name}] {row}: {table[row]}", flush=True)
            for row, numbers in measure(runtimes, tokenizer, args.prompt_tokens, args.new_tokens, args.rounds).items():
                table[row].update(numbers)
                bound = bandwidth / table[row]["size_bytes"]
                table[row]["bandwidth_bound_tokens_per_s"] = bound
                table[row]["share_of_bound"] = numbers["decode_tokens_per_s"] / bound
            base = table.get("eager", {})
            for row in table.values():
                if "decode_tokens_per_s" in row and "decode_tokens_per_s" in base:
                    row["decode_vs_eager"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                    row["prefill_vs_eager"] = base["prefill_s"] / row["prefill_s"]
                if "perplexity" in row and "perplexity" in base:
                    row["perplexity_vs_eager"] = row["perplexity"] / base["perplexity"] - 1
            results[model_name] = {"parameters": sum(p.numel() for p in model.parameters()), "rows": table}

    meta = {"threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "rounds": args.rounds, "copy_bandwidth_gb_s": bandwidth / 1e9, "torch": torch.__version__}
    (output_dir / "bench_inference.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [f"# Inference benchmark ({args.threads} threads, batch 1, {args.prompt_tokens}-token prompt, "
             f"{args.new_tokens} new tokens, copy bandwidth {bandwidth / 1e9:.1f} GB/s)", ""]
    for model_name, result in results.items():
        lines += [f"## {model_name} ({result['parameters'] / 1e6:.2f}M parameters)", "",
                  "| runtime | prefill ms | decode tok/s | decode × eager | % of bandwidth bound | size MB | perplexity | Δ ppl |",
                  "|---|---|---|---|---|---|---|---|"]
        for row, r in result["rows"].items():
            if "error" in r:
                lines.append(f"| {row} | error: {r['error']} | | | | | | |")
                continue
            ppl = f"{r['perplexity']:.3f}" if "perplexity" in r else "-"
            dppl = f"{r['perplexity_vs_eager']:+.2%}" if "perplexity_vs_eager" in r else "-"
            lines.append(
                f"| {row} | {r['prefill_s'] * 1e3:.2f} | {r['decode_tokens_per_s']:.1f} | {r.get('decode_vs_eager', 1):.2f} | "
                f"{r['share_of_bound']:.1%} | {r['size_bytes'] / 1e6:.2f} | {ppl} | {dppl} |")
        lines.append("")
    table_text = "\n".join(lines)
    (output_dir / "bench_inference.md").write_text(table_text)
    plot(results, output_dir / "decode_speed.png")
    print(table_text)
    return 0


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (model_name, result) in zip(axes[0], results.items()):
        rows = {k: v for k, v in result["rows"].items() if "decode_tokens_per_s" in v}
        ax.bar(list(rows), [v["decode_tokens_per_s"] for v in rows.values()], color="tab:blue")
        ax.set_title(f"{model_name}: greedy decode tokens/s")
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
