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
    print(f"Saved the TFLite model to {report['output']} ({report['size_bytes']} bytes), report in "
          f"{report['output']}.json; run it with hf_optim.export.tflite.TFLiteCausalLM.from_pretrained")
    return 0


def _add_export_tflite(formats: argparse._SubParsersAction) -> None:
    parser = formats.add_parser("tflite", help="Causal LM to TFLite (LiteRT): int32 input_ids of a fixed shape -> logits.")
    parser.add_argument("model", help="A model folder (plain Transformers or written by hf_optim) or a Hub id.")
    parser.add_argument("--output", required=True, help="The .tflite file (a .tflite.json report is written beside it).")
    parser.add_argument("--sequence-length", type=int, default=128,
                        help="Fixed input length (default 128): the longest prompt + new tokens the graph can take.")
    parser.add_argument("--quantize", default="none", choices=["none", "dynamic-int8", "weight-only-int8"],
                        help="int8 per-channel weights; dynamic-int8 also quantizes activations at run time.")
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


def _run_push(args: argparse.Namespace) -> int:
    from hf_optim.hub import push_to_hub

    result = push_to_hub(
        args.variant_dir, args.repo_id, private=args.private, revision=args.revision, token=args.token,
        commit_message=args.commit_message, dry_run=args.dry_run, create_pr=args.create_pr, force=args.force,
    )
    if result.dry_run:  # stdout carries the file list only, so it can be piped
        print("\n".join(result.files))
        print(f"Dry run: would upload these {len(result.files)} files to {result.repo_id} ({result.revision}) "
              "in one commit; nothing was sent.", file=sys.stderr)
        return 0
    print(f"Uploaded {len(result.files)} files to {result.repo_id} ({result.revision}) in one commit: "
          f"{result.pr_url or result.commit_url}")
    return 0


def _add_push(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("push", help="Upload a variant folder to the Hugging Face Hub in one commit.")
    parser.add_argument("variant_dir", help="A folder written by save_optimized, `compress`, `export` or `optimize`.")
    parser.add_argument("--repo-id", required=True, help="The Hub repo, user-or-org/name (created if missing).")
    parser.add_argument("--private", action="store_true", help="Create the repo private (ignored if it exists).")
    parser.add_argument("--revision", help="Branch to commit to (created from main if missing; default main).")
    parser.add_argument("--create-pr", action="store_true", help="Open a pull request instead of committing directly.")
    parser.add_argument("--commit-message", help="Commit summary (default: 'Upload <folder> with hf_optim').")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN, else the stored `hf auth login` token); "
                                        "prefer HF_TOKEN, a command-line token lands in the shell history.")
    parser.add_argument("--dry-run", action="store_true",
                        help="Print the files that would be uploaded, one per line, and send nothing.")
    parser.add_argument("--force", action="store_true",
                        help="Upload a folder that lacks config.json, model files or a README.md card.")
    parser.set_defaults(handler=_run_push)


def _run_serve(args: argparse.Namespace) -> int:
    from hf_optim.monitoring.server import ServeConfig, serve

    config = ServeConfig(
        max_new_tokens_limit=args.max_new_tokens_limit, max_prompt_chars=args.max_prompt_chars,
        max_pending_requests=args.max_pending_requests, device=args.device, monitoring=not args.no_monitoring,
        reference_profile=args.reference_profile, output_reference_profile=args.output_reference_profile,
        window_size=args.window_size,
        window_seconds=args.window_seconds or None, queue_size=args.queue_size, traffic_log=args.traffic_log,
        alert_webhooks=tuple(args.alert_webhook), alert_cooldown_s=args.alert_cooldown,
        retrain_command=args.retrain_command, retrain_after_windows=args.retrain_after_windows,
        retrain_cooldown_s=args.retrain_cooldown, retrain_log=args.retrain_log, shadow=args.shadow,
        shadow_sample_rate=args.shadow_sample_rate,
    )
    serve(args.model, host=args.host, port=args.port, config=config, log_level=args.log_level)
    return 0


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="Serve a model over HTTP (/generate, /health, /metrics, /monitoring) with drift monitoring."
    )
    parser.add_argument("model", help="A PyTorch model folder or an `hf-optim export onnx` folder (model.onnx).")
    parser.add_argument("--host", default="127.0.0.1", help="Interface to bind (default: loopback only).")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda:N (PyTorch models).")
    parser.add_argument("--max-new-tokens-limit", type=int, default=256, help="Largest max_new_tokens accepted.")
    parser.add_argument("--max-prompt-chars", type=int, default=8000, help="Longest prompt accepted (characters).")
    parser.add_argument("--max-pending-requests", type=int, default=64,
                        help="Requests waiting or running at once; more get 503 (default 64).")
    parser.add_argument("--reference-profile", help="Profile from `hf-optim monitor fit-reference`: enables drift "
                        "and quality monitoring of the served traffic.")
    parser.add_argument("--output-reference-profile", help="Profile fitted on healthy model outputs: adds drift "
                        "metrics of the generated text (output_*).")
    parser.add_argument("--window-size", type=int, default=100, help="Requests per monitoring window (default 100).")
    parser.add_argument("--window-seconds", type=float, default=300.0,
                        help="Also close a window after this many seconds (0: by count only; default 300).")
    parser.add_argument("--queue-size", type=int, default=1024,
                        help="Monitoring queue length; when full, samples are dropped and counted.")
    parser.add_argument("--traffic-log", help="Append every request to this JSON-lines file (`text` = prompt).")
    parser.add_argument("--alert-webhook", action="append", default=[], metavar="URL",
                        help="POST each alert as JSON to URL (repeatable).")
    parser.add_argument("--alert-cooldown", type=float, default=300.0, help="Seconds before a metric re-alerts.")
    parser.add_argument("--retrain-command", help="Command started when alerts persist, e.g. \"accelerate launch "
                        "recipes/train_clm.py --config ... train_files=[{traffic}]\" ({traffic}: a snapshot of the "
                        "traffic log).")
    parser.add_argument("--retrain-after-windows", type=int, default=3,
                        help="Consecutive alerting windows that start the retrain command (default 3).")
    parser.add_argument("--retrain-cooldown", type=float, default=3600.0, help="Seconds between two retrain runs.")
    parser.add_argument("--retrain-log", help="File for the retrain command's output (default: beside the traffic log).")
    parser.add_argument("--shadow", metavar="BASE_MODEL", help="Compare the served model with this base model "
                        "(next-token KL, greedy agreement) on sampled requests.")
    parser.add_argument("--shadow-sample-rate", type=float, default=0.1, help="Share of requests compared.")
    parser.add_argument("--no-monitoring", action="store_true", help="Serve only: no traffic log, no monitoring.")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.set_defaults(handler=_run_serve)


def _run_monitor_fit(args: argparse.Namespace) -> int:
    from hf_optim.core.texts import load_texts
    from hf_optim.monitoring import ReferenceProfile

    texts = load_texts(args.texts, text_column=args.text_column, unit="line")
    profile = ReferenceProfile.fit(
        texts, args.tokenizer or args.model, embeddings=not args.no_embeddings, model=args.model, seed=args.seed
    )
    path = profile.save(args.output)
    print(f"Saved {profile!r} to {path}")
    return 0


def _worst_windows(results: list) -> list[dict]:
    """Per metric, the window whose value is furthest above (or closest to) its threshold."""
    worst: dict[str, dict] = {}
    for index, result in enumerate(results):
        for metric in result.metrics:
            ratio = metric.value / metric.threshold if metric.threshold > 0 else float("inf")
            if metric.name not in worst or ratio > worst[metric.name]["_ratio"]:
                worst[metric.name] = {**metric.to_dict(), "window": index, "_ratio": ratio}
    return [{k: v for k, v in entry.items() if k != "_ratio"} for entry in worst.values()]


def _run_monitor_check(args: argparse.Namespace) -> int:
    from hf_optim.core.texts import load_texts
    from hf_optim.monitoring import ReferenceProfile, TextMonitor
    from hf_optim.monitoring.profile import load_model

    profile = ReferenceProfile.load(args.profile)
    texts = load_texts(args.texts, text_column=args.text_column, unit="line")
    model_path = args.model or profile.model_path
    model = load_model(model_path) if model_path and "prompt_perplexity" in profile.features else None
    monitor = TextMonitor(profile, tokenizer=args.tokenizer or (args.model if args.model else None), model=model)
    results = monitor.calculate_windows(texts, window_size=args.window_size)
    if args.report:
        from hf_optim.monitoring.report import write_report

        write_report(results, args.report)
    summary = {
        "drift": any(r.drift for r in results),
        "n": len(texts),
        "metrics": [m.to_dict() for m in results[0].metrics] if len(results) == 1 else _worst_windows(results),
        "windows": [r.to_dict() for r in results],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{len(texts)} texts in {len(results)} window(s): {'DRIFT' if summary['drift'] else 'no drift'}")
        for metric in summary["metrics"]:
            flag = "ALERT" if metric["alert"] else "ok"
            print(f"  {metric['name']:<24} {metric['kind']:<8} value {metric['value']:.4g}  "
                  f"threshold {metric['threshold']:.4g}  {flag}")
        if args.report:
            print(f"Report: {args.report}")
    return 0


def _add_monitor(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "monitor", help="Drift and quality of text against a reference profile (batch use of the serving monitor)."
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    texts_help = "A .txt file with one document per line, or a .jsonl file with a text field per line."
    fit = actions.add_parser("fit-reference", help="Learn what normal text looks like, with thresholds, into a profile.")
    fit.add_argument("--texts", required=True, help=texts_help)
    fit.add_argument("--output", required=True, help="Profile file to write (.npz, a few MB at most).")
    fit.add_argument("--tokenizer", help="The served model's tokenizer (folder or Hub id) for token features.")
    fit.add_argument("--model", help="A causal LM folder: records each text's perplexity (and its tokenizer).")
    fit.add_argument("--no-embeddings", action="store_true", help="Skip MiniLM embedding drift (faster).")
    fit.add_argument("--text-column", default="text", help="Field of the .jsonl objects (default: text).")
    fit.add_argument("--seed", type=int, default=0)
    fit.set_defaults(handler=_run_monitor_fit)
    check = actions.add_parser(
        "check", help="Compare texts with a profile. Exit status 0 whether or not drift is found (2: bad input)."
    )
    check.add_argument("--profile", required=True, help="A profile written by `monitor fit-reference`.")
    check.add_argument("--texts", required=True, help=texts_help)
    check.add_argument("--json", action="store_true", help="Print JSON: drift, n, metrics[], windows[].")
    check.add_argument("--window-size", type=int, default=None, help="Check consecutive windows of N texts "
                       "(default: all texts as one window); top-level metrics are then each metric's worst window.")
    check.add_argument("--report", help="Write an HTML report (each metric over windows against its threshold).")
    check.add_argument("--tokenizer", help="Tokenizer to use instead of the path recorded in the profile.")
    check.add_argument("--model", help="Model for prompt perplexity instead of the one recorded in the profile.")
    check.add_argument("--text-column", default="text", help="Field of the .jsonl objects (default: text).")
    check.set_defaults(handler=_run_monitor_check)


def _run_optimize(args: argparse.Namespace) -> int:
    from hf_optim.pipeline.run import optimize

    results = optimize(args.model, args.recipe, args.output, overrides=args.overrides, select=args.select)
    print(results.to_markdown())
    kept = ", ".join(results.selected) or "none"
    print(f"Kept {kept}; results.json, report.md and report.html are in {args.output}")
    return 0


class _OverridesAfterOptionsParser(argparse.ArgumentParser):
    """Collects ``key=value`` words wherever they stand: argparse alone fills a ``nargs='*'`` positional only from
    the first run of positional words, so ``optimize MODEL --recipe R --output O key=value`` would be rejected."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        overrides = [word for word in extras if "=" in word and not word.startswith("-")]
        namespace.overrides = [*(namespace.overrides or []), *overrides]
        return namespace, [word for word in extras if word not in overrides]


def _add_optimize(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "optimize", help="Build every variant of a recipe, measure each against the base model, report, select."
    )
    parser.__class__ = _OverridesAfterOptionsParser  # subparsers build plain ArgumentParsers
    parser.add_argument("model", help="A model folder (plain Transformers or written by hf_optim) or a Hub id.")
    parser.add_argument("--recipe", required=True, help="Optimize recipe YAML (variants, data, budget), e.g. "
                        "recipes/optimize_tiny.yaml.")
    parser.add_argument("--output", required=True, help="Folder for the variant folders, results.json and reports.")
    parser.add_argument("--select", choices=["all", "pareto"], default=None,
                        help="Keep every variant's folder (all) or only the Pareto-optimal ones inside the budget "
                             "(pareto); default: the recipe's `select`.")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides, e.g. variants=[int8,wanda-50]")
    parser.set_defaults(handler=_run_optimize)


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
    _add_optimize(subparsers)
    _add_monitor(subparsers)
    _add_serve(subparsers)
    _add_push(subparsers)
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
