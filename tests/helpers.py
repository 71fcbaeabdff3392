"""Offline test material: tiny models of each supported family built from configs, and a local tokenizer."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_OPTIM_SHARED", REPO_ROOT.parent / "shared"))
STORIES260K = SHARED / "models" / "stories260K"
CORPORA = SHARED / "corpora"
SHARED_MISSING_REASON = f"needs the shared test material at {SHARED} (../shared beside the repo); it is absent here"

FAMILIES = ("llama", "mistral", "qwen2", "gpt2")


def tiny_config(family: str = "llama", vocab_size: int = 512, layers: int = 2, hidden: int = 64):
    """A randomly-initialisable config of ``family`` small enough for a unit test (~100k parameters)."""
    from transformers import AutoConfig

    if family == "gpt2":
        return AutoConfig.for_model(
            "gpt2", vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )
    return AutoConfig.for_model(
        family, vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )


def tiny_model(family: str = "llama", seed: int = 0, **config_kwargs):
    """A tiny causal LM of ``family`` with weights fixed by ``seed``, in fp32 and eval-free (train mode off)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **config_kwargs), attn_implementation="eager")
    return model.float()


@functools.lru_cache(maxsize=1)
def local_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained here on the standard library's documentation (no Hub)."""
    from hf_optim.training.data import builtin_corpus, train_tokenizer

    return train_tokenizer(builtin_corpus(), vocab_size=vocab_size)


def unevenly_padded_sequences(count: int, vocab_size: int = 512, max_len: int = 24, seed: int = 0):
    """``count`` token sequences of very different lengths (4 … max_len), as a list of 1-D tensors."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, max_len + 1, (count,), generator=generator)
    return [torch.randint(2, vocab_size, (int(n),), generator=generator) for n in lengths]


def right_padded_batch(sequences, pad_id: int = 1) -> dict:
    """Stack sequences into ``input_ids``/``attention_mask``, right-padded to the longest one."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = seq
        attention_mask[row, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
