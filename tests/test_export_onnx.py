"""ONNX export with KV cache (issue 4): parity with PyTorch, the ONNX Runtime model class, the CLI and bad input."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import hf_optim  # noqa: E402
from hf_optim.cli import main  # noqa: E402
from hf_optim.core.errors import ConfigError  # noqa: E402
from hf_optim.export.onnx import OnnxValidationError, export_onnx  # noqa: E402
from hf_optim.export.runtime import OnnxCausalLM  # noqa: E402
from tests.helpers import FAMILIES, right_padded_batch, tiny_model, unevenly_padded_sequences  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export (with KV cache) per family, shared by the tests of this module: (model, folder, report)."""
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            model = tiny_model(family).eval()
            folder = tmp_path_factory.mktemp(f"onnx_{family}")
            cache[family] = (model, folder, export_onnx(model, folder / "export", with_past=True))
        return cache[family]

    return get


def _runtime(folder) -> OnnxCausalLM:
    return OnnxCausalLM.from_pretrained(folder / "export", providers=["CPUExecutionProvider"], num_threads=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_validates_against_pytorch(exported, family):
    model, folder, report = exported(family)
    out = folder / "export"
    for name in ("model.onnx", "config.json", "generation_config.json", "validation.json"):
        assert (out / name).is_file(), name
    written = json.loads((out / "validation.json").read_text())
    assert written["passed"] and written["greedy_match"] and written["model_type"] == family
    assert 0 <= written["max_abs_diff_no_past"] <= ATOL
    assert 0 <= written["max_abs_diff_with_past"] <= ATOL
    assert written["num_layers"] == model.config.num_hidden_layers and not written["external_data"]
    # no staging or backup folders are left beside the export
    assert [p.name for p in folder.iterdir()] == ["export"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "right_padded"])
def test_runtime_logits_match_pytorch(exported, family, padded):
    model, folder, _ = exported(family)
    runtime = _runtime(folder)
    if padded:
        batch = right_padded_batch(unevenly_padded_sequences(3, max_len=16, seed=1))
        assert (batch["attention_mask"] == 0).any()
    else:
        ids = torch.randint(2, 512, (3, 10), generator=torch.Generator().manual_seed(1))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        expected = model(**batch).logits
    got = runtime(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert isinstance(got, torch.Tensor) and got.shape == expected.shape
    assert (got - expected).abs().max() <= ATOL


def test_runtime_cache_steps_match_full_sequence(exported):
    """Feeding a sequence one token at a time through the ONNX cache reproduces the full-sequence logits."""
    model, folder, _ = exported("llama")
    runtime = _runtime(folder)
    ids = torch.randint(2, 512, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    past, steps = None, []
    for t in range(ids.shape[1]):
        out = runtime(input_ids=ids[:, t : t + 1], past_key_values=past)
        past = out.past_key_values
        steps.append(out.logits)
    assert past[0][0].shape[2] == ids.shape[1]
    assert (torch.cat(steps, dim=1) - expected).abs().max() <= ATOL


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_token_identical_to_pytorch_greedy(exported, family):
    model, folder, _ = exported(family)
    runtime = _runtime(folder)
    prompt = torch.randint(2, 512, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    got = runtime.generate(prompt, max_new_tokens=12, do_sample=False)
    assert got.shape[1] > prompt.shape[1]
    assert torch.equal(got, expected)


def test_generate_left_padded_batch_matches_pytorch(exported):
    model, folder, _ = exported("qwen2")
    runtime = _runtime(folder)
    ids = torch.randint(2, 512, (2, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = model.config.pad_token_id
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(runtime.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), expected)


def test_export_without_past(tmp_path):
    model = tiny_model("mistral").eval()
    report = hf_optim.export_onnx(model, tmp_path / "nopast", with_past=False)
    assert report["max_abs_diff_no_past"] <= ATOL and report["max_abs_diff_with_past"] is None
    assert report["greedy_match"]
    runtime = hf_optim.OnnxCausalLM.from_pretrained(tmp_path / "nopast", num_threads=1)
    assert not runtime.use_cache and runtime.input_names == {"input_ids", "attention_mask", "position_ids"}
    prompt = torch.tensor([[5, 9, 30, 200]])
    with torch.no_grad():
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
    assert torch.equal(runtime.generate(prompt, max_new_tokens=5, do_sample=False), expected)


def test_external_data_and_atomic_overwrite(tmp_path):
    model = tiny_model("llama").eval()
    out = tmp_path / "export"
    first = export_onnx(model, out, validate=False)
    assert not first["external_data"] and not (out / "model.onnx_data").exists()
    # a zero threshold forces the >2 GiB code path: weights go to model.onnx_data, the old export is replaced
    report = export_onnx(model, out, external_data_threshold=0)
    assert report["external_data"] and report["passed"]
    assert (out / "model.onnx_data").stat().st_size > (out / "model.onnx").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_failed_validation_raises_and_writes_nothing(tmp_path):
    model = tiny_model("llama").eval()
    with pytest.raises(OnnxValidationError, match="max_abs_diff_no_past"):
        export_onnx(model, tmp_path / "export", atol=1e-12)  # fp32 rounding (~1e-7) exceeds this tolerance
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_a_model_folder(tmp_path, tokenizer, capsys):
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    assert main(["export", "onnx", str(tmp_path / "model"), "--output", str(tmp_path / "onnx"), "--opset", "18"]) == 0
    assert "greedy tokens match: True" in capsys.readouterr().out
    report = json.loads((tmp_path / "onnx" / "validation.json").read_text())
    assert report["opset"] == 18 and report["passed"]
    assert (tmp_path / "onnx" / "tokenizer.json").is_file()
    runtime = OnnxCausalLM.from_pretrained(tmp_path / "onnx", num_threads=1)
    assert runtime.config.model_type == "gpt2" and runtime.use_cache

    assert main(["export", "onnx", str(tmp_path / "model"), "--output", str(tmp_path / "np"), "--no-past"]) == 0
    assert not OnnxCausalLM.from_pretrained(tmp_path / "np", num_threads=1).use_cache


def test_pretrained_stories260k_exports(tmp_path, stories260k_dir):
    report = export_onnx(stories260k_dir, tmp_path / "stories")
    assert report["passed"] and report["max_abs_diff_with_past"] <= ATOL
    assert (tmp_path / "stories" / "tokenizer.json").is_file()


def test_unsupported_architectures_are_named(tmp_path):
    from transformers import AutoModelForMaskedLM, AutoModelForSeq2SeqLM, BertConfig, T5Config

    bert = AutoModelForMaskedLM.from_config(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    with pytest.raises(ConfigError, match="BertForMaskedLM.*'bert'.*not a decoder-only"):
        export_onnx(bert, tmp_path / "bert")
    t5 = AutoModelForSeq2SeqLM.from_config(
        T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    )
    with pytest.raises(ConfigError, match="T5ForConditionalGeneration.*encoder-decoder"):
        export_onnx(t5, tmp_path / "t5")
    with pytest.raises(ConfigError, match="opset=9"):
        export_onnx(tiny_model("llama"), tmp_path / "x", opset=9)
    with pytest.raises(ConfigError, match="no model.onnx"):
        OnnxCausalLM.from_pretrained(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_runtime_rejects_sampling(exported):
    _, folder, _ = exported("llama")
    with pytest.raises(ConfigError, match="do_sample=True"):
        _runtime(folder).generate(torch.tensor([[3, 4]]), max_new_tokens=2, do_sample=True)


def _count_calls(monkeypatch, session, names=("run", "run_with_iobinding")) -> dict:
    """Wrap ``session``'s run methods to count how often generate() uses each."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(session, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(session, name, counted)
    return calls


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_io_bound_loop_matches_plain_loop_and_pytorch(exported, family, monkeypatch):
    """The IO-binding loop (cache kept in ONNX Runtime) gives the plain session.run loop's and PyTorch's tokens."""
    model, folder, _ = exported(family)
    bound = _runtime(folder)
    plain = OnnxCausalLM.from_pretrained(folder / "export", providers=["CPUExecutionProvider"], io_binding=False)
    bound_calls, plain_calls = _count_calls(monkeypatch, bound.session), _count_calls(monkeypatch, plain.session)
    ids = torch.randint(2, 512, (2, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: positions and mask must advance the same way in both loops
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    got_bound = bound.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    got_plain = plain.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert got_bound.dtype == torch.long and torch.equal(got_bound, got_plain) and torch.equal(got_bound, expected)
    assert bound_calls == {"run": 0, "run_with_iobinding": 10}
    assert plain_calls == {"run": 10, "run_with_iobinding": 0}


def test_generate_stops_at_eos_and_pads_finished_rows_like_pytorch(exported):
    model, folder, _ = exported("mistral")
    ids = torch.randint(2, 512, (2, 5), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        free = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              eos_token_id=-1)
    eos = int(free[0, 5 + 2])  # row 0 ends at its third new token; row 1 runs on (or ends too) with that id
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                  eos_token_id=eos, pad_token_id=1)
    assert expected[0, -1] == 1 or expected.shape[1] < free.shape[1]  # the EOS really cut or padded row 0
    for io_binding in (True, False):
        runtime = OnnxCausalLM.from_pretrained(folder / "export", num_threads=1, io_binding=io_binding)
        assert torch.equal(runtime.generate(ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=1), expected)


def test_session_options(exported):
    _, folder, _ = exported("llama")
    runtime = OnnxCausalLM.from_pretrained(folder / "export", num_threads=2)
    options = runtime.session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"  # threads sleep by default
    spinning = OnnxCausalLM.from_pretrained(folder / "export", num_threads=2, allow_spinning=True)
    assert spinning.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"
    with pytest.raises(ConfigError, match="num_threads=0"):
        OnnxCausalLM.from_pretrained(folder / "export", num_threads=0)
