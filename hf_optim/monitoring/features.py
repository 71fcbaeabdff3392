"""Per-text lexical features, computed for a whole batch of texts at once.

Every function takes a list of texts and returns one number per text (or token counts for the batch), so a
monitor can compare windows of traffic with a reference. Character features work on the Unicode code points of
all texts joined into one NumPy array; token features use a fast (Rust) tokenizer's batch encoding; words for the
tokenizer-free vocabulary comparison are hashed with CRC-32 into a fixed number of buckets (stable across
processes, unlike Python's ``hash``).

Example:
    >>> char_lengths(["abc", ""]).tolist()
    [3.0, 0.0]
    >>> non_alpha_shares(["ab 1!"]).tolist()  # 2 of the 4 non-space characters are not letters
    [0.5]
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Sequence

import numpy as np

WORD_BUCKETS = 1 << 16
_WORD = re.compile(r"\w+")
_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@functools.lru_cache(maxsize=1)
def _plane0_tables() -> tuple[np.ndarray, np.ndarray]:
    """Is-letter and is-whitespace tables over the Basic Multilingual Plane (built once, 64 KiB each)."""
    chars = [chr(code) for code in range(0x10000)]
    return np.fromiter((c.isalpha() for c in chars), bool, 0x10000), np.fromiter((c.isspace() for c in chars), bool, 0x10000)


def _letters_and_spaces(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per code point: is it a letter, is it whitespace (tables for plane 0, ``str`` methods for the rare rest)."""
    alpha_table, space_table = _plane0_tables()
    plane0 = codes < 0x10000
    if plane0.all():
        return alpha_table[codes], space_table[codes]
    is_alpha, is_space = np.zeros(len(codes), bool), np.zeros(len(codes), bool)
    is_alpha[plane0], is_space[plane0] = alpha_table[codes[plane0]], space_table[codes[plane0]]
    rare, inverse = np.unique(codes[~plane0], return_inverse=True)
    is_alpha[~plane0] = np.array([chr(c).isalpha() for c in rare])[inverse]
    is_space[~plane0] = np.array([chr(c).isspace() for c in rare])[inverse]
    return is_alpha, is_space


def _code_points(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """All code points of ``texts`` in one array, and where each text starts in it."""
    lengths = np.fromiter((len(t) for t in texts), np.int64, len(texts))
    joined = "".join(texts).encode("utf-32-le", errors="surrogatepass")
    starts = np.zeros(len(texts), np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return np.frombuffer(joined, np.uint32), starts


def _sum_per_text(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sum of ``values`` over each text's slice (``np.add.reduceat`` misreads empty slices, so they are zeroed)."""
    if values.size == 0:
        return np.zeros(len(starts))
    sums = np.add.reduceat(values.astype(np.int64), np.minimum(starts, values.size - 1)).astype(np.float64)
    sums[lengths == 0] = 0.0
    return sums


def char_lengths(texts: Sequence[str]) -> np.ndarray:
    """Number of characters (code points) of each text."""
    return np.fromiter((len(t) for t in texts), np.float64, len(texts))


def non_alpha_shares(texts: Sequence[str]) -> np.ndarray:
    """Share of each text's non-whitespace characters that are not letters (digits, punctuation, symbols).

    Whitespace is left out so that spacing conventions do not count; a text without any such character scores 0.
    """
    if not texts:
        return np.zeros(0)
    codes, starts = _code_points(texts)
    is_alpha, is_space = _letters_and_spaces(codes)
    lengths = char_lengths(texts)
    visible = _sum_per_text(~is_space, starts, lengths)
    letters = _sum_per_text(is_alpha, starts, lengths)
    return np.divide(visible - letters, visible, out=np.zeros(len(texts)), where=visible > 0)


def word_bucket_ids(texts: Sequence[str], buckets: int = WORD_BUCKETS) -> tuple[np.ndarray, np.ndarray]:
    """Lower-cased words (``\\w+``) of all texts as CRC-32 bucket ids, and the number of words of each text."""
    per_text = [_WORD.findall(t.lower()) for t in texts]
    counts = np.fromiter((len(words) for words in per_text), np.int64, len(texts))
    ids = np.fromiter(
        (zlib.crc32(w.encode("utf-8", "surrogatepass")) % buckets for words in per_text for w in words),
        np.int64, int(counts.sum()),
    )
    return ids, counts


@functools.lru_cache(maxsize=8)
def _byte_fallback_table(tokenizer) -> np.ndarray:
    """Boolean table over the vocabulary: the unknown token and SentencePiece byte-fallback tokens (``<0x41>``)."""
    vocab = tokenizer.get_vocab()
    table = np.zeros(max(len(tokenizer), max(vocab.values(), default=-1) + 1), bool)
    for token, index in vocab.items():
        if _BYTE_FALLBACK.match(token):
            table[index] = True
    if tokenizer.unk_token_id is not None:
        table[tokenizer.unk_token_id] = True
    return table


def tokenize(tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of all texts concatenated (no special tokens, no truncation), and each text's token count."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: no per-call Python overhead, no length warnings
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        encoded = [encoding.ids for encoding in encode(list(texts), add_special_tokens=False)]
    else:
        encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    counts = np.fromiter((len(ids) for ids in encoded), np.int64, len(encoded))
    ids = np.fromiter((i for ids in encoded for i in ids), np.int64, int(counts.sum()))
    return ids, counts


def unknown_token_shares(tokenizer, ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Share of each text's tokens that are the unknown token or byte-fallback pieces (0 for an empty text).

    Byte-level BPE tokenizers (GPT-2 style) never need either, so their share is always 0.
    """
    table = _byte_fallback_table(tokenizer)
    flags = table[np.minimum(ids, table.size - 1)] & (ids < table.size)
    starts = np.zeros(len(counts), np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    unknown = _sum_per_text(flags, starts, counts)
    return np.divide(unknown, counts, out=np.zeros(len(counts)), where=counts > 0)


def vocabulary_fingerprint(tokenizer) -> str:
    """A short checksum of the tokenizer's vocabulary, to tell whether two tokenizers split text the same way."""
    items = sorted(tokenizer.get_vocab().items())
    return f"{len(items)}-{zlib.crc32(repr(items).encode('utf-8')):08x}"
