#!/usr/bin/env python
"""Inference benchmark: PyTorch vs ONNX Runtime (fp32, fused, INT8, INT4) vs TFLite side by side, in one run.

For each model — the real pretrained ``../shared/models/stories260K`` (quality and speed) and a ~50M-parameter random
Llama shape (speed) — every runtime variant is built, then measured in interleaved rounds: prefill latency (batch 1,
``--prompt-tokens``), greedy decode tokens/s (``--new-tokens``), perplexity on TinyStories text (pretrained model
only), size on disk, speed relative to PyTorch fp32 eager, and how close decode gets to the memory-bandwidth bound
(measured copy bandwidth / bytes of weights read per token: every weight but the input-embedding table, of which a
step reads one row). JSON, Markdown and a plot.

ONNX Runtime rows run with ``--threads`` intra-op threads whose idle workers sleep (hf_optim's default); the
``-spin`` row lets them busy-wait (ONNX Runtime's default), which decides the speed when other processes share
the cores. TFLite rows (fp32 and
dynamic int8, when litert-torch is installed) have no KV cache: each new token recomputes the fixed-length window.

    python scripts/bench_inference.py [--models stories260K,llama-50m] [--rows eager,ort-fp32,ort-int8] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
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


def build_rows(
    model, folder: Path, workdir: Path, calibration: list[str], threads: int, tflite_length: int | None
) -> dict[str, Callable[[], tuple[object, Path]]]:
    """Row name -> builder returning (runnable model, folder or file whose size counts).

    ``tflite_length``: the fixed input length of the TFLite rows (None leaves them out).
    """
    onnx_dir = workdir / "onnx-fp32"

    def load(path: Path, spinning: bool = False):
        return hf_optim.OnnxCausalLM.from_pretrained(path, num_threads=threads, allow_spinning=spinning)

    def eager():
        return model, folder

    def compiled():
        compiled_model = model
        compiled_model.forward = torch.compile(model.forward, dynamic=True)
        return compiled_model, folder

    def ort_fp32():
        hf_optim.export_onnx(model, onnx_dir)
        return load(onnx_dir), onnx_dir

    def ort_variant(name: str, build: Callable[[Path, Path], object], spinning: bool = False):
        def make():
            if not onnx_dir.exists():
                hf_optim.export_onnx(model, onnx_dir)
            out = workdir / name
            if not out.exists():  # a -spin row reuses its sibling's folder
                build(onnx_dir, out)
            return load(out, spinning), out

        return make

    def tflite(quantize: str):
        def make():
            out = workdir / f"tflite-{quantize}.tflite"
            hf_optim.export_tflite(model, out, sequence_length=tflite_length, quantize=quantize)
            return hf_optim.TFLiteCausalLM.from_pretrained(out, num_threads=threads), out

        return make

    def int8(src: Path, dst: Path) -> dict:
        return hf_optim.quantize_onnx(src, dst, mode="dynamic-int8")

    rows: dict[str, Callable] = {
        "eager": eager,
        "ort-fp32": ort_fp32,
        "ort-O2": ort_variant("ort-O2", lambda src, dst: hf_optim.optimize_onnx(src, dst, level="O2")),
        "ort-int8": ort_variant("ort-int8", int8),
        "ort-int8-spin": ort_variant("ort-int8", int8, spinning=True),
        "ort-int4": ort_variant("ort-int4", lambda src, dst: hf_optim.quantize_onnx(src, dst, mode="int4")),
    }
    if tflite_length is not None:
        rows["tflite-fp32"] = tflite("none")
        rows["tflite-int8"] = tflite("dynamic-int8")
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


def weight_bytes_per_token(runtime, folder: Path) -> int:
    """Bytes of weights a decode step streams: all weights except the input-embedding table (one row is gathered).

    A tied table counts: the LM head reads all of it. For ONNX graphs the table is the initializer feeding a Gather
    (the exporter gives the head its own transposed copy, so it counts there).
    """
    if folder.suffix == ".tflite":  # no KV cache: every step runs the whole graph, so every weight is read
        return folder.stat().st_size
    if isinstance(runtime, torch.nn.Module):
        embedding = runtime.get_input_embeddings().weight
        head = runtime.get_output_embeddings()
        tied = head is not None and head.weight.data_ptr() == embedding.data_ptr()
        total = sum(p.numel() * p.element_size() for p in runtime.parameters())
        return total if tied else total - embedding.numel() * embedding.element_size()
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    sizes = {t.name: int(np.prod(t.dims)) * tensor_dtype_to_np_dtype(t.data_type).itemsize for t in graph.initializer}
    gathered = {node.input[0] for node in graph.node if node.op_type == "Gather" and node.input[0] in sizes}
    return sum(size for name, size in sizes.items() if name not in gathered)


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
    parser.add_argument("--tflite-max-parameters", type=float, default=10e6,
                        help="TFLite rows only for models up to this size: without a KV cache each new token "
                             "recomputes the whole fixed-length window (~1 s/token for the 50M model).")
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
            parameters = sum(p.numel() for p in model.parameters())
            tflite = importlib.util.find_spec("litert_torch") and parameters <= args.tflite_max_parameters
            # the fixed TFLite length holds the prompt + new tokens and the 256-token perplexity window
            tflite_length = max(256, args.prompt_tokens + args.new_tokens) if tflite else None
            rows = build_rows(model, folder, workdir, calibration, args.threads, tflite_length)
            selected = args.rows.split(",") if args.rows else list(rows)
            runtimes, table = {}, {}
            for row in selected:
                if row not in rows:
                    table[row] = {"error": f"unknown or unavailable row; available: {', '.join(rows)}"}
                    continue
                try:
                    runtimes[row], row_folder = rows[row]()
                    table[row] = {"size_bytes": size_on_disk(row_folder),
                                  "weight_bytes_per_token": weight_bytes_per_token(runtimes[row], row_folder)}
                    if model_name == "stories260K":
                        table[row]["perplexity"] = evaluate_perplexity(
                            runtimes[row], tokenizer, eval_texts, 256, 128, args.max_tokens)
                except Exception as exc:  # one failing runtime must not lose the others
                    table[row] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                    runtimes.pop(row, None)
                print(f"[{model_name}] {row}: {table[row]}", flush=True)
            for row, numbers in measure(runtimes, tokenizer, args.prompt_tokens, args.new_tokens, args.rounds).items():
                table[row].update(numbers)
                bound = bandwidth / table[row]["weight_bytes_per_token"]
                table[row]["bandwidth_bound_tokens_per_s"] = bound
                table[row]["share_of_bound"] = numbers["decode_tokens_per_s"] / bound
            base = table.get("eager", {})
            for row in table.values():
                if "decode_tokens_per_s" in row and "decode_tokens_per_s" in base:
                    row["decode_vs_eager"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                    row["prefill_vs_eager"] = base["prefill_s"] / row["prefill_s"]
                if "perplexity" in row and "perplexity" in base:
                    row["perplexity_vs_eager"] = row["perplexity"] / base["perplexity"] - 1
            results[model_name] = {"parameters": parameters, "rows": table}

    meta = {"threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "rounds": args.rounds, "copy_bandwidth_gb_s": bandwidth / 1e9, "torch": torch.__version__,
            # other processes on the same cores slow every row, ONNX Runtime's spinning threads the most
            "load_average_1min_at_end": os.getloadavg()[0], "cpu_count": os.cpu_count()}
    (output_dir / "bench_inference.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [f"# Inference benchmark ({args.threads} threads, batch 1, {args.prompt_tokens}-token prompt, "
             f"{args.new_tokens} new tokens, copy bandwidth {bandwidth / 1e9:.1f} GB/s, "
             f"load average {meta['load_average_1min_at_end']:.1f} on {meta['cpu_count']} CPUs)", ""]
    for model_name, result in results.items():
        lines += [f"## {model_name} ({result['parameters'] / 1e6:.2f}M parameters)", "",
                  "| runtime | prefill ms | decode tok/s | decode × eager | MB read/token | bound tok/s | % of bound "
                  "| size MB | perplexity | Δ ppl |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row, r in result["rows"].items():
            if "error" in r:
                lines.append(f"| {row} | error: {r['error']} | | | | | | | | |")
                continue
            ppl = f"{r['perplexity']:.3f}" if "perplexity" in r else "-"
            dppl = f"{r['perplexity_vs_eager']:+.2%}" if "perplexity_vs_eager" in r else "-"
            lines.append(
                f"| {row} | {r['prefill_s'] * 1e3:.2f} | {r['decode_tokens_per_s']:.1f} | "
                f"{r.get('decode_vs_eager', 1):.2f} | {r['weight_bytes_per_token'] / 1e6:.1f} | "
                f"{r['bandwidth_bound_tokens_per_s']:.0f} | {r['share_of_bound']:.1%} | "
                f"{r['size_bytes'] / 1e6:.2f} | {ppl} | {dppl} |")
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
