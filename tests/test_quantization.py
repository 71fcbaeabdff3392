"""Quantization: RTN/GPTQ math, the packed "intn" format, bitsandbytes and torchao on tiny models and stories260K."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

import hf_optim
from hf_optim.compression.algorithms import gptq, rtn
from hf_optim.compression.api import compression_history
from hf_optim.compression.configs import config_from_dict
from hf_optim.compression.storage import PACKED_ATTR, PACKED_FILE
from hf_optim.compression.targets import linear_weight, target_linears
from hf_optim.core.errors import ConfigError
from hf_optim.training.data import builtin_corpus
from tests.helpers import local_tokenizer, tiny_model

IDS = torch.randint(2, 500, (2, 24), generator=torch.Generator().manual_seed(1))


def _weight(rows: int = 48, cols: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[3, 7] = 1.5  # an outlier: its group's scale must still cover it
    w[5, :32] = 0.0  # an all-zero group
    return w


def _correlated_inputs(tokens: int = 1024, features: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features**0.5
    return torch.randn(tokens, features, generator=g) @ mix + torch.randn(features, generator=g)


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# ---------------------------------------------------------------- pure functions
@pytest.mark.parametrize("bits, group_size, symmetric",
                         [(8, None, True), (8, 32, True), (4, 32, False), (4, 128, False), (4, 16, True)])
def test_rtn_error_is_within_half_a_scale(bits, group_size, symmetric):
    w = _weight()
    q = rtn.quantize(w, bits, group_size, symmetric)
    qmin, qmax = rtn.qrange(bits, symmetric)
    assert q.scale.dtype == torch.float16 and int(q.values.min()) >= qmin and int(q.values.max()) <= qmax
    assert (q.zero is None) == symmetric
    step = q.scale.float().repeat_interleave(q.group_size, dim=1)
    error = (w - rtn.dequantize(q)).abs()
    assert bool((error <= step / 2 * (1 + 1e-5)).all())
    assert bool((rtn.dequantize(q)[5, :32] == 0).all())  # zero stays exactly representable
    relative = float((w - rtn.dequantize(q)).norm() / w.norm())
    assert relative < (0.02 if bits == 8 else 0.2)


def test_rtn_rejects_a_group_size_that_does_not_divide():
    with pytest.raises(ValueError, match="group_size=48 does not divide in_features=128"):
        rtn.quantize(_weight(), 4, 48)


@pytest.mark.parametrize("group_size", [32, None])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_lower_than_rtn_on_correlated_inputs(group_size, act_order):
    w, x = _weight(), _correlated_inputs()
    hessian = x.t().double() @ x.double()
    q_gptq = gptq.gptq_quantize(w, hessian, bits=4, group_size=group_size, act_order=act_order)
    q_rtn = rtn.quantize(w, 4, group_size, symmetric=False)
    error_gptq = ((w - rtn.dequantize(q_gptq)) @ x.t()).norm()
    error_rtn = ((w - rtn.dequantize(q_rtn)) @ x.t()).norm()
    assert float(error_gptq) < 0.85 * float(error_rtn)
    assert q_gptq.values.shape == w.shape and q_gptq.scale.shape == q_rtn.scale.shape
    assert int(q_gptq.values.min()) >= 0 and int(q_gptq.values.max()) <= 15


def test_gptq_static_groups_reuse_the_rtn_scales():
    w, x = _weight(), _correlated_inputs()
    static = gptq.gptq_quantize(w, x.t().double() @ x.double(), 4, 32, static_groups=True)
    assert torch.equal(static.scale, rtn.quantize(w, 4, 32, symmetric=False).scale)


@pytest.mark.parametrize("group_size, small_block", [(32, 32), (32, 8), (None, 16)])
def test_gptq_block_size_does_not_change_the_math(group_size, small_block):
    # lazy batch updates are exact algebra, whether groups sit inside blocks or span several blocks
    w, x = _weight(), _correlated_inputs()
    hessian = x.t().double() @ x.double()
    small = gptq.gptq_quantize(w, hessian, 4, group_size, block_size=small_block)
    large = gptq.gptq_quantize(w, hessian, 4, group_size, block_size=128)
    assert float((small.values == large.values).float().mean()) > 0.99
    assert torch.equal(small.scale, large.scale) or float((small.scale - large.scale).abs().max()) < 1e-3


def test_gptq_bad_input():
    w = _weight()
    with pytest.raises(ValueError, match="expected \\(128, 128\\)"):
        gptq.gptq_quantize(w, torch.eye(64), 4, 32)
    indefinite = -torch.eye(128, dtype=torch.float64)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq.gptq_quantize(w, indefinite, 4, 32)


@pytest.mark.parametrize("bits, group_size, symmetric", [(8, None, True), (4, 32, False)])
def test_intn_packing_round_trips_bitwise(bits, group_size, symmetric):
    from hf_optim.compression.quantization import decode_intn, pack_quantized

    q = rtn.quantize(_weight(), bits, group_size, symmetric)
    packed = pack_quantized(q)
    assert packed.tensors["values"].dtype == torch.uint8
    assert packed.tensors["values"].numel() == _weight().numel() * bits // 8
    assert torch.equal(decode_intn(packed.tensors, packed.meta), rtn.dequantize(q))


# ---------------------------------------------------------------- native handlers on models
def _quantized_layer_bytes(model: nn.Module) -> tuple[int, int]:
    """(fp32 bytes of the packed layers' weights, bytes of their packed tensors)."""
    dense = packed = 0
    for module in model.modules():
        if hasattr(module, PACKED_ATTR):
            dense += module.weight.numel() * 4
            packed += sum(t.numel() * t.element_size() for t in getattr(module, PACKED_ATTR).tensors.values())
    return dense, packed


@pytest.mark.parametrize("config, expected_ratio, tolerance", [
    (hf_optim.Int4WeightOnlyConfig(group_size=32), (0.5 + 2 / 32 + 0.5 / 32) / 4, 0.2),  # codes, fp16 scale, 4-bit zero
    (hf_optim.Int8WeightOnlyConfig(), 0.25, 0.02),
])
def test_native_quantization_shrinks_the_folder_and_reloads_bitwise(config, expected_ratio, tolerance, tmp_path):
    reference = tiny_model("llama")
    hf_optim.save_optimized(reference, tmp_path / "fp32")
    model = hf_optim.quantize(tiny_model("llama"), config)
    assert (_logits(model) - _logits(reference)).abs().max() < tolerance * _logits(reference).abs().max()
    dense, packed = _quantized_layer_bytes(model)
    assert dense and packed / dense == pytest.approx(expected_ratio, rel=0.03)
    out = hf_optim.save_optimized(model, tmp_path / "q")

    assert (out / PACKED_FILE).stat().st_size < packed + 16_384  # payload plus the safetensors header
    saved = (tmp_path / "fp32" / "model.safetensors").stat().st_size - (out / "model.safetensors").stat().st_size
    assert saved == pytest.approx(dense, rel=0.02)  # the quantized weights left the dense file
    reloaded = hf_optim.load_optimized(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    record = json.loads((out / "hf_optim.json").read_text())
    assert {p["codec"] for p in record["packed"].values()} == {"intn"}
    assert record["steps"][0]["quantized_layers"] == len(record["packed"])


def test_native_int4_on_gpt2_conv1d_reloads_bitwise(tmp_path):
    model = hf_optim.quantize(tiny_model("gpt2"), hf_optim.Int4WeightOnlyConfig(group_size=32))
    for _, module in target_linears(model, ["*"], ["lm_head", "*wte", "*wpe"]):
        groups = linear_weight(module).reshape(-1, 32).sort(1).values  # [out, in] view: groups run along inputs
        distinct = (groups.diff(dim=1) != 0).sum(1) + 1
        assert int(distinct.max()) <= 16  # 4 bits: at most 16 values per group
    reloaded = hf_optim.load_optimized(hf_optim.save_optimized(model, tmp_path / "gpt2"))
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_gptq_through_the_verb_calibrates_packs_and_reloads(tmp_path):
    tokenizer = local_tokenizer()
    texts = builtin_corpus()[:40]
    model = hf_optim.quantize(tiny_model("llama"), hf_optim.Int4WeightOnlyConfig(group_size=32, method="gptq"),
                              tokenizer=tokenizer, calibration_texts=texts, num_calibration_samples=8,
                              calibration_seq_len=64)
    step = compression_history(model)[0]
    assert step["algorithm"] == "gptq" and step["calibration"]["samples"] == 8
    rtn_model = hf_optim.quantize(tiny_model("llama"), hf_optim.Int4WeightOnlyConfig(group_size=32))
    differs = [not torch.equal(a, b) for a, b in zip(model.parameters(), rtn_model.parameters())]
    assert any(differs)  # GPTQ moved weights away from plain rounding
    reloaded = hf_optim.load_optimized(hf_optim.save_optimized(model, tmp_path / "gptq"))
    assert torch.equal(reloaded.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)


# ---------------------------------------------------------------- bad input
def test_group_size_that_does_not_divide_names_the_layer_before_touching_weights():
    model = tiny_model("llama", hidden=64)  # the MLP's down_proj has in_features=128, the others 64
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"group_size=48 does not divide in_features=64 of layer 'model\.layers\.0"):
        hf_optim.quantize(model, hf_optim.Int4WeightOnlyConfig(group_size=48))
    with pytest.raises(ConfigError, match="group_size=96 does not divide in_features=64"):
        hf_optim.quantize(model, hf_optim.Int8WeightOnlyConfig(group_size=96))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gptq_without_calibration_is_a_clear_error():
    with pytest.raises(ConfigError, match="needs calibration data"):
        hf_optim.quantize(tiny_model("llama"), hf_optim.Int4WeightOnlyConfig(method="gptq"))


@pytest.mark.parametrize("make, message", [
    (lambda: hf_optim.Int4WeightOnlyConfig(method="awq"), "must be 'rtn' or 'gptq'"),
    (lambda: hf_optim.Int8WeightOnlyConfig(backend="bnb"), "must be 'native' or 'torchao'"),
    (lambda: hf_optim.BnbInt4Config(quant_type="int4"), "must be 'nf4' or 'fp4'"),
    (lambda: hf_optim.BnbInt4Config(compute_dtype="float8"), "compute_dtype='float8'"),
    (lambda: hf_optim.BnbInt8Config(threshold=-1), "threshold=-1"),
    (lambda: hf_optim.TorchAoInt4WeightOnlyConfig(group_size=0), "group_size=0"),
])
def test_bad_config_values(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize("package, config", [("bitsandbytes", hf_optim.BnbInt8Config()),
                                             ("torchao", hf_optim.TorchAoInt8DynamicConfig())])
def test_missing_backend_says_how_to_install_it(package, config, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail as if it were not installed
    with pytest.raises(ConfigError, match=rf"pip install {package}=="):
        hf_optim.quantize(tiny_model("llama"), config)


def test_recipes_reach_the_backend_configs():
    config = config_from_dict({"method": "bnb_int4", "quant_type": "fp4", "double_quant": False})
    assert config == hf_optim.BnbInt4Config(quant_type="fp4", double_quant=False)
    assert config_from_dict(config.to_dict()) == config
    assert config_from_dict({"method": "torchao_int4_weight_only", "group_size": 64}).group_size == 64
    assert config_from_dict({"method": "int4_weight_only", "algorithm": "gptq", "act_order": True}).act_order


# ---------------------------------------------------------------- bitsandbytes
@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install bitsandbytes==0.50.2)")


@pytest.mark.parametrize("config, tolerance", [
    (hf_optim.BnbInt8Config(), 0.05),
    (hf_optim.BnbInt4Config(quant_type="nf4"), 0.3),
    (hf_optim.BnbInt4Config(quant_type="fp4", double_quant=False), 0.3),
])
def test_bnb_quantizes_in_place_and_reloads_with_from_pretrained(bnb, config, tolerance, tmp_path):
    from transformers import AutoModelForCausalLM

    reference = _logits(tiny_model("llama"))
    model = hf_optim.quantize(tiny_model("llama").eval(), config)
    expected = bnb.nn.Linear8bitLt if isinstance(config, hf_optim.BnbInt8Config) else bnb.nn.Linear4bit
    assert isinstance(model.model.layers[0].mlp.up_proj, expected)
    assert type(model.lm_head) is nn.Linear  # excluded by default
    out = hf_optim.save_optimized(model, tmp_path / "bnb")  # before any forward: see the report on CPU packing
    logits = _logits(model)
    assert float((logits - reference).abs().max()) < tolerance * float(reference.abs().max())

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(reloaded.model.layers[1].self_attn.k_proj, expected)
    assert type(reloaded.lm_head) is nn.Linear
    assert torch.allclose(_logits(reloaded), logits, atol=1e-5)
    assert isinstance(hf_optim.load_optimized(out).model.layers[0].mlp.down_proj, expected)


def test_bnb_nf4_runs_a_172_wide_mlp_in_eval_mode_after_reload(bnb, tmp_path):
    # stories260K's shape: bitsandbytes' AVX512-BF16 CPU kernel asserts on it unless prepare_bnb_model steps in
    from transformers import AutoModelForCausalLM

    from tests.helpers import tiny_config

    config = tiny_config("llama")
    config.intermediate_size = 172
    torch.manual_seed(0)
    model = hf_optim.quantize(AutoModelForCausalLM.from_config(config).eval(), hf_optim.BnbInt4Config())
    out = hf_optim.save_optimized(model, tmp_path / "nf4")
    logits = _logits(model)
    reloaded = hf_optim.load_optimized(out)
    assert not reloaded.training and torch.allclose(_logits(reloaded), logits, atol=1e-5)


def test_bnb_include_only_mlp_and_refuse_to_quantize_twice(bnb, tmp_path):
    from transformers import AutoModelForCausalLM

    model = hf_optim.quantize(tiny_model("llama"), hf_optim.BnbInt8Config(include=["*mlp*"]))
    reloaded = AutoModelForCausalLM.from_pretrained(hf_optim.save_optimized(model, tmp_path / "mlp"))
    for m in (model, reloaded):
        assert isinstance(m.model.layers[0].mlp.gate_proj, bnb.nn.Linear8bitLt)
        assert type(m.model.layers[0].self_attn.q_proj) is nn.Linear
    with pytest.raises(ConfigError, match="already quantized with bitsandbytes"):
        hf_optim.quantize(model, hf_optim.Int4WeightOnlyConfig(group_size=32))


# ---------------------------------------------------------------- torchao
@pytest.fixture
def torchao():
    return pytest.importorskip("torchao", reason="needs torchao (pip install torchao==0.18.0)")


@pytest.mark.parametrize("config, tolerance", [
    (hf_optim.TorchAoInt8WeightOnlyConfig(), 0.05),
    (hf_optim.TorchAoInt8DynamicConfig(), 0.05),
    (hf_optim.TorchAoInt4WeightOnlyConfig(group_size=32), 0.3),
    (hf_optim.Int8WeightOnlyConfig(backend="torchao"), 0.05),
])
def test_torchao_quantizes_and_reloads_with_from_pretrained(torchao, config, tolerance, tmp_path):
    from transformers import AutoModelForCausalLM

    reference = _logits(tiny_model("llama"))
    model = hf_optim.quantize(tiny_model("llama"), config)
    weight = model.model.layers[0].mlp.up_proj.weight
    assert type(weight).__module__.startswith("torchao")
    assert type(model.lm_head.weight) is nn.Parameter
    logits = _logits(model)
    assert float((logits - reference).abs().max()) < tolerance * float(reference.abs().max())
    out = hf_optim.save_optimized(model, tmp_path / "ao")
    assert (out / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded.model.layers[1].self_attn.v_proj.weight) is type(weight)
    assert float((_logits(reloaded) - logits).abs().max()) < 0.01 * float(reference.abs().max())


def test_torchao_refuses_gpt2_conv1d_and_undividable_groups(torchao):
    with pytest.raises(ConfigError, match="is a Conv1D, and torchao quantizes nn.Linear only"):
        hf_optim.quantize(tiny_model("gpt2"), hf_optim.TorchAoInt8WeightOnlyConfig())
    with pytest.raises(ConfigError, match="group_size=48 does not divide in_features=64 of layer"):
        hf_optim.quantize(tiny_model("llama"), hf_optim.TorchAoInt4WeightOnlyConfig(group_size=48))


# ---------------------------------------------------------------- real model
@pytest.mark.slow
def test_gptq_beats_rtn_on_stories260k(stories260k_dir, shared_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_optim.core.evaluation import evaluate_perplexity

    tokenizer = AutoTokenizer.from_pretrained(stories260k_dir)
    stories = shared_dir / "corpora" / "tinystories"
    text = (stories / "niklas6_tinystories.txt").read_text()
    samples = (stories / "cs336_tinystories_sample.txt").read_text().split("<|endoftext|>")
    calibration = [t for t in samples if t.strip()]
    exclude = ["lm_head", "*embed*", "*down_proj"]  # down_proj has in_features=172, which 32 does not divide

    def perplexity(model) -> float:
        return evaluate_perplexity(model, tokenizer, [text], max_length=256, stride=256, max_tokens=16_384)

    fp32 = perplexity(AutoModelForCausalLM.from_pretrained(stories260k_dir))
    rtn_ppl = perplexity(hf_optim.quantize(AutoModelForCausalLM.from_pretrained(stories260k_dir),
                                           hf_optim.Int4WeightOnlyConfig(group_size=32, exclude=exclude)))
    gptq_ppl = perplexity(hf_optim.quantize(
        AutoModelForCausalLM.from_pretrained(stories260k_dir),
        hf_optim.Int4WeightOnlyConfig(group_size=32, method="gptq", exclude=exclude),
        tokenizer=tokenizer, calibration_texts=calibration, num_calibration_samples=32))
    int8 = perplexity(hf_optim.quantize(AutoModelForCausalLM.from_pretrained(stories260k_dir),
                                        hf_optim.Int8WeightOnlyConfig()))
    assert int8 <= fp32 * 1.005
    assert fp32 < gptq_ppl < rtn_ppl
