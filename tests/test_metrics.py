from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from hf_optim.core.errors import ConfigError
from hf_optim.training.metrics import (
    PEAK_TFLOPS_ENV,
    JsonlLogger,
    ThroughputMeter,
    flops_per_token,
    lookup_peak_tflops,
    memory_stats,
    peak_flops,
    plot_loss_curve,
)
from tests.helpers import tiny_config


def test_flops_per_token_llama_matches_hand_count():
    # tiny llama: vocab 512, hidden 64, ffn 128, 2 layers, 4 heads of 16, 2 kv heads, untied lm_head
    attention = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64  # q, k, v (2 kv heads x 16), o
    mlp = 3 * 64 * 128  # gate, up, down
    layer = attention + mlp + 2 * 64  # + two RMSNorms
    non_embedding = 2 * layer + 64 + 512 * 64  # + final norm + lm_head; the embedding table is excluded
    for seq_len in (1, 128):
        expected = 6 * non_embedding + 12 * 2 * 4 * 16 * seq_len
        assert flops_per_token(tiny_config("llama"), seq_len) == expected


def test_flops_per_token_gpt2_counts_tied_head_and_skips_position_table():
    layer = 2 * 128 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64)  # LNs, attn, MLP
    non_embedding = 2 * layer + 128 + 512 * 64  # + ln_f + the tied lm_head matmul; wte and wpe excluded
    config = tiny_config("gpt2")
    assert config.tie_word_embeddings
    assert flops_per_token(config, 64) == 6 * non_embedding + 12 * 2 * 4 * 16 * 64
    untied = tiny_config("gpt2")
    untied.tie_word_embeddings = False
    assert flops_per_token(untied, 64) == flops_per_token(config, 64)


def test_flops_per_token_accepts_a_config_dict_and_rejects_bad_input():
    config = tiny_config("qwen2")
    assert flops_per_token(config.to_dict(), 32) == flops_per_token(config, 32)
    with pytest.raises(ConfigError, match="model_type"):
        flops_per_token({"hidden_size": 64}, 32)
    with pytest.raises(ConfigError, match="seq_len=0"):
        flops_per_token(config, 0)


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
        ("NVIDIA H100 80GB HBM3", torch.float8_e4m3fn, 1979.0),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),
        ("NVIDIA H200", "fp32", 67.0),
        ("NVIDIA A100-SXM4-80GB", "tf32", 156.0),
        ("NVIDIA A100 80GB PCIe", torch.float16, 312.0),
        ("NVIDIA A100-SXM4-40GB", "fp8", None),
        ("NVIDIA GeForce RTX 4090", "bf16", None),
    ],
)
def test_lookup_peak_tflops(name, dtype, expected):
    assert lookup_peak_tflops(name, dtype) == expected


def test_peak_flops_cpu_is_measured_once_and_env_overrides(monkeypatch):
    monkeypatch.delenv(PEAK_TFLOPS_ENV, raising=False)
    first = peak_flops("cpu", torch.float32)
    assert first > 1e8
    with monkeypatch.context() as patched:  # cached: a second call measures nothing
        patched.setattr(torch, "matmul", lambda *args: pytest.fail("peak_flops measured the CPU twice"))
        assert peak_flops("cpu", "fp32") == first
    assert peak_flops("cpu", "fp8") is None
    monkeypatch.setenv(PEAK_TFLOPS_ENV, "2.5")
    assert peak_flops("cpu", "bf16") == 2.5e12
    monkeypatch.setenv(PEAK_TFLOPS_ENV, "fast")
    with pytest.raises(ConfigError, match=PEAK_TFLOPS_ENV):
        peak_flops("cpu", "bf16")
    with pytest.raises(ConfigError, match="int4"):
        peak_flops("cpu", "int4")


def test_throughput_meter_arithmetic(monkeypatch):
    monkeypatch.setenv(PEAK_TFLOPS_ENV, "0.001")  # 1 GFLOP/s per device
    meter = ThroughputMeter(flops_per_token=1e6, device="cpu", dtype="bf16", world_size=2)
    meter.update(300)
    meter.update(700)
    time.sleep(0.05)
    out = meter.read()
    assert out["elapsed_s"] >= 0.05
    assert out["tokens_per_s"] == pytest.approx(1000 / out["elapsed_s"])
    assert out["tflops_per_device"] == pytest.approx(out["tokens_per_s"] * 1e6 / 2 / 1e12)
    assert out["mfu"] == pytest.approx(out["tflops_per_device"] / 0.001)
    assert meter.read()["tokens_per_s"] == 0.0  # each read starts a new interval
    assert ThroughputMeter(1e6, device="cpu", dtype="fp8").read()["mfu"] is None
    with pytest.raises(ConfigError):
        ThroughputMeter(0.0, device="cpu")


def test_throughput_meter_mfu_of_matmuls_is_near_measured_peak(monkeypatch):
    monkeypatch.delenv(PEAK_TFLOPS_ENV, raising=False)
    n = 1024
    meter = ThroughputMeter(flops_per_token=2 * n**3, device="cpu", dtype="fp32")  # one "token" = one matmul
    a, b = torch.randn(n, n), torch.randn(n, n)
    meter.read()
    for _ in range(5):
        torch.matmul(a, b)
        meter.update(1)
    mfu = meter.read()["mfu"]
    assert 0.05 < mfu < 1.5  # same work as the peak measurement; other processes on the box add noise


def test_memory_stats_cpu_tracks_rss():
    before = memory_stats("cpu")
    block = torch.ones(64 * 1024**2)  # 256 MiB, written so the pages are resident
    after = memory_stats("cpu")
    assert after["cpu_rss_gib"] - before["cpu_rss_gib"] > 0.2
    assert after["cpu_peak_rss_gib"] >= after["cpu_rss_gib"] - 0.01
    assert "gpu_peak_allocated_gib" not in after
    del block


def test_jsonl_logger_converts_tensors_and_creates_dirs(tmp_path):
    path = tmp_path / "run" / "nested" / "metrics.jsonl"
    log = JsonlLogger(path)
    log.log({"step": 1, "loss": torch.tensor(2.5), "lr": np.float32(0.5), "grads": torch.tensor([1.0, 2.0])})
    log.log({"step": 2, "eval_loss": np.array(1.25), "note": "ok"})
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 2.5, "lr": 0.5, "grads": [1.0, 2.0]},
        {"step": 2, "eval_loss": 1.25, "note": "ok"},
    ]
    off = JsonlLogger(tmp_path / "other" / "metrics.jsonl", enabled=False)
    off.log({"step": 1, "loss": 1.0})
    assert not (tmp_path / "other").exists()


def test_plot_loss_curve_writes_a_png(tmp_path):
    log = JsonlLogger(tmp_path / "metrics.jsonl")
    for step in range(1, 41):
        log.log({"step": step, "loss": 50.0 / step})  # spans 40x: log-scaled axis
        if step % 10 == 0:
            log.log({"step": step, "eval_loss": 60.0 / step})
    png = plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "plots" / "loss.png", title="tiny")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    assert [p.name for p in png.parent.iterdir()] == ["loss.png"]  # the temporary file was renamed away


def test_plot_loss_curve_rejects_missing_or_empty_logs(tmp_path):
    with pytest.raises(ConfigError, match="No metrics log"):
        plot_loss_curve(tmp_path / "absent.jsonl", tmp_path / "loss.png")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match="no records"):
        plot_loss_curve(empty, tmp_path / "loss.png")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss"\n')
    with pytest.raises(ConfigError, match="broken.jsonl:2"):
        plot_loss_curve(broken, tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()


@pytest.mark.gpu
def test_gpu_peak_mfu_and_memory():
    device = torch.device("cuda", 0)
    peak = peak_flops(device, torch.bfloat16)
    if peak is None:
        pytest.skip(f"{torch.cuda.get_device_name(device)} is not in the peak table")
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    torch.matmul(a, b)
    meter = ThroughputMeter(flops_per_token=2 * n**3, device=device, dtype=torch.bfloat16)
    for _ in range(20):
        torch.matmul(a, b)
        meter.update(1)
    mfu = meter.read()["mfu"]
    assert 0.2 < mfu <= 1.0
    stats = memory_stats(device)
    assert stats["gpu_peak_allocated_gib"] >= 3 * n * n * 2 / 1024**3 * 0.99
    assert stats["gpu_peak_reserved_gib"] >= stats["gpu_peak_allocated_gib"]


def test_jsonl_logger_rewind_keeps_only_steps_up_to_the_resume_point(tmp_path):
    log = JsonlLogger(tmp_path / "log.jsonl")
    for step in (1, 2, 3):
        log.log({"step": step, "loss": 1.0 / step})
    log.rewind(2)
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]
    log.rewind(0)
    assert (tmp_path / "log.jsonl").read_text() == ""
