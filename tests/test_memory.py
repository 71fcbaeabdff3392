"""The memory estimator against what a tiny Llama really holds on CPU, plus its CLI and input checks.

The measured side: exact tensor sizes of parameters, gradients and AdamW states after one step, and the bytes
autograd saves for backward (``saved_tensors_hooks``, storages deduplicated, parameters excluded) plus the logits the
model output keeps alive. scripts/check_memory_estimate.py prints the same comparison (and peak RSS) as a table.
"""

from __future__ import annotations

import json

import pytest
import torch

from hf_optim.cli import main
from hf_optim.core.errors import ConfigError
from hf_optim.training.activations import apply_activation_checkpointing
from hf_optim.training.memory import (
    checkpointed_layers,
    estimate_memory,
    load_model_shape,
    parse_memory_size,
)
from tests.helpers import tiny_config

# Big enough that activations dwarf int64 ids and 0-d tensors, small enough for a few seconds on one core.
SIZES = {"hidden": 128, "layers": 4, "vocab_size": 1024}
BATCH, SEQ = 2, 128
# Activations are recounted tensor by tensor, so only tensors the rule deliberately treats differently remain: a 4-byte
# loss scalar, and the rotary tables that checkpointing keeps alive without saving them (about 1% here). 3% fails as
# soon as one h-wide activation per block is missed (4.6% without checkpointing), e.g. a new saved upcast.
ACTIVATION_TOLERANCE = 0.03


def build_model(attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config("llama", **SIZES)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).to(dtype).train()


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Exact bytes of parameters (tied ones once), gradients and optimizer states."""
    params = list(model.parameters())
    return {
        "parameters": sum(p.nbytes for p in params),
        "gradients": sum(p.grad.nbytes for p in params if p.grad is not None),
        "optimizer_states": sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)),
    }


def saved_activation_bytes(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward, plus the returned logits."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(input_ids=input_ids, labels=input_ids)
    storages[output.logits.untyped_storage().data_ptr()] = output.logits.untyped_storage().nbytes()
    output.loss.backward()  # the hooks must have seen a graph that really trains
    return sum(storages.values())


def recompute_bytes(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """What re-running one decoder block in backward saves, beyond the block input the checkpoint already holds."""
    with torch.no_grad():
        hidden = model.model.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
        rotary = model.model.rotary_emb(hidden, positions)
    hidden.requires_grad_(True)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {t.untyped_storage().data_ptr() for t in (hidden, *rotary)}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in skip:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.model.layers[0](hidden, attention_mask=None, position_embeddings=rotary, position_ids=positions)
    return sum(storages.values())


def test_parameter_count_matches_real_model_and_counts_tied_weights_once():
    from transformers import AutoModelForCausalLM

    counts = {}
    for tied in (False, True):
        config = tiny_config("llama", **SIZES)
        config.tie_word_embeddings = tied
        real = AutoModelForCausalLM.from_config(config)
        assert (real.lm_head.weight is real.model.embed_tokens.weight) == tied
        counts[tied] = load_model_shape(config).num_params
        assert counts[tied] == sum(p.numel() for p in {p.data_ptr(): p for p in real.parameters()}.values())
    assert counts[False] - counts[True] == SIZES["vocab_size"] * SIZES["hidden"]


def test_model_states_match_tensor_sizes_after_one_adamw_step():
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, SIZES["vocab_size"], (BATCH, SEQ))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    measured = state_bytes(model, optimizer)
    estimate = estimate_memory(model.config, "ddp", mixed_precision="no", batch_size=BATCH, seq_len=SEQ)
    print({k: (estimate.gpu[k], measured[k]) for k in measured})
    assert estimate.gpu["parameters"] == measured["parameters"]
    assert estimate.gpu["gradients"] == measured["gradients"]
    # AdamW also keeps a 4-byte `step` counter per parameter tensor, which the ZeRO accounting leaves out.
    num_tensors = len(list(model.parameters()))
    assert measured["optimizer_states"] - estimate.gpu["optimizer_states"] == 4 * num_tensors


@pytest.mark.parametrize(
    "attn, mode, precision",
    [("sdpa", "off", "no"), ("sdpa", "full", "no"), ("sdpa", "selective", "no"), ("eager", "off", "no"),
     ("eager", "selective", "no"), ("sdpa", "off", "bf16"), ("sdpa", "full", "bf16"), ("eager", "off", "bf16")],
)
def test_activation_estimate_matches_saved_tensors(attn, mode, precision):
    dtype = torch.float32 if precision == "no" else torch.bfloat16
    model = build_model(attn, dtype)
    ids = torch.randint(0, SIZES["vocab_size"], (BATCH, SEQ))
    layers = apply_activation_checkpointing(model, mode, every_n_layers=2)  # as the training recipe does
    assert layers == checkpointed_layers(SIZES["layers"], mode, every_n=2)
    detail = estimate_memory(model.config, mixed_precision=precision, batch_size=BATCH, seq_len=SEQ,
                             gradient_checkpointing=mode, attn_implementation=attn).activation_detail
    pairs = {"stored": (detail["layers"] + detail["head"], saved_activation_bytes(model, ids))}
    if layers:
        pairs["recompute"] = (detail["recompute"], recompute_bytes(build_model(attn, dtype), ids))
    for part, (predicted, measured) in pairs.items():
        error = (predicted - measured) / measured
        print(f"{attn}/{mode}/{precision} {part}: estimate {predicted} B, measured {measured} B, error {error:+.2%}")
        assert abs(error) < ACTIVATION_TOLERANCE


def test_autocast_estimate_matches_saved_tensors_and_cast_weights():
    """DDP as Accelerate runs bf16: fp32 weights, forward under autocast, outputs converted back to fp32."""
    from accelerate.utils import convert_outputs_to_fp32

    model = build_model()
    model.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward))
    ids = torch.randint(0, SIZES["vocab_size"], (BATCH, SEQ))
    measured = saved_activation_bytes(model, ids)  # autocast's 16-bit weight copies are saved tensors too
    estimate = estimate_memory(model.config, "ddp", autocast=True, batch_size=BATCH, seq_len=SEQ)
    fp32_params = 4 * estimate.model.num_params
    predicted = estimate.activation_detail["layers"] + estimate.activation_detail["head"]
    predicted += estimate.gpu["parameters"] - fp32_params
    error = (predicted - measured) / measured
    print(f"autocast: estimate {predicted} B, measured {measured} B, error {error:+.2%}")
    assert abs(error) < ACTIVATION_TOLERANCE
    assert estimate.gpu["gradients"] == fp32_params and estimate.gpu["optimizer_states"] == 2 * fp32_params


def test_checkpointing_and_sharding_order_the_estimates():
    config = tiny_config("llama", **SIZES)
    acts = [estimate_memory(config, gradient_checkpointing=m, seq_len=SEQ).gpu["activations"]
            for m in ("off", "selective", "full")]
    assert acts[0] > acts[1] > acts[2]
    totals = [estimate_memory(config, s, num_gpus=4, seq_len=SEQ).gpu_total for s in ("ddp", "zero1", "zero2", "zero3")]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
    offloaded = estimate_memory(config, "zero3", offload=True, num_gpus=4, seq_len=SEQ)
    assert offloaded.cpu["optimizer_states"] > 0 and offloaded.gpu["optimizer_states"] == 0


def test_parse_memory_size():
    assert parse_memory_size("80GiB") == 80 * 2**30
    assert parse_memory_size("24GB") == 24 * 10**9
    assert parse_memory_size("1.5 tib") == int(1.5 * 2**40)
    for bad in ("80", "lots", "-4GB", "80 GiBs"):
        with pytest.raises(ConfigError, match="80GiB"):
            parse_memory_size(bad)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"strategy": "zero4"}, "'zero4'.*ddp, zero1, zero2, zero3, fsdp"),
        ({"num_gpus": 0}, "num_gpus=0"),
        ({"mixed_precision": "fp4"}, "'fp4'"),
        ({"offload": True}, "Offload needs a ZeRO or FSDP"),
        ({"gpu_memory": "a lot"}, "'a lot'"),
        ({"gradient_checkpointing": "some"}, "'some'"),
        ({"strategy": "zero3", "autocast": True}, "autocast describes DDP"),
    ],
)
def test_bad_input_raises_config_error(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        estimate_memory(tiny_config("llama"), **kwargs)


def test_model_spec_from_config_json_and_recipe_yaml(tmp_path):
    config = tiny_config("llama", **SIZES)
    config.save_pretrained(tmp_path / "model")
    expected = load_model_shape(config).num_params
    assert load_model_shape(tmp_path / "model" / "config.json").num_params == expected
    assert load_model_shape(str(tmp_path / "model")).num_params == expected
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_config: {json.dumps(config.to_diff_dict())}\ntrain_files: [a.txt]\n")
    assert load_model_shape(recipe).num_params == expected
    recipe.write_text(f"model: {tmp_path / 'model'}\n")
    assert load_model_shape(recipe).num_params == expected
    with pytest.raises(ConfigError, match="does-not-exist"):
        load_model_shape(tmp_path / "does-not-exist")


def test_cli_json(tmp_path, capsys):
    tiny_config("llama", **SIZES).save_pretrained(tmp_path)
    code = main(["estimate-memory", str(tmp_path), "--strategy", "zero2", "--num-gpus", "4", "--seq-len", "64",
                 "--gradient-checkpointing", "full", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["inputs"]["strategy"] == "zero2" and report["inputs"]["num_gpus"] == 4
    assert report["model"]["num_params"] == load_model_shape(tmp_path).num_params
    gpu = report["per_gpu_bytes"]
    assert gpu["total"] == sum(gpu[k] for k in ("parameters", "gradients", "optimizer_states", "activations"))
    assert report["recommendation"] is None


def test_cli_table_and_unknown_strategy(tmp_path, capsys):
    tiny_config("llama").save_pretrained(tmp_path)
    assert main(["estimate-memory", str(tmp_path), "--strategy", "zero3", "--offload", "--num-gpus", "2"]) == 0
    table = capsys.readouterr().out
    assert "optimizer states" in table and "CPU per rank" in table and "zero3 + offload" in table
    assert main(["estimate-memory", str(tmp_path), "--strategy", "zero4"]) == 2
    error = capsys.readouterr().err
    assert "'zero4'" in error and "ddp, zero1, zero2, zero3, fsdp" in error


def test_gpu_memory_picks_a_sharded_strategy_when_ddp_does_not_fit(tmp_path, capsys):
    config = tiny_config("llama", **SIZES)
    base = dict(num_gpus=8, seq_len=SEQ, mixed_precision="bf16")
    ddp = estimate_memory(config, "ddp", **base).gpu_total
    zero3 = estimate_memory(config, "zero3", **base).gpu_total
    budget = int((ddp + zero3) / 2 / 0.9)  # between the two, after the 10% headroom
    result = estimate_memory(config, "ddp", gpu_memory=budget, **base).recommendation
    assert result["fits"] and result["strategy"] in ("zero1", "zero2", "zero3")
    assert result["tried"][0]["strategy"] == "ddp" and not result["tried"][0]["fits"]
    config.save_pretrained(tmp_path)
    cli = ["estimate-memory", str(tmp_path), "--num-gpus", "8", "--seq-len", str(SEQ), "--gpu-memory"]
    assert main([*cli, f"{budget}B", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recommendation"]["strategy"] == result["strategy"]
    assert main([*cli, "1KiB"]) == 1 and "Nothing fits" in capsys.readouterr().out
