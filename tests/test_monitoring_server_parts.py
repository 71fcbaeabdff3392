"""The serving side's building blocks without HTTP: the bounded monitoring queue, time windows, shadow math."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from hf_optim.core.errors import ConfigError
from hf_optim.monitoring.collector import TrafficCollector, TrafficSample
from hf_optim.monitoring.metrics import ServerMetrics
from hf_optim.monitoring.shadow import ShadowComparator, greedy_agreement, next_token_kl
from tests.helpers import tiny_model


def _sample(index: int) -> TrafficSample:
    return TrafficSample(prompt=f"prompt {index}", output=f"output {index}", prompt_tokens=2, output_tokens=2)


def test_full_queue_drops_and_counts_without_blocking_and_the_log_keeps_everything(tmp_path):
    release, windows = threading.Event(), []

    def slow_evaluate(window):
        release.wait(30)  # the worker is stuck on the first window
        windows.append([s.prompt for s in window])
        return window

    metrics = ServerMetrics()
    collector = TrafficCollector(slow_evaluate, window_size=1, queue_size=2, traffic_log=tmp_path / "t.jsonl",
                                 metrics=metrics).start()
    assert collector.submit(_sample(0))
    deadline = time.monotonic() + 10
    while collector.stats()["processed"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.perf_counter()
    accepted = [collector.submit(_sample(i)) for i in range(1, 6)]
    assert time.perf_counter() - started < 0.5  # submit never waits for the worker
    assert accepted == [True, True, False, False, False]
    stats = collector.stats()
    assert stats["dropped"] == 3 and stats["submitted"] == 3 and stats["queue_size"] == 2
    assert metrics.samples_dropped._value.get() == 3
    release.set()
    assert collector.drain(10)
    collector.close()
    assert windows == [["prompt 0"], ["prompt 1"], ["prompt 2"]]
    logged = [json.loads(line)["text"] for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert logged == [f"prompt {i}" for i in range(6)]  # dropped from monitoring, not from the log


def test_windows_close_by_count_and_by_time():
    windows = []
    by_count = TrafficCollector(windows.append, window_size=3, window_seconds=None).start()
    for i in range(7):
        by_count.submit(_sample(i))
    assert by_count.drain(10)
    by_count.close()
    assert [len(w) for w in windows] == [3, 3]  # the 7th waits for its window to fill

    windows.clear()
    by_time = TrafficCollector(windows.append, window_size=100, window_seconds=0.2, min_window_size=2).start()
    by_time.submit(_sample(0))
    time.sleep(0.5)
    assert windows == []  # one sample is below min_window_size: the window stays open
    by_time.submit(_sample(1))
    deadline = time.monotonic() + 10
    while not windows and time.monotonic() < deadline:
        time.sleep(0.02)
    by_time.close()
    assert [len(w) for w in windows] == [2]


def test_a_failing_handler_is_counted_and_monitoring_goes_on():
    results = []

    def evaluate(window):
        if window[0].prompt == "prompt 0":
            raise RuntimeError("bad window")
        return len(window)

    collector = TrafficCollector(evaluate, window_size=1, on_window=[results.append]).start()
    for i in range(3):
        collector.submit(_sample(i))
    assert collector.drain(10)
    collector.close()
    assert results == [1, 1] and collector.stats()["errors"] == 1 and collector.stats()["windows"] == 2


def test_collector_settings_are_checked():
    with pytest.raises(ConfigError, match="window_size"):
        TrafficCollector(window_size=0)
    with pytest.raises(ConfigError, match="min_window_size"):
        TrafficCollector(window_size=5, min_window_size=6)


def test_next_token_kl_and_greedy_agreement_match_their_definitions():
    base, variant = torch.randn(4, 7, generator=torch.Generator().manual_seed(0)), torch.zeros(4, 7)
    p = torch.softmax(base.double(), -1)
    expected = (p * (p.log() - torch.log(torch.full_like(p, 1 / 7)))).sum(-1)
    assert torch.allclose(next_token_kl(base, variant).double(), expected, atol=1e-6)
    assert torch.all(next_token_kl(base, base) == 0)
    variant[:2] = base[:2]
    assert greedy_agreement(base, variant + 1e-9 * base) == pytest.approx(1.0)
    assert greedy_agreement(base[:2], variant[:2]) == 1.0
    with pytest.raises(ConfigError, match="vocabulary"):
        next_token_kl(base, torch.zeros(4, 8))


def test_shadow_comparator_sees_a_changed_model_and_not_an_identical_one():
    base = tiny_model("llama", seed=0).eval()
    tokens = torch.randint(2, 512, (12,), generator=torch.Generator().manual_seed(0))
    shadow = ShadowComparator(base, sample_rate=1.0)
    same = shadow.compare(tiny_model("llama", seed=0).eval(), tokens, prompt_length=8)
    assert same.mean_kl < 1e-6 and same.greedy_agreement == 1.0 and same.positions == 4
    changed = tiny_model("llama", seed=0).eval()
    with torch.no_grad():
        for parameter in changed.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    different = shadow.compare(changed, tokens, prompt_length=8)
    assert different.mean_kl > 100 * max(same.mean_kl, 1e-9) and different.max_kl >= different.mean_kl
    assert shadow.summary()["compared"] == 2
    with pytest.raises(ConfigError, match="vocab_size"):
        shadow.check_compatible(tiny_model("llama", vocab_size=256))
    with pytest.raises(ConfigError, match="sample_rate"):
        ShadowComparator(base, sample_rate=0.0)
