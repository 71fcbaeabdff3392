"""The training recipe end to end in single-process runs: outputs, resume, and clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_optim.training.data import builtin_corpus
from tests.helpers import REPO_ROOT

RECIPE = REPO_ROOT / "recipes" / "train_clm.py"
TINY = [
    "model_config.model_type=llama", "model_config.hidden_size=32", "model_config.intermediate_size=64",
    "model_config.num_hidden_layers=2", "model_config.num_attention_heads=4", "model_config.num_key_value_heads=2",
    "model_config.vocab_size=384", "block_size=32", "micro_batch_size=4", "gradient_accumulation_steps=2",
    "learning_rate=3e-3", "warmup_steps=2", "log_every_n_steps=1", "eval_max_batches=4", "validation_split=0.1",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(builtin_corpus()[:12]))
    return path


def run_recipe(corpus: Path, output_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(RECIPE), *TINY, f"train_files=[{corpus}]", f"output_dir={output_dir}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(output_dir.parent / "hf_datasets_cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def losses(output_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_recipe_trains_and_writes_every_output(corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    run_recipe(corpus, out, "max_steps=12", "eval_every_n_steps=6")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    train_records = [r for r in log if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 13))
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] is not None for r in train_records)
    assert [r["step"] for r in log if "eval_loss" in r] == [6, 12]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["eval_perplexity"] > 1
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 2 and len(tokenizer) == model.config.vocab_size
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000012"]


def test_resume_from_latest_gives_the_same_losses(corpus, tmp_path):
    full = tmp_path / "full"
    run_recipe(corpus, full, "max_steps=8", "save_every_n_steps=4", "keep_last_k=5")
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]

    # A run killed after its step-4 checkpoint, and while writing step 8 (the .tmp folder is what a kill leaves)
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-00000004", killed / "checkpoints" / "step-00000004")
    shutil.copytree(full / "tokenizer", killed / "tokenizer")
    (killed / "checkpoints" / "step-00000008.tmp").mkdir()
    run_recipe(corpus, killed, "max_steps=8", "save_every_n_steps=4", "keep_last_k=5", "resume_from=latest")

    expected, resumed = losses(full), losses(killed)
    assert sorted(resumed) == [5, 6, 7, 8]
    for step in resumed:
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), (step, resumed[step], expected[step])


def test_resume_errors_are_clear(corpus, tmp_path):
    out = tmp_path / "fresh"
    proc = run_recipe(corpus, out, "max_steps=2", "resume_from=latest", check=False)
    assert proc.returncode == 2 and "holds no complete checkpoint" in proc.stderr

    run_recipe(corpus, out, "max_steps=2")
    checkpoint = out / "checkpoints" / "step-00000002"
    weights = next(checkpoint.glob("model*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a full disk
    proc = run_recipe(corpus, out, "max_steps=4", f"resume_from={checkpoint}", check=False)
    assert proc.returncode == 2 and "could not be loaded" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train_files=[missing.txt]"], "'missing.txt' does not exist"),
        (["max_steps=0"], "max_steps=0 must be >= 1"),
        (["mixed_precision=fp4"], "mixed_precision='fp4' is not one of"),
        (["global_batch_size=6"], "global_batch_size=6 is not divisible"),
        (["gradient_checkpointng=full"], "Did you mean 'gradient_checkpointing'"),
        (["model_config.model_type=llamma"], "model_config is not a valid 'llamma' config"),
    ],
)
def test_recipe_bad_input_gets_one_clear_line(corpus, tmp_path, overrides, message):
    proc = run_recipe(corpus, tmp_path / "bad", *overrides, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_recipe_fine_tunes_a_real_pretrained_model_from_a_local_folder(stories260k_dir, shared_dir, tmp_path):
    """stories260K is a real pretrained Llama: its held-out TinyStories perplexity must stay near 4.5, not ~512."""
    out = tmp_path / "finetune"
    cmd = [
        sys.executable, str(RECIPE), "--config", str(REPO_ROOT / "recipes" / "configs" / "stories260k_finetune.yaml"),
        f"model={stories260k_dir}", f"train_files=[{shared_dir / 'corpora' / 'tinystories' / 'niklas6_tinystories.txt'}]",
        f"output_dir={out}", "max_steps=3", "learning_rate=1e-5", "eval_max_batches=8", "save_every_n_steps=0",
        "eval_every_n_steps=0",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert 3.0 < summary["eval_perplexity"] < 8.0, summary


def test_recipe_gradual_pruning_follows_the_schedule_and_keeps_masks(corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    run_recipe(corpus, out, "max_steps=10", "pruning_final_sparsity=0.5", "pruning_begin_step=2",
               "pruning_end_step=6", "pruning_frequency=2")
    log = {r["step"]: r for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r}
    assert log[1]["sparsity"] == 0.0 and log[10]["sparsity"] == pytest.approx(0.5)
    assert 0.0 < log[4]["sparsity"] < 0.5  # cubic ramp: updated at steps 2 (s=0), 4 and 6 (s=0.5)
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    for layer in model.model.layers:  # pruned weights stayed exactly zero through the last 4 optimizer steps
        for proj in (layer.self_attn.q_proj, layer.mlp.down_proj):
            assert (proj.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert (model.lm_head.weight == 0).float().mean().item() < 0.01


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["cpu_multi", "fsdp2_full_shard", "zero3"])
def test_recipe_under_accelerate_launch_with_two_processes(corpus, tmp_path, strategy):
    """The user path: `accelerate launch --config_file accelerate_configs/<strategy>.yaml recipes/train_clm.py ...`,
    ending in a consolidated folder that from_pretrained loads (ZeRO-3 and FSDP2 shard the weights while training)."""
    from transformers import AutoModelForCausalLM

    from tests.helpers import free_port

    out = tmp_path / strategy
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(REPO_ROOT / "accelerate_configs" / f"{strategy}.yaml"), "--num_processes", "2",
        "--main_process_port", str(free_port()), str(RECIPE), *TINY, f"train_files=[{corpus}]", f"output_dir={out}",
        "max_steps=4", "save_every_n_steps=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(REPO_ROOT / ".torch_extensions"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets_cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["strategy"] != "single"
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert all(p.numel() > 0 and torch.isfinite(p).all() for p in model.parameters())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
