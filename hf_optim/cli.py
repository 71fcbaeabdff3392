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
    parser.add_argument("--gpu-memory", default=None, help="Memory per GPU, e.g. 80GiB or 24GB: pick the cheapest strategy that fits.")
    parser.add_argument("--json", action="store_true", help="Print machine-readable JSON.")
    parser.set_defaults(handler=_run_estimate_memory)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hf-optim``, with every sub-command registered."""
    parser = argparse.ArgumentParser(prog="hf-optim", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hf-optim {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_env(subparsers)
    _add_estimate_memory(subparsers)
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
