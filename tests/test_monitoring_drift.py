"""Drift statistics on real text (../shared/corpora): no alarms on held-back text of the reference's source at
n = 100, 1,000 and 10,000, alarms on code, German and news at n = 100.

Windows are contiguous runs of held-back documents at seeded random offsets (live traffic arrives in runs on one
topic, which is harder than shuffled samples). Repeats overlap when the corpus is small (n = 10,000 windows
share most of their documents), so the rates come from fewer independent windows than repeats.
"""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest

from hf_optim.monitoring import ReferenceProfile, TextMonitor

MAX_FALSE_ALARM_RATE = 0.05
MIN_POWER = 0.95


def _lines(path, encoding="utf-8") -> list[str]:
    return [line.strip() for line in path.read_text(encoding=encoding).splitlines() if line.strip()]


def tinystories(shared) -> list[str]:
    return _lines(shared / "corpora" / "tinystories" / "niklas6_tinystories.txt")


def wikitext_sentences(shared) -> list[str]:
    paragraphs = [p for p in _lines(shared / "corpora" / "wikitext2" / "wiki.test.raw.txt") if not p.startswith("= ")]
    return [s.strip() for p in paragraphs for s in re.split(r"(?<= \.) ", p) if s.strip()]


def wikitext_chunks(shared, words: int = 8) -> list[str]:
    """WikiText in pieces of ``words`` words: the only corpus here with enough documents for n = 10,000."""
    tokens = " ".join(wikitext_sentences(shared)).split()
    return [" ".join(tokens[i : i + words]) for i in range(0, len(tokens) - words + 1, words)]


def shifted_domains(shared) -> dict[str, list[str]]:
    corpora = shared / "corpora"
    code = [l for l in _lines(corpora / "code_python" / "pytorch_examples_python.txt") if not l.startswith("# ====")]
    with open(corpora / "news_agnews" / "test.csv", newline="", encoding="utf-8") as stream:
        news = [f"{row['title']}. {row['description']}" for row in csv.DictReader(stream)]
    return {"code": code, "german": _lines(corpora / "german_wiki" / "wiki.valid.tokens.de.txt"), "news": news}


def alert_rate(monitor: TextMonitor, pool: list[str], size: int, repeats: int, seed: int) -> float:
    starts = np.random.default_rng(seed).integers(0, len(pool) - size + 1, repeats)
    return float(np.mean([monitor.calculate(pool[s : s + size]).drift for s in starts]))


@pytest.fixture(scope="module")
def stories_tokenizer():
    from tests.helpers import STORIES260K

    if not STORIES260K.is_dir():
        pytest.skip("needs ../shared/models/stories260K")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(STORIES260K)


@pytest.mark.parametrize("with_tokenizer", [True, False], ids=["stories260K-tokens", "words"])
def test_tinystories_reference_n100(shared_dir, stories_tokenizer, with_tokenizer):
    documents = tinystories(shared_dir)
    half = len(documents) // 2
    monitor = TextMonitor(ReferenceProfile.fit(
        documents[:half], stories_tokenizer if with_tokenizer else None, embeddings=False))
    assert alert_rate(monitor, documents[half:], 100, repeats=100, seed=0) <= MAX_FALSE_ALARM_RATE
    for name, pool in shifted_domains(shared_dir).items():
        assert alert_rate(monitor, pool, 100, repeats=30, seed=1) >= MIN_POWER, name


def test_wikitext_reference_n100_and_n1000(shared_dir, stories_tokenizer):
    sentences = wikitext_sentences(shared_dir)
    half = len(sentences) // 2
    monitor = TextMonitor(ReferenceProfile.fit(sentences[:half], stories_tokenizer, embeddings=False))
    assert alert_rate(monitor, sentences[half:], 100, repeats=100, seed=0) <= MAX_FALSE_ALARM_RATE
    assert alert_rate(monitor, sentences[half:], 1000, repeats=20, seed=0) <= MAX_FALSE_ALARM_RATE
    for name, pool in shifted_domains(shared_dir).items():
        assert alert_rate(monitor, pool, 100, repeats=30, seed=1) >= MIN_POWER, name


def test_wikitext_reference_n10000(shared_dir, stories_tokenizer):
    chunks = wikitext_chunks(shared_dir)
    split = int(len(chunks) * 0.4)
    assert len(chunks) - split > 10_000
    monitor = TextMonitor(ReferenceProfile.fit(chunks[:split], stories_tokenizer, embeddings=False))
    assert alert_rate(monitor, chunks[split:], 10_000, repeats=5, seed=0) <= MAX_FALSE_ALARM_RATE


@pytest.mark.slow
def test_embedding_drift_on_real_text(shared_dir):
    """The MiniLM embedding metric on its own: quiet on held-back stories, alerting on every shifted domain."""
    documents = tinystories(shared_dir)
    reference, held_back = documents[:300], documents[700:900]
    monitor = TextMonitor(ReferenceProfile.fit(reference, embeddings=True))
    same = [monitor.calculate(held_back[s : s + 50]).metric("embedding_mmd") for s in range(0, 200, 50)]
    assert not any(m.alert for m in same)
    for name, pool in shifted_domains(shared_dir).items():
        metric = monitor.calculate(pool[1000:1050]).metric("embedding_mmd")
        assert metric.alert, name
