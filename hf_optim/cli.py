"""The ``hf-optim`` command line. Each sub-command imports its stage lazily so ``hf-optim --help`` is instant.

Example:
    $ hf-optim env
    $ hf-optim estimate-memory path/to/model --strategy zero3 --num-gpus 8 --json
"""

from __future__ import annotations

import argparse
import json
import sys

from hf_optim import __version__
from hf_optim.core.errors import HfOptimError


def _run_env(args: argparse.Namespace) -> int:
    from hf_optim.core.env import collect_environment, format_environment

    report = collect_environment()
    print(json.dumps(report, indent=2) if args.json else format_environment(report))
    return 0


def _add_env(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("env", help="Versions of the stack, GPUs, and which optional backends work here.")
    parser.add_argument("--json", action="store_true", help="Print machine-readable JSON.")
    parser.set_defaults(handler=_run_env)


def _run_estimate_memory(args: argparse.Namespace) -> int:
    from hf_optim.training.memory import estimate_memory_cli

    return estimate_memory_cli(args)


def _add_estimate_memory(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "estimate-memory",
        help="Per-GPU and CPU memory of a training strategy (ZeRO-paper accounting), and the cheapest that fits.",
    )
    parser.add_argument("model", help="Hub id, local model folder, or a config.json / recipe-style YAML.")
    parser.add_argument("--strategy", default="ddp", help="ddp, zero1, zero2, zero3 or fsdp (default: ddp).")
    parser.add_argument("--offload", action="store_true", help="Offload optimizer states (and ZeRO-3/FSDP params) to CPU.")
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1, help="Micro-batch size per GPU.")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--gradient-checkpointing", default="off", help="off, full or selective.")
    parser.add_argument("--checkpoint-every-n-layers", type=int, default=2, help="With selective checkpointing.")
    parser.add_argument("--mixed-precision", default="bf16", help="no (fp32), bf16, fp16 or fp8.")
    parser.add_argument("--optimizer", default="adamw", help="adamw (2 states) or sgd (momentum, 1 state).")
    parser.add_argument("--attn-implementation", default="sdpa", help="sdpa (transformers' default) or eager.")
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow the model's own config/modeling code.")
    parser.add_argument("--autocast", action="store_true", help="ddp under autocast, fp32 weights (Accelerate's bf16).")
    parser.add_argument("--gpu-memory", default=None, help="Memory per GPU, e.g. 80GiB or 24GB: pick the cheapest strategy that fits.")
    parser.add_argument("--json", action="store_true", help="Print machine-readable JSON.")
    parser.set_defaults(handler=_run_estimate_memory)


def _load_model_and_tokenizer(model_path: str, trust_remote_code: bool = False):
    """A local folder written by hf_optim (packed weights decoded) or any Transformers causal LM folder / Hub id."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_optim.compression.storage import load_optimized

    if Path(model_path).is_dir():
        model = load_optimized(model_path)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=trust_remote_code, dtype="float32")
    return model, AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def _print_report(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return
    width = max(len(key) for key in report)
    for key, value in report.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
        print(f"{key:<{width}}  {value}")


def _run_eval(args: argparse.Namespace) -> int:
    from hf_optim.core.evaluation import evaluate_perplexity, generation_speed, parameter_stats, size_on_disk
    from hf_optim.core.texts import load_texts

    texts = load_texts(args.data, text_column=args.text_column) if args.data else None
    model, tokenizer = _load_model_and_tokenizer(args.model, args.trust_remote_code)
    report: dict = {"model": args.model}
    from pathlib import Path

    if Path(args.model).exists():
        report["size_bytes"] = size_on_disk(args.model)
    report.update(parameter_stats(model))
    if texts is not None:
        context = min(getattr(model.config, "max_position_embeddings", 1024) or 1024, 1024)
        max_length = args.max_length or context
        stride = args.stride or max(1, max_length // 2)
        report["perplexity"] = evaluate_perplexity(model, tokenizer, texts, max_length, stride, args.max_tokens)
        report["perplexity_window"] = {"max_length": max_length, "stride": stride}
    if not args.no_speed:
        report["speed"] = generation_speed(model, tokenizer, args.prompt_tokens, args.new_tokens)
    _print_report(report, args.json)
    return 0


def _add_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="Perplexity (strided sliding window), size on disk, parameters, sparsity and generation speed."
    )
    parser.add_argument("model", help="A model folder (plain Transformers or written by hf_optim) or a Hub id.")
    parser.add_argument("--data", help="A .txt (blank-line separated documents) or .jsonl file, or a dataset name.")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--max-length", type=int, default=None, help="Window length (default: model context, <= 1024).")
    parser.add_argument("--stride", type=int, default=None, help="Window step (default: max-length / 2).")
    parser.add_argument("--max-tokens", type=int, default=None, help="Score at most this many tokens of the text.")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--no-speed", action="store_true", help="Skip the generation latency/throughput measurement.")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--json", action="store_true", help="Print machine-readable JSON.")
    parser.set_defaults(handler=_run_eval)


def _run_compress(args: argparse.Namespace) -> int:
    from hf_optim.compression.recipe import CompressionRecipe
    from hf_optim.compression.storage import save_optimized
    from hf_optim.core.texts import load_texts

    recipe = CompressionRecipe.from_yaml(args.recipe)  # validated before the model is loaded
    texts = load_texts(args.calibration_data) if args.calibration_data else None
    if recipe.needs_calibration and texts is None:
        names = [step.method for step in recipe.steps if step.needs_calibration]
        print(f"hf-optim compress: error: steps {names} need --calibration-data FILE", file=sys.stderr)
        return 2
    model, tokenizer = _load_model_and_tokenizer(args.model, args.trust_remote_code)
    recipe.apply(model, tokenizer, texts)
    out = save_optimized(model, args.output, tokenizer=tokenizer, base_model=args.model)
    print(f"Saved the compressed model to {out}")
    return 0


def _add_compress(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("compress", help="Apply a compression recipe (prune/quantize/cluster steps) and save.")
    parser.add_argument("model", help="A model folder or a Hub id.")
    parser.add_argument("--recipe", required=True, help="Compression recipe YAML (a `steps:` list).")
    parser.add_argument("--output", required=True, help="Folder to write the compressed model to.")
    parser.add_argument("--calibration-data", help="A .txt or .jsonl file (or dataset name) for data-aware methods.")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.set_defaults(handler=_run_compress)


def _run_export_onnx(args: argparse.Namespace) -> int:
    from hf_optim.export.onnx import export_onnx

    report = export_onnx(
        args.model, args.output, with_past=not args.no_past, opset=args.opset, validate=not args.no_validate
    )
    if report["validated"]:
        with_past = report["max_abs_diff_with_past"]
        print(
            f"max |logits - PyTorch|: no past {report['max_abs_diff_no_past']:.3g}, "
            f"with past {'n/a' if with_past is None else format(with_past, '.3g')}; "
            f"greedy tokens match: {report['greedy_match']}"
        )
    print(f"Saved the ONNX export to {report['output_dir']}")
    return 0


def _add_export_onnx(formats: argparse._SubParsersAction) -> None:
    parser = formats.add_parser("onnx", help="Decoder-only LM to ONNX with KV cache, validated against PyTorch.")
    parser.add_argument("model", help="A model folder (plain Transformers or written by hf_optim) or a Hub id.")
    parser.add_argument("--output", required=True, help="Folder to write model.onnx, config and validation.json to.")
    parser.add_argument("--no-past", action="store_true", help="Export without KV-cache inputs/outputs.")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (14-20, default 17).")
    parser.add_argument("--no-validate", action="store_true", help="Skip the parity check against PyTorch.")
    parser.set_defaults(handler=_run_export_onnx)


def _run_export_tensorrt(args: argparse.Namespace) -> int:
    from hf_optim.export.tensorrt import ProfileRanges, ShapeRange, build_engine

    ranges = ProfileRanges(
        batch=ShapeRange(*args.batch), sequence=ShapeRange(*args.sequence), past_sequence=ShapeRange(*args.past)
    )
    report = build_engine(args.onnx_dir, args.output, precision=args.precision, ranges=ranges,
                          workspace_gib=args.workspace_gib)
    print(f"Saved the {report['precision']} TensorRT engine to {report['engine']} ({report['build_seconds']} s)")
    return 0


def _add_export_tensorrt(formats: argparse._SubParsersAction) -> None:
    parser = formats.add_parser("tensorrt", help="Serialized TensorRT engine from an `export onnx` folder.")
    parser.add_argument("onnx_dir", help="A folder written by `hf-optim export onnx` (or a .onnx file).")
    parser.add_argument("--precision", required=True, choices=["fp16", "bf16", "int8", "fp8"],
                        help="int8/fp8 need a Q/DQ-quantized ONNX graph; fp8 needs Ada/Hopper.")
    parser.add_argument("--output", help="Engine file (default: <onnx_dir>/model-<precision>.engine).")
    for name, default in (("batch", (1, 1, 4)), ("sequence", (1, 64, 512)), ("past", (0, 64, 512))):
        parser.add_argument(f"--{name}", type=int, nargs=3, default=default, metavar=("MIN", "OPT", "MAX"),
                            help=f"Profile range of the {name} axis (default: {' '.join(map(str, default))}).")
    parser.add_argument("--workspace-gib", type=float, default=None, help="Builder workspace limit.")
    parser.set_defaults(handler=_run_export_tensorrt)


def _run_export_tflite(args: argparse.Namespace) -> int:
    from hf_optim.export.tflite import export_tflite

    report = export_tflite(args.model, args.output, sequence_length=args.sequence_length, quantize=args.quantize)
    print(f"max |logits - PyTorch|: {report['max_abs_diff']:.3g}; top-1 agreement {report['top1_agreement']:.3f}")
    print(f"Saved the TFLite model to {report['output']} ({report['size_bytes']} bytes)")
    return 0


def _add_export_tflite(formats: argparse._SubParsersAction) -> None:
    parser = formats.add_parser("tflite", help="Causal LM to TFLite (LiteRT): int32 input_ids of a fixed shape -> logits.")
    parser.add_argument("model", help="A model folder (plain Transformers or written by hf_optim) or a Hub id.")
    parser.add_argument("--output", required=True, help="The .tflite file (a .tflite.json report is written beside it).")
    parser.add_argument("--sequence-length", type=int, default=128, help="Fixed input length (default 128).")
    parser.add_argument("--quantize", default="none", choices=["none", "dynamic-int8", "weight-only-int8"])
    parser.set_defaults(handler=_run_export_tflite)


def _run_export_optimize(args: argparse.Namespace) -> int:
    from hf_optim.export.ort_optimize import optimize_onnx

    report = optimize_onnx(args.onnx_dir, args.output, level=args.level)
    fused = ", ".join(f"{k}={v}" for k, v in report["fused_operators"].items()) or "none"
    print(f"fused operators: {fused}; max |logits diff| {report['validation']['max_abs_diff_no_past']:.3g}, "
          f"greedy tokens match: {report['validation']['greedy_match']}")
    print(f"Saved the {args.level} graph to {report['output_dir']}")
    return 0


def _run_export_quantize(args: argparse.Namespace) -> int:
    from hf_optim.core.texts import load_texts
    from hf_optim.export.ort_quantize import quantize_onnx

    texts = load_texts(args.calibration_data)[: args.calibration_samples] if args.calibration_data else None
    report = quantize_onnx(
        args.onnx_dir, args.output, mode=args.mode, per_channel=not args.no_per_channel, calibration_texts=texts,
        calibrate_method=args.calibrate_method, algorithm=args.algorithm, block_size=args.block_size,
    )
    parity = report["parity"]
    print(f"size {report['source_size_bytes']} -> {report['size_bytes']} bytes; max |logits diff| "
          f"{parity['max_abs_logits_diff']:.3g}, top-1 agreement {parity['top1_agreement']:.3f}")
    print(f"Saved the {args.mode} graph to {report['output_dir']}")
    return 0


def _add_export_ort(formats: argparse._SubParsersAction) -> None:
    parser = formats.add_parser("optimize", help="Fuse an ONNX export with ONNX Runtime's transformer optimizer.")
    parser.add_argument("onnx_dir", help="A folder written by `hf-optim export onnx`.")
    parser.add_argument("--output", required=True, help="Folder for the fused model.onnx and optimization.json.")
    parser.add_argument("--level", choices=["O1", "O2", "O3"], default="O2", help="Optimum-style level (default O2).")
    parser.set_defaults(handler=_run_export_optimize)
    parser = formats.add_parser("quantize", help="Quantize an ONNX export with ONNX Runtime (int8 or int4).")
    parser.add_argument("onnx_dir", help="A folder written by `hf-optim export onnx` (or `export optimize`).")
    parser.add_argument("--output", required=True, help="Folder for the quantized model.onnx and quantization.json.")
    parser.add_argument("--mode", choices=["dynamic-int8", "static-int8", "int4"], default="dynamic-int8")
    parser.add_argument("--calibration-data", help="A .txt or .jsonl file (or dataset name) for static-int8.")
    parser.add_argument("--calibration-samples", type=int, default=64, help="Texts used for calibration.")
    parser.add_argument("--calibrate-method", choices=["MinMax", "Entropy", "Percentile"], default="MinMax")
    parser.add_argument("--no-per-channel", action="store_true", help="Per-tensor int8 weight scales.")
    parser.add_argument("--algorithm", choices=["rtn", "hqq", "gptq"], default="rtn", help="int4 algorithm.")
    parser.add_argument("--block-size", type=int, default=32, help="int4 block size (power of two >= 16).")
    parser.set_defaults(handler=_run_export_quantize)


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="Export a model to run outside PyTorch (onnx, tensorrt, tflite).")
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    _add_export_onnx(formats)
    _add_export_ort(formats)
    _add_export_tensorrt(formats)
    _add_export_tflite(formats)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hf-optim``, with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="hf-optim", description="Train, compress, export and evaluate Hugging Face causal LMs on too little hardware."
    )
    parser.add_argument("--version", action="version", version=f"hf-optim {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_env(subparsers)
    _add_estimate_memory(subparsers)
    _add_eval(subparsers)
    _add_compress(subparsers)
    _add_export(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hf-optim`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except HfOptimError as exc:
        print(f"hf-optim {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
