"""Training data: load text through ``datasets``, tokenize, pack into fixed-length blocks, hold out a split.

Example:
    >>> from hf_optim.training.data import builtin_corpus, train_tokenizer, build_lm_datasets
    >>> tokenizer = train_tokenizer(builtin_corpus(), vocab_size=512)
    >>> splits = build_lm_datasets(tokenizer, train_files=["notes.txt"], block_size=128)  # doctest: +SKIP
    >>> splits["train"][0]["input_ids"][:5]  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hf_optim.core.errors import ConfigError

_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}
ENDOFTEXT = "<|endoftext|>"
PAD = "<pad>"


def builtin_corpus() -> list[str]:
    """Real English prose that ships with every CPython: the documentation topics of ``pydoc_data``.

    About 460k characters in 79 documents — enough to train a few-million-parameter model offline.
    """
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """Train a byte-level BPE tokenizer locally (no Hub) and wrap it as a ``PreTrainedTokenizerFast``.

    Byte-level BPE never produces an unknown token; ``<|endoftext|>`` serves as BOS/EOS and ``<pad>`` pads.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, pad_token=PAD, model_max_length=1 << 20
    )


def _check_files(files: Sequence[str]) -> str:
    """Validate local data files up front and return the ``datasets`` builder that reads them."""
    builders = set()
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"Training data file {name!r} does not exist or is not a file.")
        try:
            with path.open("rb") as handle:
                handle.read(1)
        except OSError as exc:
            raise ConfigError(f"Training data file {name!r} cannot be read: {exc}.") from exc
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ConfigError(
                f"Training data file {name!r} has an unsupported extension {path.suffix!r}; "
                f"use one of {sorted(_BUILDERS)}."
            )
        builders.add(builder)
    if len(builders) > 1:
        raise ConfigError(f"Training data files mix formats ({sorted(builders)}); pass files of one kind.")
    return builders.pop()


def load_text_dataset(
    train_files: Sequence[str] = (),
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    text_column: str = "text",
    validation_split: float = 0.05,
    seed: int = 42,
):
    """Load raw documents as a ``DatasetDict`` with ``train`` and (when asked) ``validation`` splits.

    Local ``.txt`` files give one document per blank-line separated paragraph; JSON(L)/CSV files one per row.
    A Hub dataset keeps its own validation split when it has one.
    """
    import datasets

    if train_files:
        builder = _check_files(train_files)
        kwargs: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
        try:
            raw = datasets.load_dataset(builder, data_files={"train": list(train_files)}, **kwargs)
        except Exception as exc:  # datasets wraps parse errors in several exception types
            raise ConfigError(f"Could not parse training data {list(train_files)}: {exc}") from exc
    elif dataset_name is not None:
        raw = datasets.load_dataset(dataset_name, dataset_config)
    else:
        raise ConfigError("No training data: pass train_files or dataset_name.")
    if text_column not in raw["train"].column_names:
        raise ConfigError(
            f"text_column={text_column!r} is not a column of the data; columns are {raw['train'].column_names}."
        )
    raw = datasets.DatasetDict({k: v.select_columns([text_column]) for k, v in raw.items()})
    raw = raw.filter(lambda row: bool(row[text_column] and row[text_column].strip()))
    if len(raw["train"]) == 0:
        raise ConfigError(f"Training data {list(train_files) or dataset_name!r} holds no non-empty text.")
    if "validation" not in raw and validation_split > 0:
        if len(raw["train"]) < 2:
            raise ConfigError("Need at least 2 documents to hold out a validation split; set validation_split=0.")
        split = raw["train"].train_test_split(test_size=validation_split, seed=seed)
        raw = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    return raw


def pack_token_ids(
    documents: Iterable[list[int]], block_size: int, eos_token_id: int | None, bos_token_id: int | None = None
) -> list[list[int]]:
    """Concatenate documents and cut into full blocks (the tail is dropped).

    Each document boundary is marked once: by the BOS the tokenizer already put in front (Llama/SentencePiece
    style), otherwise by an EOS appended after it (GPT-2 style).
    """
    def marked(ids: list[int]) -> list[int]:
        starts_with_bos = bos_token_id is not None and ids[:1] == [bos_token_id]
        return ids if starts_with_bos or eos_token_id is None else ids + [eos_token_id]

    stream = list(itertools.chain.from_iterable(marked(ids) for ids in documents))
    usable = len(stream) // block_size * block_size
    return [stream[i : i + block_size] for i in range(0, usable, block_size)]


def build_lm_datasets(
    tokenizer,
    train_files: Sequence[str] = (),
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    text_column: str = "text",
    validation_split: float = 0.05,
    block_size: int = 256,
    seed: int = 42,
):
    """Tokenized, packed ``DatasetDict``: every row is ``{"input_ids": [block_size ints]}``, no padding."""
    raw = load_text_dataset(train_files, dataset_name, dataset_config, text_column, validation_split, seed)

    def tokenize_and_pack(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch[text_column])["input_ids"]
        return {"input_ids": pack_token_ids(ids, block_size, tokenizer.eos_token_id, tokenizer.bos_token_id)}

    packed = raw.map(tokenize_and_pack, batched=True, batch_size=1000, remove_columns=[text_column])
    if len(packed["train"]) == 0:
        raise ConfigError(
            f"The training text is shorter than one block of block_size={block_size} tokens; lower block_size."
        )
    return packed.with_format("torch")
