"""scripts/bench_train.py: a real two-row run (recipe + Trainer baseline), the GPU plan as a dry run, bad input."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shlex
import subprocess
import sys

import pytest

from hf_optim.core.errors import ConfigError
from hf_optim.training.config import TrainConfig
from hf_optim.training.data import builtin_corpus
from tests.helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "bench_train.py"


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO_ROOT)


@functools.lru_cache(maxsize=1)
def load_script():
    """scripts/bench_train.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_rows_give_json_and_table(tmp_path):
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n\n".join(builtin_corpus()[:12]))
    out = tmp_path / "bench"
    proc = bench("--device", "cpu", "--shape", "tiny", "--rows", "cpu_single:off,trainer", "--steps", "4",
                 "--log-every", "2", "--threads", "1", "--corpus", str(corpus), "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]

    report = json.loads((out / "bench_train.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["cpu_single:off", "trainer"]
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["tokens_per_s"] > 0 and row["tflops_per_device"] > 0 and 0 < row["mfu"] < 1
        assert row["peak_memory"]["cpu_peak_rss_gib"] > 0.05
        (run,) = row["runs"]
        assert run["measured_windows"] == 1 and run["measured_steps"] == 2  # window 1 of 2 is warm-up
        assert run["env"]["OMP_NUM_THREADS"] == "1" and row["processes"] == 1
        assert row["tokens_per_s"] == run["tokens_per_s"] and row["last_loss"] > 0
    assert rows["cpu_single:off"]["strategy"] == "single" and rows["trainer"]["strategy"] == "hf-trainer"
    ratio = rows["cpu_single:off"]["tokens_per_s"] / rows["trainer"]["tokens_per_s"]
    assert rows["cpu_single:off"]["relative_to_trainer"] == pytest.approx(ratio)
    assert rows["trainer"]["relative_to_trainer"] == 1.0
    assert report["model"]["parameters"] == 43_168 and report["machine"]["cpu"]["usable_cores"] >= 1
    assert (out / "rows" / "cpu_single-off" / "run-1" / "train_log.jsonl").is_file()
    assert not (out / "rows" / "cpu_single-off" / "run-1" / "checkpoints").exists()  # artifacts removed by default

    table = (out / "bench_train.md").read_text()
    assert table in proc.stdout
    assert "| cpu_single:off | single | 1 × 1 | off | no |" in table and "| trainer | hf-trainer |" in table


def test_gpu_plan_dry_run_needs_no_gpu(tmp_path, capsys):
    out = tmp_path / "plan"
    assert load_script().main(["--device", "cuda", "--dry-run", "--output-dir", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "1,100,048,384 parameters" in lines[0] and "seq 2048" in lines[0]  # TinyLlama-1.1B
    rows = {line.split("]")[0].lstrip("["): line for line in lines if line.startswith("[")}
    assert list(rows) == ["trainer", "single_gpu:off", "single_gpu:full", "single_gpu:selective", "fp8:off"]
    for mode in ("off", "full", "selective"):
        line = rows[f"single_gpu:{mode}"]
        assert "accelerate_configs/single_gpu.yaml --num_processes 1" in line
        words = shlex.split(line)
        cfg = TrainConfig.load(None, words[words.index(str(REPO_ROOT / "recipes" / "train_clm.py")) + 1:])
        assert cfg.gradient_checkpointing == mode and cfg.mixed_precision == "bf16"
        assert cfg.block_size == 2048 and cfg.micro_batch_size == 4 and cfg.validation_split == 0
        assert cfg.model_config == {
            "model_type": "llama", "tie_word_embeddings": False, "hidden_size": 2048, "intermediate_size": 5632,
            "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        }
    assert '\\"mixed_precision\\": \\"bf16\\"' in rows["trainer"] or '"mixed_precision": "bf16"' in rows["trainer"]
    assert "CUDA_VISIBLE_DEVICES=0" in rows["trainer"]
    fp8 = rows["fp8:off"]
    assert ("mixed_precision=fp8" in fp8 and "fp8.yaml --num_processes 1" in fp8) or "skipped: torchao" in fp8
    assert not out.exists()  # a dry run writes nothing


def test_bad_input_gets_one_clear_line(tmp_path):
    proc = bench("--device", "cpu", "--rows", "cpu_single:fast", "--dry-run", "--output-dir", str(tmp_path), timeout=120)
    assert proc.returncode == 2 and "'fast'" in proc.stderr and "selective" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr

    main = load_script().main
    with pytest.raises(ConfigError, match="'zero9' is neither 'trainer' nor a config.*zero3"):
        main(["--device", "cpu", "--rows", "zero9", "--dry-run"])
    with pytest.raises(ConfigError, match="--steps >= 4"):
        main(["--device", "cpu", "--steps", "3", "--log-every", "2", "--dry-run"])
    with pytest.raises(ConfigError, match="lists 'trainer' twice"):
        main(["--device", "cpu", "--rows", "trainer,trainer", "--dry-run"])


def test_rates_skip_the_warmup_window_and_weight_by_time(tmp_path):
    bench_train = load_script()
    log = tmp_path / "train_log.jsonl"
    windows = [  # (tokens/s, seconds, peak RSS): the slow first window must not count
        (10.0, 50.0, 0.4), (100.0, 1.0, 0.5), (300.0, 3.0, 0.7),
    ]
    log.write_text("\n".join(
        json.dumps({"step": 2 * (i + 1), "loss": 5.0 - i, "tokens_per_s": t, "elapsed_s": s, "tflops_per_device": t / 1e3,
                    "mfu": t / 1e4, "cpu_peak_rss_gib": m, "cpu_rss_gib": 0.1})
        for i, (t, s, m) in enumerate(windows)
    ) + "\n")
    summary = bench_train.summarize_log(log)
    assert summary["tokens_per_s"] == pytest.approx((100 * 1 + 300 * 3) / 4)  # 1000 tokens in 4 s
    assert summary["mfu"] == pytest.approx(0.025) and summary["tflops_per_device"] == pytest.approx(0.25)
    assert summary["measured_windows"] == 2 and summary["measured_steps"] == 4 and summary["measured_s"] == 4.0
    assert summary["peak_memory"] == {"cpu_peak_rss_gib": 0.7} and summary["last_loss"] == 3.0

    log.write_text(log.read_text().splitlines()[0] + "\n")
    with pytest.raises(RuntimeError, match="1 logging window"):
        bench_train.summarize_log(log)


def test_repeats_combine_to_the_median_and_a_failure_wins():
    combine_runs = load_script().combine_runs

    def run(tokens_per_s, rss, windows):
        return {"status": "ok", "strategy": "ddp", "tokens_per_s": tokens_per_s, "tflops_per_device": tokens_per_s / 1e3,
                "mfu": None, "peak_memory": {"cpu_peak_rss_gib": rss}, "window_tokens_per_s": windows, "last_loss": 4.0}

    combined = combine_runs([run(100.0, 0.5, [90, 110]), run(300.0, 0.7, [280, 320]), run(120.0, 0.6, [80, 130])])
    assert combined["tokens_per_s"] == 120.0 and combined["tflops_per_device"] == 0.12 and combined["mfu"] is None
    assert combined["peak_memory"] == {"cpu_peak_rss_gib": 0.7} and combined["window_tokens_per_s_range"] == [80, 320]
    assert combine_runs([run(100.0, 0.5, [1]), run(200.0, 0.5, [2])])["tokens_per_s"] == 150.0

    failed = {"status": "error", "error": "exit code 1: RuntimeError: boom"}
    assert combine_runs([run(100.0, 0.5, [1]), failed]) == {"status": "error", "error": failed["error"], "strategy": None}


def test_error_extraction_finds_the_worker_exception():
    bench_train = load_script()
    torchrun_output = """
[rank1]: Traceback (most recent call last):
[rank1]:   File "recipes/train_clm.py", line 10, in <module>
[rank1]: RuntimeError: Tensors must be CPU and dense
Traceback (most recent call last):
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
subprocess.CalledProcessError: Command '['python', 'train_clm.py']' returned non-zero exit status 1.
"""
    assert bench_train.extract_error(torchrun_output) == "RuntimeError: Tensors must be CPU and dense"
    usage = "stuff\ntrain_clm: error: max_steps=0 must be >= 1.\n"
    assert bench_train.extract_error(usage) == "max_steps=0 must be >= 1."
