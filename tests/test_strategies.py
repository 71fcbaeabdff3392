"""The distributed strategies of hf_optim.training.accelerator, through the real user path.

Multi-process tests start ``accelerate launch --config_file accelerate_configs/<name>.yaml
tests/workers/train_worker.py`` (2 gloo ranks on a machine without GPUs) and compare with one process running the
same global batch: per-step losses to 4 decimals and the trained weights, which only holds if every backend averages
gradients over ranks and Accelerate divides by the accumulation steps. Each strategy's worker runs once per session
and is shared by its tests (``pytest -k zero3`` runs just the ZeRO-3 ones, ``-k consolidated`` the consolidated-saving
ones).
Fast tests check the error messages with the environment that Accelerate's own launcher code builds from a config.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hf_optim.core.errors import ConfigError
from hf_optim.training import accelerator as strategies
from tests.helpers import REPO_ROOT, tiny_model

CONFIGS = REPO_ROOT / "accelerate_configs"
WORKER = REPO_ROOT / "tests" / "workers" / "train_worker.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")

# config file -> strategy_name() it must produce with 2 processes on this machine.
MULTI_PROCESS = {
    "cpu_multi": "ddp",
    "ddp": "ddp",
    "fsdp2_full_shard": "fsdp2-full-shard",
    "fsdp2_no_reshard": "fsdp2-no-reshard",
    "fsdp2_cpu_offload": "fsdp2-offload",
    "zero1": "zero1",
    "zero2": "zero2",
    "zero2_offload": "zero2-offload",
    "zero3": "zero3",
    "zero3_offload": "zero3-offload",
}
# config file -> strategy_from_config_file() (num_processes as written in the file).
SHIPPED = {**MULTI_PROCESS, "cpu_single": "single", "single_gpu": "single", "fp8": "fsdp2-full-shard"}
MICRO_BATCH, GRAD_ACCUM = 2, 2


# ----------------------------------------------------------------------------------------------------------------
# Running the worker


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(config: str, out: Path, model_dir: Path, *worker_args: str) -> dict:
    """``accelerate launch`` the worker under ``config``; its result.json, or a failure showing the output's tail."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(
        OMP_NUM_THREADS="1",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".torch_extensions")),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    command = [
        str(ACCELERATE), "launch", "--config_file", str(CONFIGS / f"{config}.yaml"),
        "--main_process_port", str(_free_port()),
        str(WORKER), "--model", str(model_dir), "--out", str(out), *worker_args,
    ]
    # DeepSpeed compiles its CPU ops on first use (~1.5 min each on 2 cores; cached in TORCH_EXTENSIONS_DIR).
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    result_file = out / "result.json"
    if proc.returncode != 0 or not result_file.exists():
        pytest.fail(
            f"`{' '.join(command)}` exited with {proc.returncode}.\n--- stdout tail ---\n{proc.stdout[-3000:]}\n"
            f"--- stderr tail ---\n{proc.stderr[-6000:]}"
        )
    return json.loads(result_file.read_text())


class _Runs:
    """Each (config, worker arguments) runs once per session; tests of the same strategy share it."""

    def __init__(self, root: Path):
        self.root = root
        self.model_dir = root / "tiny-llama"
        tiny_model("llama", seed=0).save_pretrained(self.model_dir)
        self._done: dict[tuple[str, ...], tuple[dict, Path]] = {}

    def get(self, config: str, *worker_args: str) -> tuple[dict, Path]:
        key = (config, *worker_args)
        if key not in self._done:
            out = self.root / "-".join(key).replace(" ", "_").replace("--", "")
            self._done[key] = (_launch(config, out, self.model_dir, *worker_args), out)
        return self._done[key]

    def reference(self, *worker_args: str) -> tuple[dict, Path]:
        """One process with twice the micro-batch: the same global batch as 2 ranks."""
        batch = ("--micro-batch", str(2 * MICRO_BATCH), "--grad-accum", str(GRAD_ACCUM))
        return self.get("cpu_single", *batch, *worker_args)

    def two_ranks(self, config: str, *worker_args: str) -> tuple[dict, Path]:
        return self.get(config, "--micro-batch", str(MICRO_BATCH), "--grad-accum", str(GRAD_ACCUM), *worker_args)


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> _Runs:
    return _Runs(tmp_path_factory.mktemp("strategies"))


def _assert_same_training(result: dict, out: Path, ref: dict, ref_out: Path, config: str) -> None:
    assert result["world_size"] == 2, f"{config}: expected 2 real ranks, got {result['world_size']}"
    assert result["finite"], result["losses"]
    assert result["losses"] == pytest.approx(ref["losses"], abs=1e-4), (
        f"{config}: per-step losses {result['losses']} differ from the 1-process reference {ref['losses']}"
    )
    trained, expected = torch.load(out / "final_state.pt"), torch.load(ref_out / "final_state.pt")
    assert trained.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(trained[name], tensor, atol=1e-5, rtol=0, msg=f"{config}: weight {name} differs")


# ----------------------------------------------------------------------------------------------------------------
# Multi-process: every strategy trains exactly like one process with the same global batch


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.xdist_group("strategies")
@pytest.mark.parametrize("config", list(MULTI_PROCESS), ids=list(MULTI_PROCESS))
def test_two_ranks_match_one_process(runs: _Runs, config: str) -> None:
    ref, ref_out = runs.reference()
    result, out = runs.two_ranks(config)
    assert result["strategy"] == MULTI_PROCESS[config]
    _assert_same_training(result, out, ref, ref_out, config)
    # The reference must itself have learned, or equal losses would prove nothing.
    assert ref["losses"][-1] < ref["losses"][0] - 0.5


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.xdist_group("strategies")
@pytest.mark.parametrize("config", ["zero3", "fsdp2_full_shard"])
def test_consolidated_save_reloads_with_identical_logits(runs: _Runs, config: str) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tests.workers.train_worker import synthetic_rows

    _, out = runs.two_ranks(config)
    folder = out / "model"
    assert not folder.with_name("model.tmp-save").exists()
    weights = {}
    for shard in folder.glob("*.safetensors"):
        weights.update(load_file(shard))
    empty = [name for name, tensor in weights.items() if tensor.numel() == 0]
    assert weights and not empty, f"{config}: empty tensors in the consolidated folder: {empty}"

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    probe = synthetic_rows(2, 32, model.config.vocab_size, seed=99)
    with torch.no_grad():
        logits = model(
            input_ids=torch.stack([r["input_ids"] for r in probe]),
            attention_mask=torch.stack([r["attention_mask"] for r in probe]),
        ).logits
    torch.testing.assert_close(logits, torch.load(out / "probe_logits.pt"), atol=1e-5, rtol=0)
    trained = torch.load(out / "final_state.pt")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, trained[name], atol=0, rtol=0, msg=f"{config}: {name} not saved as trained")


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.xdist_group("strategies")
def test_sgd_under_zero2_offload_stays_sgd(runs: _Runs) -> None:
    # Accelerate maps any torch optimizer to DeepSpeedCPUAdam under optimizer offload; check_model keeps SGD.
    ref, ref_out = runs.reference("--optimizer", "sgd", "--lr", "0.5")
    result, out = runs.two_ranks("zero2_offload", "--optimizer", "sgd", "--lr", "0.5")
    _assert_same_training(result, out, ref, ref_out, "zero2_offload+sgd")


# ----------------------------------------------------------------------------------------------------------------
# Fast: configs, error messages, in-process saving


def launch_env(config: Path, world_size: int = 2) -> dict[str, str]:
    """The ACCELERATE_*/FSDP_* environment ``accelerate launch --config_file config`` gives the script, built by
    Accelerate's own launcher code, plus the rank variables torchrun would add for rank 0."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    args = launch_command_parser().parse_args(["--config_file", str(config), "script.py"])
    args, defaults, _ = _validate_launch_command(args)
    ranks = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": str(world_size)}
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.use_fsdp or args.multi_gpu or args.use_megatron_lm:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
        ranks = {}
    return {**{k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}, **ranks}


@pytest.fixture
def launched(monkeypatch, tmp_path):
    """Put the environment of ``accelerate launch`` with a (modified) shipped config into os.environ."""

    def apply(name: str, **changes) -> Path:
        config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        for key, value in changes.items():
            section, _, field = key.rpartition("__")
            (config[section] if section else config)[field] = value
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        for key in list(os.environ):
            if key.startswith(("ACCELERATE_", "FSDP_")):
                monkeypatch.delenv(key)
        for key, value in launch_env(path).items():
            monkeypatch.setenv(key, value)
        return path

    return apply


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.parametrize("name", list(SHIPPED), ids=list(SHIPPED))
def test_shipped_config_is_annotated_and_names_its_strategy(name: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    path = CONFIGS / f"{name}.yaml"
    text = path.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert text.startswith("#") and len(header) >= 8, f"{path} needs its comment block"
    for topic in ("Pick", "Memory", "Speed", "Traps"):
        assert any(topic in line for line in header), f"{path}: comment block lacks {topic!r}"
    load_config_from_file(str(path))  # Accelerate 1.15's own schema
    assert strategies.strategy_from_config_file(path) == SHIPPED[name]


def test_every_shipped_config_is_covered() -> None:
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(SHIPPED)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"deepspeed_config__zero_stage": 4}, r"zero_stage='?4'?.*valid stages: \[0, 1, 2, 3\]"),
        ({"deepspeed_config__offload_optimizer_device": "disk"}, r"offload_optimizer_device='disk'.*'none', 'cpu'"),
        ({"deepspeed_config__deepspeed_config_file": "ds.json"}, r"ds.json.*deepspeed_config keys.*not supported"),
    ],
    ids=["zero_stage_4", "offload_disk", "deepspeed_json"],
)
def test_bad_deepspeed_config_is_refused(launched, changes: dict, message: str) -> None:
    path = launched("zero2", **changes)
    with pytest.raises(ConfigError, match=message):
        strategies.build_accelerator()
    with pytest.raises(ConfigError, match=message):
        strategies.strategy_from_config_file(path)


def test_fsdp1_is_refused(launched) -> None:
    path = launched("fsdp2_full_shard", fsdp_config__fsdp_version=1)
    with pytest.raises(ConfigError, match=r"fsdp_version='1'.*only runs FSDP2.*fsdp_version: 2"):
        strategies.build_accelerator()
    with pytest.raises(ConfigError, match="fsdp_version=1"):
        strategies.strategy_from_config_file(path)


def test_unsupported_strategy_is_refused(launched, tmp_path) -> None:
    launched("ddp", distributed_type="MEGATRON_LM")
    with pytest.raises(ConfigError, match=r"MEGATRON_LM is not supported.*'DEEPSPEED'"):
        strategies.build_accelerator()
    typo = tmp_path / "typo.yaml"
    typo.write_text("distributed_type: ZERO3\nnum_processes: 2\n")
    with pytest.raises(ConfigError, match=r"distributed_type='ZERO3'.*valid: \['NO', 'MULTI_CPU', 'MULTI_GPU'"):
        strategies.strategy_from_config_file(typo)


@pytest.mark.parametrize("config", ["cpu_single", "ddp", "zero2"])
def test_fp16_on_cpu_is_refused(launched, monkeypatch, config: str) -> None:
    launched(config)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # CPU even where a GPU exists
    with pytest.raises(ConfigError, match=r"fp16.*on CPU.*bf16.*GPU"):
        strategies.build_accelerator(mixed_precision="fp16")


def test_fp8_without_hopper_is_refused(launched, monkeypatch) -> None:
    launched("cpu_single")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    with pytest.raises(ConfigError, match=r"fp8.*compute capability >= 8.9"):
        strategies.build_accelerator(mixed_precision="fp8")


def test_unknown_mixed_precision_is_refused(launched) -> None:
    launched("cpu_single")
    with pytest.raises(ConfigError, match=r"mixed_precision='fp4' is unknown.*'bf16'"):
        strategies.build_accelerator(mixed_precision="fp4")


def test_layer_classes_resolve_from_no_split_modules() -> None:
    model = tiny_model("llama")
    assert [cls.__name__ for cls in strategies.resolve_layer_classes(model)] == ["LlamaDecoderLayer"]
    named = strategies.resolve_layer_classes(model, "LlamaDecoderLayer")
    assert [cls.__name__ for cls in named] == ["LlamaDecoderLayer"]


def test_unresolvable_layer_class_names_the_model_layers() -> None:
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match=r"GPT2Block.*not in LlamaForCausalLM.*\['LlamaDecoderLayer'\]"):
        strategies.resolve_layer_classes(model, ["GPT2Block"])
    model._no_split_modules = ["NoSuchLayer"]
    with pytest.raises(ConfigError, match=r"NoSuchLayer.*fsdp_transformer_layer_cls_to_wrap.*\['LlamaDecoderLayer'\]"):
        strategies.resolve_layer_classes(model)


def test_single_process_accelerator(launched, fresh_accelerate_state, caplog) -> None:
    launched("cpu_single")
    accelerator = strategies.build_accelerator(gradient_accumulation_steps=3, seed=7)
    assert strategies.strategy_name(accelerator) == "single"
    assert accelerator.gradient_accumulation_steps == 3
    assert accelerator.gradient_state.sync_with_dataloader is False
    assert accelerator.step_scheduler_with_optimizer is False
    with caplog.at_level(logging.WARNING, logger=strategies.__name__):
        strategies.check_model(tiny_model("llama").to(torch.bfloat16), accelerator)
    assert "bfloat16" in caplog.text and "mixed_precision='bf16'" in caplog.text


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(2, 34).reshape(2, 16)).logits


def test_save_consolidated_model_replaces_atomically(launched, fresh_accelerate_state, tmp_path, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    launched("cpu_single")
    accelerator = strategies.build_accelerator()
    model = accelerator.prepare(tiny_model("llama", seed=3).eval())
    out = tmp_path / "final"
    stale = tmp_path / "final.tmp-save"
    stale.mkdir()
    (stale / "junk.bin").write_bytes(b"x")
    out.mkdir()
    (out / "old-file.txt").write_text("previous run")

    assert strategies.save_consolidated_model(accelerator, model, out, tokenizer=tokenizer) == out
    assert not stale.exists() and not (out / "old-file.txt").exists()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    torch.testing.assert_close(_logits(reloaded), _logits(model), atol=1e-6, rtol=0)


def test_save_consolidated_model_refuses_empty_weights(launched, fresh_accelerate_state, tmp_path, monkeypatch) -> None:
    launched("cpu_single")
    accelerator = strategies.build_accelerator()
    model = accelerator.prepare(tiny_model("llama"))
    # What ZeRO-3 returns when the partitioned weights are not gathered: zero-size tensors.
    empty = {name: torch.empty(0) for name in model.state_dict()}
    monkeypatch.setattr(accelerator, "get_state_dict", lambda _model: empty)
    with pytest.raises(strategies.ConsolidationError, match=r"tensors are empty \(zero-size\)"):
        strategies.save_consolidated_model(accelerator, model, tmp_path / "final")
    assert not (tmp_path / "final").exists()


def test_plain_tensors_unwraps_fp8_training_weights_for_safetensors(tmp_path) -> None:
    # Under FSDP2 + torchao fp8, the gathered state dict holds WeightWithDynamicFloat8CastTensor; safetensors
    # refuses it ("invalid python storage"), which broke the fp8 recipe's final save on an H200.
    safetensors_torch = pytest.importorskip("safetensors.torch")
    fp8 = pytest.importorskip("torchao.float8")
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    weight = torch.randn(4, 4)
    wrapped = WeightWithDynamicFloat8CastTensor(weight, fp8.Float8LinearConfig(), torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match="invalid python storage"):
        safetensors_torch.save_file({"w": wrapped}, tmp_path / "direct.safetensors")

    plain = strategies.plain_tensors({"w": wrapped, "b": torch.ones(3)})
    assert type(plain["w"]) is torch.Tensor and torch.equal(plain["w"], weight)
    safetensors_torch.save_file(plain, tmp_path / "plain.safetensors")
    torch.testing.assert_close(safetensors_torch.load_file(tmp_path / "plain.safetensors")["w"], weight)
