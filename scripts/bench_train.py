#!/usr/bin/env python
"""Training throughput benchmark: tokens/s, MFU and peak memory of each strategy and checkpointing mode on one model,
side by side with a plain Hugging Face ``Trainer`` baseline, in one run.

Every row is a fresh subprocess. Recipe rows run the real user path,
``accelerate launch --config_file accelerate_configs/<config>.yaml recipes/train_clm.py key=value ...``, and are read
back from their ``train_log.jsonl``; the baseline runs ``transformers.Trainer`` with default settings on the same
model shape, the same packed blocks (same tokenizer, same corpus, ``validation_split=0``) and the same micro-batch.

Method (identical for every row, the Trainer included):
  - tokens/s: each logging window of ``--log-every`` optimizer steps is timed by ``ThroughputMeter`` (on CUDA after a
    synchronize); the FIRST window is warm-up (process-group setup, allocator growth, first-step kernel selection) and
    ignored; the rest are combined time-weighted: tokens of windows 2..n / their wall time. The Trainer row runs the
    same meter from a ``TrainerCallback.on_step_end`` (after its optimizer step), with the same windows.
  - TFLOP/s per device and MFU: ``6·N + 12·L·H·Q·T`` model FLOPs per token (no recompute), over the per-device peak
    (datasheet on GPUs; on CPU the best measured matmul rate of that process, so CPU MFU is relative, not absolute).
  - peak memory: rank 0's peak RSS over its whole life (interpreter, libraries and data included); on CUDA also peak
    allocated and reserved GPU memory. Other ranks are not reported.
  - rows with several processes share the machine's cores: each gets ``usable cores // processes`` OMP threads.

Rows (``--rows``, comma-separated): ``trainer``, or ``<config>[:<off|full|selective>]`` for any
``accelerate_configs/<config>.yaml``. A row that fails is recorded with its error; the benchmark goes on.

Example:
    $ .venv/bin/python scripts/bench_train.py                     # CPU: 9 rows, 5-20 minutes on 2 cores
    $ .venv/bin/python scripts/bench_train.py --repeats 3 --threads 1   # a busy machine: medians, no OMP spinning
    $ .venv/bin/python scripts/bench_train.py --rows trainer,cpu_single:off,cpu_single:full --steps 8
    $ .venv/bin/python scripts/bench_train.py --device cuda --dry-run   # the GPU plan (TinyLlama 1.1B), not run

Writes ``<output-dir>/bench_train.json`` (``--json-out``) and ``<output-dir>/bench_train.md``; prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hf_optim.core.errors import ConfigError, HfOptimError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "accelerate_configs"
RECIPE = REPO_ROOT / "recipes" / "train_clm.py"
CHECKPOINTING = ("off", "full", "selective")
TRAINER = "trainer"
SEED = 42


@dataclasses.dataclass(frozen=True)
class Shape:
    """A model shape (random init from ``model_config``) and the run lengths that give stable numbers for it."""

    model_config: dict[str, Any]
    seq_len: int
    micro_batch_size: int
    steps: int
    log_every: int


_LLAMA = {"model_type": "llama", "tie_word_embeddings": False}
SHAPES = {
    # seconds per row: only checks the plumbing
    "tiny": Shape({**_LLAMA, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 384,
                   "max_position_embeddings": 64}, seq_len=32, micro_batch_size=4, steps=6, log_every=2),
    # ~5M parameters: about 1-2 s per optimizer step on 2 cores, 7 measured windows of 2 steps
    "small": Shape({**_LLAMA, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 4096,
                    "max_position_embeddings": 512}, seq_len=256, micro_batch_size=4, steps=16, log_every=2),
    # TinyLlama-1.1B; micro-batch 4 x 2048 should fit an 80 GB GPU without checkpointing: fp32 weights, grads and
    # AdamW ~18 GB + bf16 activations ~18 GB (hf_optim.training.memory's estimate); not yet run on a GPU
    "tinyllama-1.1b": Shape({**_LLAMA, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                             "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
                             "max_position_embeddings": 2048, "rms_norm_eps": 1e-5},
                            seq_len=2048, micro_batch_size=4, steps=60, log_every=10),
}
DEFAULTS = {  # device -> (shape, mixed precision, rows)
    "cpu": ("small", "no", [TRAINER, "cpu_single:off", "cpu_single:full", "cpu_single:selective", "cpu_multi:off",
                            "fsdp2_full_shard:off", "fsdp2_no_reshard:off", "zero2:off", "zero3:off"]),
    "cuda": ("tinyllama-1.1b", "bf16", [TRAINER, "single_gpu:off", "single_gpu:full", "single_gpu:selective", "fp8:off"]),
}


@dataclasses.dataclass
class Row:
    """One benchmark row: what to run, and (after running) what it measured."""

    name: str
    config: str | None  # accelerate config stem; None for the Trainer baseline
    checkpointing: str
    mixed_precision: str
    processes: int
    threads_per_process: int
    skip_reason: str | None = None
    runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # one result per repeat
    result: dict[str, Any] = dataclasses.field(default_factory=dict)  # the runs combined

    @property
    def dir_name(self) -> str:
        return self.name.replace(":", "-")


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _torchao_importable() -> str | None:
    """None when torchao imports, else why not (the fp8 row needs it)."""
    try:
        importlib.import_module("torchao")
    except Exception as exc:  # a broken install is as unusable as a missing one
        return f"torchao is not importable ({type(exc).__name__}: {exc}); pip install torchao for the fp8 row"
    return None


def parse_rows(text: str, device: str, mixed_precision: str, usable_cores: int, threads: int | None,
               gpu_count: int) -> list[Row]:
    """Rows from ``--rows`` (``trainer`` or ``<config>[:<mode>]``), validated against ``accelerate_configs/``."""
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    rows, seen = [], set()
    for spec in (s.strip() for s in text.split(",")):
        if not spec:
            continue
        if spec == TRAINER:
            config, mode, processes, precision = None, "off", 1, mixed_precision
        else:
            config, _, mode = spec.partition(":")
            mode = mode or "off"
            if config not in known:
                raise ConfigError(f"--rows: {config!r} is neither {TRAINER!r} nor a config in {CONFIG_DIR}; "
                                  f"known configs: {', '.join(known)}.")
            if mode not in CHECKPOINTING:
                raise ConfigError(f"--rows: checkpointing mode {mode!r} in {spec!r} is not one of "
                                  f"{list(CHECKPOINTING)} (write e.g. cpu_single:full).")
            launch = _yaml(CONFIG_DIR / f"{config}.yaml")
            processes = int(launch.get("num_processes", 1) or 1)
            if device == "cuda":  # one process per visible GPU at most (a dry run without GPUs plans for one)
                processes = min(processes, max(gpu_count, 1))
            # A config that exists for its precision (fp8.yaml) keeps it; the others use the benchmark's.
            precision = str(launch.get("mixed_precision", "no")).lower()
            precision = precision if precision != "no" else mixed_precision
        name = TRAINER if config is None else f"{config}:{mode}"
        if name in seen:
            raise ConfigError(f"--rows lists {name!r} twice.")
        seen.add(name)
        per_process = threads or max(1, usable_cores // processes)
        rows.append(Row(name, config, mode, precision, processes, per_process))
    if not rows:
        raise ConfigError("--rows is empty; e.g. --rows trainer,cpu_single:off.")
    return rows


def _free_port() -> int:
    # Other jobs on the machine may hold the default rendezvous port 29500.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _yaml_scalar(value: Any) -> str:
    """``value`` as the recipe's YAML override parser reads it back (PyYAML takes ``1e-05`` for a string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):  # quoted when YAML would read it as something else (no/off are booleans)
        import yaml

        return value if yaml.safe_load(value) == value else json.dumps(value)
    text = repr(value)
    if isinstance(value, float) and "e" in text and "." not in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return text


def row_command(row: Row, run_dir: Path, shape: Shape, args: argparse.Namespace, corpus: Path, tokenizer_dir: Path,
                device: str) -> tuple[list[str], dict[str, str]]:
    """The command line of one run of ``row`` writing to ``run_dir``, and the variables it sets over os.environ."""
    env = {"OMP_NUM_THREADS": str(row.threads_per_process)}
    if row.config is None:
        spec = {
            "model_config": shape.model_config, "tokenizer": str(tokenizer_dir), "corpus": str(corpus),
            "block_size": args.seq_len, "micro_batch_size": args.micro_batch_size, "steps": args.steps,
            "log_every": args.log_every, "mixed_precision": row.mixed_precision, "output_dir": str(run_dir),
        }
        if device == "cuda":  # Trainer wraps the model in DataParallel when it sees several GPUs
            env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        return [sys.executable, str(Path(__file__).resolve()), "--trainer-worker", json.dumps(spec)], env
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG_DIR / f"{row.config}.yaml"),
              "--num_processes", str(row.processes), "--num_cpu_threads_per_process", str(row.threads_per_process)]
    recipe = [
        *(f"model_config.{k}={_yaml_scalar(v)}" for k, v in shape.model_config.items()),
        f"tokenizer={tokenizer_dir}", f"train_files=[{corpus}]", "validation_split=0", f"block_size={args.seq_len}",
        f"micro_batch_size={args.micro_batch_size}", "gradient_accumulation_steps=1", f"max_steps={args.steps}",
        f"log_every_n_steps={args.log_every}", "save_every_n_steps=0", "eval_every_n_steps=0", f"seed={SEED}",
        f"checkpoint_every_n_layers={args.checkpoint_every_n_layers}",
        f"mixed_precision={_yaml_scalar(row.mixed_precision)}", f"gradient_checkpointing={_yaml_scalar(row.checkpointing)}",
        f"output_dir={run_dir}",
    ]
    return [*launch, str(RECIPE), *recipe], env


# ---------------------------------------------------------------- reading results
def summarize_log(path: Path) -> dict[str, Any]:
    """Time-weighted rates over every logging window but the first (warm-up), and peak memory over the run.

    Example:
        >>> summarize_log(Path("outputs/bench_train/rows/cpu_single-off/train_log.jsonl"))["tokens_per_s"]  # doctest: +SKIP
        8123.4
    """
    if not path.is_file():
        raise RuntimeError(f"no training log at {path}")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    windows = [r for r in records if "tokens_per_s" in r]
    if len(windows) < 2:
        raise RuntimeError(f"{path} holds {len(windows)} logging window(s); need 2 (the first is warm-up)")
    measured = windows[1:]
    elapsed = sum(r["elapsed_s"] for r in measured)

    def weighted(key: str) -> float | None:
        values = [r.get(key) for r in measured]
        if any(v is None for v in values):
            return None
        return sum(v * r["elapsed_s"] for v, r in zip(values, measured)) / elapsed

    memory_keys = sorted({k for r in windows for k in r if k.endswith("_gib") and "peak" in k})
    losses = [r["loss"] for r in windows if r.get("loss") is not None]
    return {
        "tokens_per_s": weighted("tokens_per_s"),
        "tflops_per_device": weighted("tflops_per_device"),
        "mfu": weighted("mfu"),
        "measured_windows": len(measured),
        "measured_steps": windows[-1]["step"] - windows[0]["step"],
        "measured_s": elapsed,
        "window_tokens_per_s": [r["tokens_per_s"] for r in measured],
        "peak_memory": {k: max(r[k] for r in windows if k in r) for k in memory_keys},
        "last_loss": losses[-1] if losses else None,
    }


_EXCEPTION_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception)\b.*)$")
_LAUNCHER_ERRORS = ("ChildFailedError", "CalledProcessError")


def extract_error(log_text: str) -> str:
    """The line that says why a row failed: the recipe's one-line usage error, else the last exception raised in a
    worker (not the launcher's wrapper around it), else the last lines of output."""
    lines = [line.rstrip() for line in log_text.splitlines() if line.strip()]
    usage = [line for line in lines if "train_clm: error:" in line]
    if usage:
        return usage[-1].split("train_clm: error:", 1)[1].strip()
    exceptions = [m.group(1) for line in lines if (m := _EXCEPTION_LINE.match(line.strip()))]
    exceptions = [e for e in exceptions if not any(w in e.split(":")[0] for w in _LAUNCHER_ERRORS)]
    if exceptions:
        return exceptions[-1]
    return " | ".join(lines[-3:]) or "no output"


def run_once(command: list[str], env_vars: dict[str, str], run_dir: Path, timeout: float,
             keep_artifacts: bool) -> dict[str, Any]:
    """Run one command in its own process group; its metrics read from ``run_dir``, or its error."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the recipe appends to train_log.jsonl: a stale one would mix two runs
    run_dir.mkdir(parents=True)
    log_path = run_dir / "output.log"
    if str(RECIPE) in command and "--num_processes" in command and command[command.index("--num_processes") + 1] != "1":
        at = command.index(str(RECIPE))  # a port picked now: one free at planning time may not be later
        command = [*command[:at], "--main_process_port", str(_free_port()), *command[at:]]
    result: dict[str, Any] = {"command": shlex.join(command), "env": env_vars, "log": str(log_path),
                              "loadavg_1m_at_start": os.getloadavg()[0]}
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env_vars},
                                cwd=REPO_ROOT, start_new_session=True)
        try:
            returncode, timed_out = proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            returncode, timed_out = None, True
        except BaseException:  # Ctrl-C: take the launcher and its workers down too
            _kill_group(proc)
            raise
        if timed_out:
            _kill_group(proc)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    if timed_out:
        result.update(status="error", error=f"timed out after {timeout:.0f} s (--row-timeout)")
    elif returncode != 0:
        result.update(status="error", error=f"exit code {returncode}: {extract_error(log_path.read_text(errors='replace'))}")
    else:
        try:
            result.update(summarize_log(run_dir / "train_log.jsonl"), status="ok")
        except RuntimeError as exc:
            result.update(status="error", error=str(exc))
        summary_path = run_dir / "summary.json"
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text())
            result["strategy"] = summary.get("strategy")
            if result.get("last_loss") is None:  # the Trainer's loss comes from its own log history
                result["last_loss"] = summary.get("last_loss")
    if not keep_artifacts:  # a 1.1B row leaves ~18 GB of checkpoint and model behind
        for name in ("checkpoints", "model", "tokenizer"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
    return result


def combine_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row result from its repeats: medians of the rates, the highest peak memory, the range of window rates.

    A row with a failed repeat reports that failure (a strategy that fails once is not a number to compare).
    """
    failed = next((r for r in runs if r["status"] != "ok"), None)
    if failed is not None:
        return {"status": failed["status"], "error": failed["error"], "strategy": failed.get("strategy")}

    def median(key: str) -> float | None:
        values = sorted(r[key] for r in runs if r[key] is not None)
        if len(values) < len(runs):
            return None
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

    windows = [w for r in runs for w in r["window_tokens_per_s"]]
    peaks: dict[str, float] = {}
    for r in runs:
        for key, value in r["peak_memory"].items():
            peaks[key] = max(value, peaks.get(key, value))
    return {
        "status": "ok", "strategy": runs[0].get("strategy"), "tokens_per_s": median("tokens_per_s"),
        "tflops_per_device": median("tflops_per_device"), "mfu": median("mfu"), "peak_memory": peaks,
        "tokens_per_s_runs": [r["tokens_per_s"] for r in runs], "window_tokens_per_s_range": [min(windows), max(windows)],
        "last_loss": runs[-1].get("last_loss"),
    }


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


# ---------------------------------------------------------------- the Trainer baseline (runs in its own process)
def trainer_worker(spec: dict[str, Any]) -> None:
    """Train with ``transformers.Trainer`` at default settings and log windows in the recipe's train_log format.

    Only what the comparison needs is set: batch size, steps, logging, no saving, the benchmark's precision, and
    ``dataloader_drop_last=True`` so that every step holds the same number of tokens (as in the recipe).
    """
    import torch
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling,
                              Trainer, TrainerCallback, TrainingArguments)

    from hf_optim.training.data import build_lm_datasets
    from hf_optim.training.metrics import JsonlLogger, ThroughputMeter, flops_per_token, memory_stats

    output_dir = Path(spec["output_dir"])
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    splits = build_lm_datasets(tokenizer, [spec["corpus"]], validation_split=0.0, block_size=spec["block_size"],
                               seed=SEED)
    overrides = dict(spec["model_config"])
    overrides.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(overrides.pop("model_type"), **overrides)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    precision = spec["mixed_precision"]
    args = TrainingArguments(
        output_dir=str(output_dir / "trainer"), per_device_train_batch_size=spec["micro_batch_size"],
        max_steps=spec["steps"], logging_steps=spec["log_every"], report_to=[], save_strategy="no",
        bf16=precision == "bf16", fp16=precision == "fp16", dataloader_drop_last=True, seed=SEED,
    )
    tokens_per_step = spec["micro_batch_size"] * spec["block_size"]  # full blocks, no padding
    flops = flops_per_token(config, spec["block_size"])
    log = JsonlLogger(output_dir / "train_log.jsonl")

    class Windows(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.meter = ThroughputMeter(flops, device=args.device, dtype="fp32" if precision == "no" else precision,
                                         world_size=1)

        def on_step_end(self, args, state, control, **kwargs):
            self.meter.update(tokens_per_step)
            if state.global_step % spec["log_every"] == 0 or state.global_step == state.max_steps:
                log.log({"step": state.global_step, "tokens_seen": state.global_step * tokens_per_step,
                         **self.meter.read(), **memory_stats(args.device)})

    trainer = Trainer(model=model, args=args, train_dataset=splits["train"],
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=[Windows()])
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = {"steps": result.global_step, "strategy": "hf-trainer", "last_loss": losses[-1] if losses else None}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))


# ---------------------------------------------------------------- report
def machine_info() -> dict[str, Any]:
    """The key bits of ``hf_optim.core.env.collect_environment()`` for a benchmark record."""
    from hf_optim.core.env import collect_environment

    report = collect_environment()
    stack, hardware, backends = report["stack"], report["hardware"], report["backends"]
    return {
        "stack": {k: stack.get(k) for k in ("python", "torch", "transformers", "accelerate", "datasets")}
        | {"deepspeed": backends["deepspeed"]["version"], "torchao": backends["torchao"]["version"]},
        "cpu": {k: hardware["cpu"][k] for k in ("model", "usable_cores", "avx512", "amx_bf16")},
        "ram_gib": hardware["ram_gib"],
        "cuda": hardware["cuda"],
        "loadavg_1m_at_start": os.getloadavg()[0],
    }


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _tokens_cell(result: dict[str, Any]) -> str:
    if result.get("tokens_per_s") is None:
        return "–"
    low, high = result["window_tokens_per_s_range"]
    return f"{result['tokens_per_s']:,.0f} ({low:,.0f}–{high:,.0f})"


def _memory_cell(peak: dict[str, float]) -> str:
    if "gpu_peak_allocated_gib" in peak:
        return f"{peak['gpu_peak_allocated_gib']:.2f} / {peak.get('gpu_peak_reserved_gib', float('nan')):.2f}"
    return _fmt(peak.get("cpu_peak_rss_gib"), ".2f")


def checkpointing_tradeoffs(rows: list[Row]) -> list[dict[str, Any]]:
    """For each config run with checkpointing off and on: peak-memory saving and throughput cost of each mode."""
    out = []
    by_config = {}
    for row in rows:
        if row.config and row.result.get("status") == "ok":
            by_config.setdefault(row.config, {})[row.checkpointing] = row.result
    for config, modes in by_config.items():
        base = modes.get("off")
        if base is None:
            continue
        key = "gpu_peak_allocated_gib" if "gpu_peak_allocated_gib" in base["peak_memory"] else "cpu_peak_rss_gib"
        for mode in ("full", "selective"):
            if mode in modes and key in modes[mode]["peak_memory"]:
                mem_off, mem_on = base["peak_memory"][key], modes[mode]["peak_memory"][key]
                speed_off, speed_on = base["tokens_per_s"], modes[mode]["tokens_per_s"]
                out.append({
                    "config": config, "mode": mode, "memory_key": key, "memory_off_gib": mem_off, "memory_on_gib": mem_on,
                    "memory_change": mem_on / mem_off - 1, "tokens_per_s_off": speed_off, "tokens_per_s_on": speed_on,
                    "tokens_per_s_change": speed_on / speed_off - 1,
                })
    return out


def markdown(report: dict[str, Any], rows: list[Row]) -> str:
    model, training = report["model"], report["training"]
    gpu = report["device"] == "cuda"
    lines = [
        f"## Training throughput — {report['device']}, {model['shape']} "
        f"({model['parameters'] / 1e6:,.1f}M parameters), micro-batch {training['micro_batch_size']} × "
        f"seq {training['seq_len']}, {training['steps']} steps, windows of {training['log_every_n_steps']} "
        f"(first ignored), median of {training['repeats']} run(s) per row",
        "",
        f"| row | strategy | procs × threads | checkpointing | precision | tokens/s (window range) | TFLOP/s/device | MFU | "
        f"{'peak GPU alloc / reserved GiB' if gpu else 'peak RSS GiB (rank 0)'} | vs Trainer | status |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        r = row.result
        status = r.get("status", "?")
        if status != "ok":
            error = r.get("error", "")
            status = f"{status}: {error[:160]}{'…' if len(error) > 160 else ''}".replace("|", "\\|")
        lines.append(
            f"| {row.name} | {r.get('strategy', '?')} | {row.processes} × {row.threads_per_process} | "
            f"{row.checkpointing} | {row.mixed_precision} | {_tokens_cell(r)} | "
            f"{_fmt(r.get('tflops_per_device'), '.3g')} | "
            f"{_fmt(None if r.get('mfu') is None else 100 * r['mfu'], '.1f', '%')} | "
            f"{_memory_cell(r.get('peak_memory', {})) if status == 'ok' else '–'} | "
            f"{_fmt(r.get('relative_to_trainer'), '.2f', '×')} | {status} |"
        )
    tradeoffs = report["checkpointing_tradeoffs"]
    if tradeoffs:
        lines += ["", "Activation checkpointing vs off (same config):"]
        for t in tradeoffs:
            memory = "peak GPU allocated" if t["memory_key"].startswith("gpu") else "peak RSS"
            lines.append(
                f"- {t['config']} {t['mode']}: {memory} {t['memory_off_gib']:.2f} → {t['memory_on_gib']:.2f} GiB "
                f"({100 * t['memory_change']:+.1f}%), tokens/s {t['tokens_per_s_off']:,.0f} → "
                f"{t['tokens_per_s_on']:,.0f} ({100 * t['tokens_per_s_change']:+.1f}%)"
            )
    lines += ["", report["method"]]
    return "\n".join(lines) + "\n"


METHOD = (
    "Method: tokens/s = tokens of logging windows 2..n / their wall time (window 1 is warm-up); the Trainer row uses "
    "the same ThroughputMeter from TrainerCallback.on_step_end. MFU = model FLOPs (6N + 12·L·H·Q·T per token, no "
    "recompute) per device over the device peak (CPU: measured matmul peak of that process). Peak memory is rank 0's "
    "lifetime peak RSS (CPU) or peak CUDA allocated/reserved. Multi-process rows split the cores between processes. "
    "The range in brackets is the slowest and fastest measured window over all runs: a wide one means a noisy machine."
)


# ---------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when CUDA is available, else cpu. Picks the default shape, precision, rows.")
    parser.add_argument("--rows", help="Comma-separated rows: trainer, <config>[:off|full|selective].")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="Model shape (cpu: small, cuda: tinyllama-1.1b).")
    parser.add_argument("--steps", type=int, help="Optimizer steps per row (default: the shape's).")
    parser.add_argument("--log-every", type=int, help="Steps per logging window (default: the shape's).")
    parser.add_argument("--seq-len", type=int, help="Block size in tokens (default: the shape's).")
    parser.add_argument("--micro-batch-size", type=int, help="Blocks per process per step (default: the shape's).")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"),
                        help="For every row but fp8.yaml's (cpu: no, cuda: bf16).")
    parser.add_argument("--checkpoint-every-n-layers", type=int, default=2, help="For selective checkpointing.")
    parser.add_argument("--threads", type=int, help="OMP threads per process (default: usable cores // processes).")
    parser.add_argument("--corpus", type=Path,
                        help="Training text (.txt, blank-line separated); default: CPython's pydoc topics.")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/bench_train"))
    parser.add_argument("--json-out", type=Path, help="Default: <output-dir>/bench_train.json.")
    parser.add_argument("--repeats", type=int, default=1,
                        help="Runs per row, round-robin over the rows; rates are the median run (default 1).")
    parser.add_argument("--row-timeout", type=float, default=1800, help="Seconds before a row is killed.")
    parser.add_argument("--keep-artifacts", action="store_true", help="Keep each row's checkpoints and model.")
    parser.add_argument("--dry-run", action="store_true", help="Print the commands for the chosen device; run nothing.")
    parser.add_argument("--trainer-worker", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    return parser


def _check_positive(args: argparse.Namespace) -> None:
    for name in ("steps", "log_every", "seq_len", "micro_batch_size", "checkpoint_every_n_layers", "threads", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={value} must be >= 1.")
    if args.steps < 2 * args.log_every:
        raise ConfigError(
            f"--steps={args.steps} with --log-every={args.log_every} gives fewer than 2 full logging windows; the "
            f"first is warm-up and ignored. Use --steps >= {2 * args.log_every}."
        )
    if args.corpus is not None and not args.corpus.is_file():
        raise ConfigError(f"--corpus {str(args.corpus)!r} is not a file.")


def model_facts(shape: Shape, seq_len: int) -> dict[str, Any]:
    """Parameter count (on the meta device, no memory) and model FLOPs per token of ``shape``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_optim.training.metrics import flops_per_token

    overrides = dict(shape.model_config)
    config = AutoConfig.for_model(overrides.pop("model_type"), **overrides)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "flops_per_token": flops_per_token(config, seq_len)}


def prepare_data(corpus: Path, write_builtin: bool, tokenizer_dir: Path, vocab_size: int) -> None:
    """Write the built-in corpus if asked, and train the one tokenizer every row loads (so all see the same blocks)."""
    from hf_optim.training.data import builtin_corpus, load_text_dataset, train_tokenizer

    if write_builtin:
        corpus.parent.mkdir(parents=True, exist_ok=True)
        corpus.write_text("\n\n".join(builtin_corpus()))
    raw = load_text_dataset([str(corpus)], validation_split=0.0)  # the documents the recipe's loader sees
    train_tokenizer(raw["train"]["text"], vocab_size=vocab_size).save_pretrained(tokenizer_dir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.trainer_worker:
        trainer_worker(json.loads(args.trainer_worker))
        return 0

    import torch

    cuda_available = torch.cuda.is_available()
    device = args.device if args.device != "auto" else ("cuda" if cuda_available else "cpu")
    if device == "cuda" and not cuda_available and not args.dry_run:
        raise ConfigError("--device cuda but CUDA is not available here; use --device cpu, or --dry-run to print "
                          "the GPU plan.")
    default_shape, default_precision, default_rows = DEFAULTS[device]
    shape = SHAPES[args.shape or default_shape]
    for name in ("steps", "log_every", "micro_batch_size"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(shape, name))
    args.seq_len = args.seq_len or shape.seq_len
    _check_positive(args)
    if args.seq_len > shape.model_config["max_position_embeddings"]:
        raise ConfigError(f"--seq-len={args.seq_len} exceeds the shape's max_position_embeddings "
                          f"({shape.model_config['max_position_embeddings']}).")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    rows = parse_rows(args.rows or ",".join(default_rows), device, args.mixed_precision or default_precision, usable,
                      args.threads, torch.cuda.device_count() if cuda_available else 0)
    for row in rows:
        if row.mixed_precision == "fp8":
            row.skip_reason = _torchao_importable()

    output_dir = args.output_dir.resolve()
    json_out = (args.json_out or output_dir / "bench_train.json").resolve()
    corpus = args.corpus.resolve() if args.corpus else output_dir / "corpus" / "pydoc_topics.txt"
    tokenizer_dir = output_dir / "tokenizer"
    facts = model_facts(shape, args.seq_len)
    shape_name = args.shape or default_shape

    def command(row: Row, run: int) -> tuple[list[str], dict[str, str]]:
        run_dir = output_dir / "rows" / row.dir_name / f"run-{run}"
        return row_command(row, run_dir, shape, args, corpus, tokenizer_dir, device)

    if args.dry_run:
        print(f"# bench_train plan: device={device}, shape {shape_name} ({facts['parameters']:,} parameters), "
              f"micro-batch {args.micro_batch_size} x seq {args.seq_len}, {args.steps} steps, logging windows of "
              f"{args.log_every} (the first is warm-up), {args.repeats} run(s) per row, round-robin")
        print(f"# prepare: corpus {corpus}; tokenizer (vocab {shape.model_config['vocab_size']}) -> {tokenizer_dir}")
        for row in rows:
            if row.skip_reason:
                print(f"[{row.name}] skipped: {row.skip_reason}")
                continue
            cmd, env = command(row, 1)
            print(f"[{row.name}] {' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items())} {shlex.join(cmd)}")
        return 0

    output_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".torch_extensions"))  # DeepSpeed JIT ops, once
    os.environ.setdefault("HF_DATASETS_CACHE", str(output_dir / "hf_datasets_cache"))
    print(f"[bench] preparing corpus and tokenizer in {output_dir}", file=sys.stderr)
    prepare_data(corpus, args.corpus is None, tokenizer_dir, shape.model_config["vocab_size"])
    machine = machine_info()
    if device == "cpu" and machine["loadavg_1m_at_start"] > usable:
        print(f"[bench] warning: load average {machine['loadavg_1m_at_start']:.1f} on {usable} usable cores: other "
              "processes compete with the rows, so numbers will drift (see --repeats; --threads 1 avoids OpenMP "
              "threads waiting on a busy core)", file=sys.stderr)
    # Round-robin over the rows: a slow drift in machine load spreads over every row instead of hitting a few.
    for run in range(1, args.repeats + 1):
        for index, row in enumerate(rows, start=1):
            if row.skip_reason or (row.runs and row.runs[-1]["status"] != "ok"):
                continue  # a failed row is not retried: its error is the result
            print(f"[bench] run {run}/{args.repeats}, row {index}/{len(rows)} {row.name}: {row.processes} process(es) "
                  f"x {row.threads_per_process} thread(s) ...", file=sys.stderr, flush=True)
            cmd, env = command(row, run)
            result = run_once(cmd, env, output_dir / "rows" / row.dir_name / f"run-{run}", args.row_timeout,
                              args.keep_artifacts)
            row.runs.append(result)
            print(f"[bench]   {result['status']}: " + (f"{result['tokens_per_s']:,.0f} tokens/s, {result['wall_s']} s"
                  if result["status"] == "ok" else result["error"]), file=sys.stderr, flush=True)

    from hf_optim.training.accelerator import strategy_from_config_file

    for row in rows:
        row.result = combine_runs(row.runs) if row.runs else {"status": "skipped", "error": row.skip_reason}
        if row.config is None:
            row.result["strategy"] = "hf-trainer"
        elif row.result.get("strategy") is None:  # failed before writing summary.json: what the config asks for
            try:
                row.result["strategy"] = strategy_from_config_file(CONFIG_DIR / f"{row.config}.yaml")
            except ConfigError as exc:
                row.result["strategy"] = f"invalid: {exc}"
    baseline = next((row.result for row in rows if row.config is None and row.result["status"] == "ok"), None)
    for row in rows:
        if baseline and row.result["status"] == "ok":
            row.result["relative_to_trainer"] = row.result["tokens_per_s"] / baseline["tokens_per_s"]

    report = {
        "benchmark": "bench_train",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.argv[0], *(argv if argv is not None else sys.argv[1:])],
        "device": device,
        "machine": machine,
        "model": {"shape": shape_name, **shape.model_config, **facts},
        "training": {"seq_len": args.seq_len, "micro_batch_size": args.micro_batch_size,
                     "gradient_accumulation_steps": 1, "steps": args.steps, "log_every_n_steps": args.log_every,
                     "repeats": args.repeats,
                     "warmup_windows_ignored": 1, "checkpoint_every_n_layers": args.checkpoint_every_n_layers,
                     "corpus": str(corpus)},
        "method": METHOD,
        "rows": [{"name": row.name, "accelerate_config": row.config, "processes": row.processes,
                  "omp_threads_per_process": row.threads_per_process, "gradient_checkpointing": row.checkpointing,
                  "mixed_precision": row.mixed_precision, **row.result, "runs": row.runs}
                 for row in rows],
    }
    report["checkpointing_tradeoffs"] = checkpointing_tradeoffs(rows)
    table = markdown(report, rows)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=2) + "\n")
    (output_dir / "bench_train.md").write_text(table)
    print(table)
    print(f"[bench] wrote {json_out} and {output_dir / 'bench_train.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HfOptimError as exc:  # a usage error: one clear line, not a traceback
        print(f"bench_train: error: {exc}", file=sys.stderr)
        sys.exit(2)
