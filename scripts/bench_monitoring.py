#!/usr/bin/env python
"""Monitoring benchmark: how many texts per second the drift features handle, side by side in one run.

Sections (each returns rows of the one table printed at the end and written as JSON):

1. lexical features on ONE core (``torch.set_num_threads(1)``; goal >= 20,000 texts/s): the per-text
   features alone, and ``TextMonitor.calculate`` on 1,000-text windows (features + token divergence + thresholds),
   with the stories260K tokenizer and with hashed words;
2. embedding features on TWO cores (goal >= 300 texts/s): MiniLM embeddings, and ``calculate`` with the
   embedding metric;
3. added latency per request of monitoring on a served model (goal <= 2 %): stories260K served twice in this
   process (``hf_optim.monitoring.server``), monitoring off and on (traffic log, queue, lexical + quality
   features against a reference profile, no embeddings), the same greedy requests sent one at a time to each in
   alternating blocks; rows are requests/s, the "on" row's goal is the "off" rate / 1.02.

Texts are WikiText sentences and TinyStories paragraphs from ``../shared/corpora`` (the standard library's
documentation when that is absent).

    python scripts/bench_monitoring.py [--json-out outputs/bench_monitoring.json] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from hf_optim.monitoring import ReferenceProfile, TextMonitor  # noqa: E402
from hf_optim.monitoring.embeddings import embed_texts, load_embedding_model  # noqa: E402
from hf_optim.monitoring.profile import load_tokenizer, per_text_features, vocabulary_ids  # noqa: E402

SHARED = REPO_ROOT.parent / "shared"
STORIES260K = SHARED / "models" / "stories260K"


def load_bench_texts() -> list[str]:
    wiki = SHARED / "corpora" / "wikitext2" / "wiki.test.raw.txt"
    stories = SHARED / "corpora" / "tinystories" / "niklas6_tinystories.txt"
    if wiki.is_file() and stories.is_file():
        lines = [l.strip() for l in wiki.read_text(encoding="utf-8").splitlines() if l.strip() and not l.startswith(" = ")]
        sentences = [s for l in lines for s in re.split(r"(?<= \.) ", l) if s.strip()]
        return sentences + [l.strip() for l in stories.read_text(encoding="utf-8").splitlines() if l.strip()]
    from hf_optim.training.data import builtin_corpus

    return [line for doc in builtin_corpus() for line in doc.splitlines() if len(line.strip()) > 20]


def texts_per_second(function: Callable[[], object], count: int, repeats: int) -> float:
    """Median texts/s over ``repeats`` timed calls (after one warm-up call)."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return count / statistics.median(times)


def row(section: str, name: str, value: float, goal: float | None, threads: int, note: str = "") -> dict:
    return {"section": section, "name": name, "texts_per_s": round(value, 1), "goal_texts_per_s": goal,
            "meets_goal": None if goal is None else value >= goal, "threads": threads, "note": note}


def lexical_section(texts: list[str], args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(1)
    section, goal, rows = "lexical (1 core)", 20_000.0, []
    tokenizers = [("words", None)] + ([("stories260K tokens", load_tokenizer(str(STORIES260K)))] if STORIES260K.is_dir() else [])
    window = texts[: args.window]
    for label, tokenizer in tokenizers:
        features = lambda: (per_text_features(window, tokenizer, vocabulary_ids(window, tokenizer)[:2]))  # noqa: E731
        rows.append(row(section, f"per-text features, {label}", texts_per_second(features, len(window), args.repeats), goal, 1))
        monitor = TextMonitor(ReferenceProfile.fit(texts[-2000:], tokenizer, embeddings=False))
        rows.append(row(section, f"TextMonitor.calculate, {label}",
                        texts_per_second(lambda: monitor.calculate(window), len(window), args.repeats), goal, 1,
                        f"windows of {len(window)}"))
    return rows


def embedding_section(texts: list[str], args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(2)
    section, goal = "embeddings (2 cores)", 300.0
    load_embedding_model()
    window = texts[: args.embedding_window]
    rows = [row(section, "MiniLM embed_texts", texts_per_second(lambda: embed_texts(window), len(window), args.repeats),
                goal, 2, f"max_length 128, batch 64, {sum(map(len, window)) / len(window):.0f} chars/text")]
    monitor = TextMonitor(ReferenceProfile.fit(texts[-400:], embeddings=True))
    rows.append(row(section, "TextMonitor.calculate with embeddings",
                    texts_per_second(lambda: monitor.calculate(window), len(window), args.repeats), goal, 2))
    return rows


def _timed_requests(url: str, prompts: list[str], max_new_tokens: int) -> list[float]:
    """Client-side seconds of each request, sent one at a time (after one warm-up request)."""
    import httpx

    latencies = []
    with httpx.Client(base_url=url, timeout=300) as client:
        client.post("/generate", json={"prompt": prompts[0], "max_new_tokens": max_new_tokens}).raise_for_status()
        for prompt in prompts:
            start = time.perf_counter()
            client.post("/generate", json={"prompt": prompt, "max_new_tokens": max_new_tokens}).raise_for_status()
            latencies.append(time.perf_counter() - start)
        # the monitored server's background work finishes inside its own block
        while (state := client.get("/monitoring").json()["collector"]) and state["queue_size"]:
            time.sleep(0.05)
    return latencies


def serving_section(texts: list[str], args: argparse.Namespace) -> list[dict]:
    import tempfile

    from hf_optim.monitoring.collector import TrafficSample
    from hf_optim.monitoring.server import BackgroundServer, ServedModel, create_app, request_quality

    section = "serving (1 core)"
    if not STORIES260K.is_dir():
        return [row(section, "added latency of monitoring", 0.0, None, 1, f"skipped: needs {STORIES260K}")]
    torch.set_num_threads(1)
    new_tokens, window = args.serving_new_tokens, args.serving_window
    prompts = [t[:200] for t in texts[: args.serving_requests]]
    reference = texts[-2000:]
    # the reference profile holds the served model's own quality numbers on reference prompts
    served = ServedModel.load(STORIES260K)
    samples = []
    for prompt in reference[:100]:
        ids = served.encode(prompt[:200])
        out = served.generate(ids, max_new_tokens=new_tokens)
        samples.append(TrafficSample(prompt[:200], out.text, len(ids), len(out.new_ids), out.finish_reason,
                                     new_tokens, token_ids=ids + out.new_ids))
    quality = request_quality(served.model, samples, {"output_entropy", "output_logprob", "truncated_output",
                                                      "empty_output", "repeated_output"}, pad_id=served.pad_id)
    workdir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    profile = ReferenceProfile.fit(reference, str(STORIES260K), embeddings=False, model=served.model,
                                   numeric_features=quality).save(workdir / "profile.npz")
    lexical_profile = ReferenceProfile.fit(reference, str(STORIES260K), embeddings=False).save(workdir / "lexical.npz")
    monitored = {"window_size": window, "window_seconds": None}
    settings = {  # quality = one teacher-forced pass of the served model over each window (prompt + output)
        "off": {"monitoring": False},
        "on, lexical": {"reference_profile": str(lexical_profile), "traffic_log": str(workdir / "lexical.jsonl"),
                        **monitored},
        "on, lexical + quality": {"reference_profile": str(profile), "traffic_log": str(workdir / "traffic.jsonl"),
                                  **monitored},
    }
    latencies: dict[str, list[float]] = {name: [] for name in settings}
    with contextlib.ExitStack() as running:
        urls = {name: running.enter_context(BackgroundServer(create_app(STORIES260K, **config), port=_free_port()))
                for name, config in settings.items()}
        blocks = [prompts[i:: args.serving_blocks] for i in range(args.serving_blocks)]
        for index, block in enumerate(blocks):  # rotate who goes first: no setting always follows another
            names = list(settings)
            for name in names[index % len(names):] + names[: index % len(names)]:
                latencies[name] += _timed_requests(urls[name], block, new_tokens)
        import httpx

        collectors = {name: httpx.get(f"{urls[name]}/monitoring").json()["collector"] for name in settings
                      if name != "off"}
    mean = {name: statistics.fmean(values) for name, values in latencies.items()}
    p50 = {name: statistics.median(values) for name, values in latencies.items()}
    common = f"{len(prompts)} requests each, {new_tokens} new tokens"
    rows = [row(section, "requests/s, monitoring off", 1 / mean["off"], None, 1, common)]
    for name, collector in collectors.items():
        added_mean = 100 * (mean[name] - mean["off"]) / mean["off"]
        added_p50 = 100 * (p50[name] - p50["off"]) / p50["off"]
        on_row = row(section, f"requests/s, monitoring {name}", 1 / mean[name], round(1 / mean["off"] / 1.02, 2), 1,
                     f"added latency {added_mean:+.1f} % mean, {added_p50:+.1f} % p50 (goal <= 2 %); "
                     f"{collector['windows']} windows of {window}, {collector['dropped']} dropped")
        on_row.update(added_latency_mean_pct=round(added_mean, 2), added_latency_p50_pct=round(added_p50, 2),
                      mean_latency_s=mean[name], p50_latency_s=p50[name])
        rows.append(on_row)
    return rows


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Each section takes (texts, args) and returns table rows.
SECTIONS: list[Callable[[list[str], argparse.Namespace], list[dict]]] = [lexical_section, embedding_section,
                                                                         serving_section]


def markdown(rows: list[dict]) -> str:
    lines = ["| section | measurement | texts/s | goal | meets goal | threads | note |", "|---|---|---:|---:|---|---:|---|"]
    for r in rows:
        goal = "" if r["goal_texts_per_s"] is None else f"{r['goal_texts_per_s']:,.0f}"
        meets = "" if r["meets_goal"] is None else ("yes" if r["meets_goal"] else "no")
        lines.append(f"| {r['section']} | {r['name']} | {r['texts_per_s']:,.0f} | {goal} | {meets} | {r['threads']} | {r['note']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json-out", default="outputs/bench_monitoring.json")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--window", type=int, default=1000, help="Texts per lexical window.")
    parser.add_argument("--embedding-window", type=int, default=500, help="Texts per embedding window.")
    parser.add_argument("--serving-requests", type=int, default=200, help="Requests per setting (serving section).")
    parser.add_argument("--serving-new-tokens", type=int, default=32, help="max_new_tokens of each request.")
    parser.add_argument("--serving-window", type=int, default=50, help="Monitoring window of the served model.")
    parser.add_argument("--serving-blocks", type=int, default=4, help="Alternating off/on blocks.")
    args = parser.parse_args()
    texts = load_bench_texts()
    rows = [r for section in SECTIONS for r in section(texts, args)]
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "rows": rows}, indent=2))
    print(markdown(rows))
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
