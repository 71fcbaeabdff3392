#!/usr/bin/env python
"""`make demo`: the whole chain on an embedded default, offline, in a few minutes on 2 CPU cores.

1. Train a ~5M-parameter Llama from scratch on the English documentation that ships with CPython (``pydoc_data``),
   with the tokenizer trained on the same text, through the real user path:
   ``accelerate launch --config_file accelerate_configs/cpu_single.yaml recipes/train_clm.py ...``.
2. Optimize it: ``hf-optim optimize`` builds and measures a few variants against held-out documentation and writes
   the report (Markdown, HTML, plots), each variant with its model card and reference drift profile.
3. Publish in dry-run mode: ``hf-optim push <variant> --dry-run`` lists the files one commit would upload.
4. Serve the chosen variant with monitoring (``hf-optim serve``), send documentation prose (like the reference) and
   then JSON records (a client gone wrong), and show the drift of each window; ``hf-optim monitor check`` does the
   same check in batch.

It prints where every artifact is.

    python scripts/demo.py [--output-dir outputs/demo] [key=value overrides for the training recipe ...]
"""

from __future__ import annotations

import argparse
import json
import locale
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
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


OPTIMIZE_VARIANTS = "[int8,wanda-2:4+int8,onnx-int8]"
SERVE_WINDOW = 32


def write_corpus(folder: Path) -> tuple[Path, Path]:
    """Training text and held-out text (every 10th document), blank-line separated paragraphs."""
    from hf_optim.training.data import builtin_corpus

    folder.mkdir(parents=True, exist_ok=True)
    documents = builtin_corpus()
    train, heldout = folder / "pydoc_topics.txt", folder / "heldout.txt"
    train.write_text("\n\n".join(doc for i, doc in enumerate(documents) if i % 10))
    heldout.write_text("\n\n".join(doc for i, doc in enumerate(documents) if not i % 10))
    return train, heldout


def prose_prompts(corpus: Path, count: int) -> list[str]:
    """Documentation paragraphs of prompt size from the training text: the same source as the reference profile
    (which was fitted on the held-out documents), so these must not alert."""
    paragraphs = (re.sub(r"\s+", " ", p).strip() for p in corpus.read_text().split("\n\n"))
    return [p for p in paragraphs if 60 <= len(p) <= 400][:count]


def json_record_prompts(count: int) -> list[str]:
    """Shifted traffic: a client that sends JSON records instead of questions (built from CPython's locale table)."""
    aliases = sorted(locale.locale_alias.items())[::7]
    return [json.dumps({"request_id": i, "locale": alias, "resolved": name}) for i, (alias, name) in
            enumerate(aliases[:count])]


def hf_optim_command(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "hf-optim"), *args]  # the installed command, as a user runs it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(url: str, payload: dict | None = None) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def serve_and_watch(variant: Path, output_dir: Path, prose: list[str], records: list[str], env: dict) -> dict:
    """Serve ``variant`` with monitoring, send one window of prose and one of JSON records; both windows' results."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (output_dir / "serve.log").open("w")
    server = subprocess.Popen(hf_optim_command(
        "serve", str(variant), "--port", str(port), "--reference-profile", str(variant / "reference_profile.npz"),
        "--window-size", str(SERVE_WINDOW), "--window-seconds", "0",
        "--traffic-log", str(output_dir / "traffic.jsonl")), stdout=log, stderr=subprocess.STDOUT, env=env)
    windows = {}
    try:
        wait_for(lambda: http_json(f"{url}/health").get("status") == "ok", 180, "the server to start")
        for name, prompts in (("prose", prose), ("JSON record", records)):
            for prompt in prompts:
                http_json(f"{url}/generate", {"prompt": prompt, "max_new_tokens": 16})
            count = len(windows) + 1
            state = wait_for(lambda: (lambda s: s if s["collector"]["windows"] >= count else None)(
                http_json(f"{url}/monitoring")), 180, f"monitoring window {count}")
            windows[name] = state["result"]
        metrics = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
        (output_dir / "metrics.prom").write_text(metrics)
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    return windows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for the training recipe")
    args = parser.parse_args()
    output_dir = Path(args.output_dir).resolve()
    corpus, heldout = write_corpus(output_dir / "corpus")
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
    print(f"\n[demo] 1/4 trained {summary['steps']} steps in {time.perf_counter() - start:.0f} s; "
          f"held-out perplexity {summary.get('eval_perplexity', float('nan')):.1f}")

    optimize_dir = output_dir / "optimize"
    print(f"\n[demo] $ hf-optim optimize {train_dir / 'model'} --recipe recipes/optimize_tiny.yaml "
          f"variants={OPTIMIZE_VARIANTS} ...")
    step_start = time.perf_counter()
    returncode = subprocess.call(hf_optim_command(
        "optimize", str(train_dir / "model"), "--recipe", str(REPO_ROOT / "recipes" / "optimize_tiny.yaml"),
        "--output", str(optimize_dir), f"variants={OPTIMIZE_VARIANTS}", f"eval_data={heldout}",
        f"calibration_data={corpus}", "max_eval_tokens=8192", "max_length=128", "calibration_seq_len=128",
        "budget.max_perplexity_increase=0.05"), env=env)
    if returncode:
        print(f"[demo] optimize failed with exit code {returncode}", file=sys.stderr)
        return returncode
    from hf_optim.pipeline.report import OptimizeResults

    results = OptimizeResults.load(optimize_dir)  # `hf-optim optimize` printed its table above
    in_budget = [r for r in results if r["status"] == "ok" and r["name"] != "base" and r.get("within_budget")]
    chosen = min(in_budget, key=lambda r: r["size_bytes"]) if in_budget else results["int8"]
    variant = Path(chosen["folder"])
    print(f"[demo] 2/4 optimized in {time.perf_counter() - step_start:.0f} s; chosen: {chosen['name']} "
          f"(smallest inside the budget)")

    print(f"\n[demo] $ hf-optim push {variant} --repo-id hf-optim-demo/{variant.name} --dry-run")
    listing = subprocess.run(hf_optim_command("push", str(variant), "--repo-id", f"hf-optim-demo/{variant.name}",
                                              "--dry-run"), env=env, capture_output=True, text=True, check=True)
    print(listing.stdout.rstrip())
    print("[demo] 3/4 dry run: the files above would go to the Hub in one commit (nothing was sent)")

    print(f"\n[demo] $ hf-optim serve {variant} --reference-profile {variant / 'reference_profile.npz'} ...")
    prose, records = prose_prompts(corpus, SERVE_WINDOW), json_record_prompts(SERVE_WINDOW)
    windows = serve_and_watch(variant, output_dir, prose, records, env)
    for name, result in windows.items():
        print(f"[demo] window of {result['n']} {name} prompts: drift={result['drift']}; "
              f"alerts: {', '.join(result['alerts']) or 'none'}")
    shifted = output_dir / "json_records.txt"
    shifted.write_text("\n".join(records) + "\n")
    check = subprocess.run(hf_optim_command(
        "monitor", "check", "--profile", str(variant / "reference_profile.npz"), "--texts", str(shifted), "--json"),
        env=env, capture_output=True, text=True, check=True)
    print(f"[demo] $ hf-optim monitor check --profile ... --texts {shifted} --json -> "
          f"drift={json.loads(check.stdout)['drift']}")
    print(f"[demo] 4/4 served and monitored; the whole demo took {time.perf_counter() - start:.0f} s")

    print("\n[demo] artifacts")
    print(f"  model (Hugging Face folder):   {train_dir / 'model'}")
    print(f"  checkpoints (resume=latest):   {train_dir / 'checkpoints'}")
    print(f"  metrics log (JSON lines):      {train_dir / 'train_log.jsonl'}")
    print(f"  loss curve:                    {train_dir / 'loss_curve.png'}")
    print(f"  optimize report:               {optimize_dir / 'report.html'} (and report.md, results.json, plots)")
    print(f"  chosen variant (card, profile): {variant}")
    print(f"  served traffic / metrics:      {output_dir / 'traffic.jsonl'}, {output_dir / 'metrics.prom'}")
    print(f"  server log:                    {output_dir / 'serve.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
