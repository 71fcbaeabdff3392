"""Data loading, tokenization and packing, from text and JSON lines, with clear errors."""

from __future__ import annotations

import json

import pytest

from hf_optim.core.errors import ConfigError
from hf_optim.training.data import build_lm_datasets, builtin_corpus, pack_token_ids
from tests.helpers import CORPORA


def test_pack_concatenates_with_eos_and_drops_the_tail():
    assert pack_token_ids([[1, 2, 3], [4, 5]], block_size=3, eos_token_id=0) == [[1, 2, 3], [0, 4, 5]]
    assert pack_token_ids([[1, 2]], block_size=4, eos_token_id=None) == []


def test_text_file_packs_into_full_blocks_with_validation_split(tokenizer, tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(builtin_corpus()[:10]))
    splits = build_lm_datasets(tokenizer, [str(path)], block_size=64, validation_split=0.2, seed=0)
    assert set(splits) == {"train", "validation"}
    assert len(splits["train"]) > 10 and len(splits["validation"]) > 0
    assert splits["train"][0]["input_ids"].shape == (64,)
    # every token of the train blocks comes from the text (plus EOS separators): decode round trip
    text = tokenizer.decode(splits["train"][0]["input_ids"])
    assert len(text) > 100


def test_jsonl_file_with_a_custom_text_column(tokenizer, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"body": doc, "id": i}) for i, doc in enumerate(builtin_corpus()[:5])))
    splits = build_lm_datasets(tokenizer, [str(path)], text_column="body", block_size=32, validation_split=0.0)
    assert list(splits) == ["train"] and len(splits["train"]) > 0
    with pytest.raises(ConfigError, match="text_column='text' is not a column .*'body'"):
        build_lm_datasets(tokenizer, [str(path)], block_size=32)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "does not exist"),
        ("data.parquet", b"PAR1", "unsupported extension '.parquet'"),
        ("empty.txt", b"\n\n   \n", "holds no non-empty text"),
        ("short.txt", b"just a few words", "shorter than one block"),
        ("broken.jsonl", b'{"text": "ok"}\n{not json', "Could not parse training data"),
    ],
)
def test_bad_data_files_get_clear_errors(tokenizer, tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        build_lm_datasets(tokenizer, [str(path)], block_size=64, validation_split=0.0)


def test_real_tinystories_corpus(shared_dir, tokenizer):
    path = CORPORA / "tinystories" / "niklas6_tinystories.txt"
    splits = build_lm_datasets(tokenizer, [str(path)], block_size=128, validation_split=0.1, seed=0)
    assert len(splits["train"]) > 50 and len(splits["validation"]) > 0


def test_pack_keeps_the_tokenizers_own_bos_as_the_document_boundary():
    assert pack_token_ids([[1, 7, 8], [1, 9]], block_size=5, eos_token_id=2, bos_token_id=1) == [[1, 7, 8, 1, 9]]
