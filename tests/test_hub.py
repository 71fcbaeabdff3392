"""Hub publishing: the file list, the model card, and a one-commit push to the loopback fake Hub (tests/fake_hub.py).

No test reaches the real Hub: pushes go to a FakeHub on 127.0.0.1 and name resolution of any other host fails.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import hf_optim
from hf_optim.core.errors import ConfigError
from hf_optim.hub import HubPushError, publishable_files
from tests.fake_hub import FakeHub
from tests.helpers import REPO_ROOT, local_tokenizer, tiny_model

TOKEN = "hf_loopbackSECRETtoken0123456789"
HF_OPTIM_CLI = Path(sys.executable).with_name("hf-optim")
JUNK = [".DS_Store", "__pycache__/storage.cpython-311.pyc", "notes.tmp", "model.safetensors.tmp-4242", ".model.lock",
        "sub/.hidden", "scratch.tmp/inside.txt", ".cache/huggingface/upload.lock", "editor.swp"]
PUBLISHED = ["README.md", "config.json", "extra/notes.txt", "generation_config.json", "hf_optim.json",
             "model.safetensors", "packed_weights.safetensors", "tokenizer.json", "tokenizer_config.json"]


def _metadata(card_text: str) -> dict:
    return yaml.safe_load(card_text.split("---")[1])


@pytest.fixture(scope="module")
def saved_variant(tmp_path_factory) -> Path:
    """A pruned + int4-packed tiny Llama written by save_optimized, plus files that must never be published."""
    model = tiny_model("llama")
    hf_optim.prune(model, hf_optim.MagnitudeConfig(sparsity=0.5))
    hf_optim.quantize(model, hf_optim.Int4WeightOnlyConfig(group_size=32))
    out = hf_optim.save_optimized(model, tmp_path_factory.mktemp("variants") / "magnitude50-int4",
                                  tokenizer=local_tokenizer(), metrics={"perplexity": 12.5},
                                  base_model="local/tiny-llama")
    for junk in JUNK:
        (out / junk).parent.mkdir(parents=True, exist_ok=True)
        (out / junk).write_text("not for the Hub")
    (out / "extra").mkdir()
    (out / "extra" / "notes.txt").write_text("a nested file that is published")
    return out


@pytest.fixture
def variant(saved_variant, tmp_path) -> Path:
    return Path(shutil.copytree(saved_variant, tmp_path / saved_variant.name))


@pytest.fixture
def no_real_network(monkeypatch):
    """Name resolution of anything but the loopback fails, so a stray request to huggingface.co cannot leave."""
    resolve = socket.getaddrinfo

    def loopback_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise OSError(f"test blocks network access to {host!r}")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)


@pytest.fixture
def hub(monkeypatch, tmp_path, no_real_network):
    """A FakeHub that wants TOKEN, with huggingface_hub pointed at it and online (the Makefile sets offline)."""
    from huggingface_hub import constants

    with FakeHub(token=TOKEN) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")  # the fake speaks LFS, not Xet
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)  # huggingface_hub reads these at import time
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
        yield fake


def test_publishable_files_skip_hidden_temporary_and_cache_files(variant):
    assert publishable_files(variant) == PUBLISHED


def test_model_card_of_a_saved_variant(variant):
    card = (variant / "README.md").read_text()
    meta = _metadata(card)
    assert meta["base_model"] == "local/tiny-llama" and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    expected_tags = {"hf-optim", "magnitude", "int4-weight-only", "pruned", "quantized", "4-bit", "sparsity-50"}
    assert expected_tags <= set(meta["tags"])
    assert card.startswith("---\n") and "# magnitude50-int4" in card  # named after the folder, not the staging dir
    recipe = yaml.safe_load(card.split("```yaml")[1].split("```")[0])
    assert [s["method"] for s in recipe["steps"]] == ["magnitude", "int4_weight_only"]
    assert "| perplexity | 12.5 |" in card
    assert "hf_optim.load_optimized(path)" in card and 'snapshot_download("<repo-id>")' in card
    assert "Not measured: latency / throughput." in card and "Not measured: perplexity" not in card


def test_card_relation_library_and_loading_follow_the_folder(tmp_path):
    pruned = tiny_model("llama")
    hf_optim.prune(pruned, hf_optim.MagnitudeConfig(sparsity=0.25))
    card = hf_optim.save_optimized(pruned, tmp_path / "pruned", base_model="org/base") / "README.md"
    meta = _metadata(card.read_text())
    assert meta["base_model_relation"] == "finetune" and "sparsity-25" in meta["tags"]
    assert not any(tag.endswith("-bit") for tag in meta["tags"])
    assert 'AutoModelForCausalLM.from_pretrained("<repo-id>")' in card.read_text()

    onnx = tmp_path / "onnx-int8"
    onnx.mkdir()
    (onnx / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (onnx / "model.onnx").write_bytes(b"\x08\x07")
    (onnx / "quantization.json").write_text(json.dumps({"mode": "dynamic-int8", "parity": {"top1_agreement": 0.97}}))
    card = hf_optim.build_model_card(onnx, base_model="org/base")
    assert card.data.library_name == "onnx" and card.data.base_model_relation == "quantized"
    assert {"onnx", "8-bit", "onnxruntime-dynamic-int8"} <= set(card.data.tags)
    assert "hf_optim.OnnxCausalLM.from_pretrained" in card.text
    assert "| top1_agreement_vs_fp32_onnx | 0.97 |" in card.text

    (onnx / "adapter_config.json").write_text("{}")
    assert hf_optim.build_model_card(onnx, base_model="org/base").data.base_model_relation == "adapter"
    assert hf_optim.build_model_card(onnx).data.base_model is None  # unknown base: no base_model, no relation
    assert getattr(hf_optim.build_model_card(onnx).data, "base_model_relation", None) is None


def test_update_model_card_replaces_its_sections_and_keeps_hand_edits(variant):
    path = variant / "README.md"
    path.write_text(path.read_text() + "\n## Notes by hand\n\nKeep me.\n")
    recipe = {"name": "magnitude50-int4", "steps": [{"method": "magnitude", "sparsity": 0.5}], "budget": "+2% ppl"}
    hf_optim.update_model_card(variant, {"perplexity": 13.25, "latency_ms": 4.5, "size_mb": "0.41"}, recipe)
    once = path.read_text()
    hf_optim.update_model_card(variant, {"perplexity": 13.25, "latency_ms": 4.5, "size_mb": "0.41"}, recipe)
    assert path.read_text() == once  # idempotent
    assert once.count("## Measured metrics") == 1 and once.count("## Recipe") == 1 and once.count("## Limits") == 1
    assert "| perplexity | 13.25 |" in once and "| perplexity | 12.5 |" not in once and "| size_mb | 0.41 |" in once
    assert "Not measured: latency" not in once and "Not measured: size" not in once
    assert "Not measured: agreement with the base model." in once
    assert "budget: +2% ppl" in once and "int4_weight_only" not in once.split("## Recipe")[1].split("<!--")[0]
    assert "Keep me." in once and _metadata(once)["base_model_relation"] == "quantized"
    assert not [p for p in variant.iterdir() if ".tmp" in p.name and p.name.startswith(".README")]

    hf_optim.update_model_card(variant, {"agreement_top1": 0.91})  # metrics only: the recipe stays
    again = path.read_text()
    assert "| agreement_top1 | 0.91 |" in again and "| perplexity |" not in again and "budget: +2% ppl" in again


def test_update_model_card_writes_a_card_where_there_is_none(variant):
    (variant / "README.md").unlink()
    hf_optim.update_model_card(variant, {"perplexity": 9.0}, {"name": "magnitude-int4"}, base_model="org/base")
    card = (variant / "README.md").read_text()
    assert _metadata(card)["base_model"] == "org/base" and "| perplexity | 9 |" in card
    assert "# magnitude-int4\n" in card  # the recipe's variant name, not the (possibly staging) folder's


def test_push_uploads_the_folder_in_one_commit(variant, hub, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    result = hf_optim.push_to_hub(variant, "me/tiny-int4", private=True, commit_message="First upload")
    assert hub.unexpected == [] and len(hub.commits) == 1
    commit = hub.commits[0]
    assert commit["repo_id"] == "me/tiny-int4" and commit["revision"] == "main" and commit["summary"] == "First upload"
    assert sorted(commit["files"]) == PUBLISHED == result.files
    for name in PUBLISHED:
        expected = (variant / name).read_bytes()
        if name == "README.md":  # the uploaded card names its repo in the load snippets
            expected = expected.replace(b"<repo-id>", b"me/tiny-int4")
        assert commit["files"][name] == expected, name
    card = commit["files"]["README.md"].decode()
    assert 'snapshot_download("me/tiny-int4")' in card and _metadata(card)["base_model"] == "local/tiny-llama"
    assert hub.repos["me/tiny-int4"]["private"] is True
    lfs_puts = [path for method, path in hub.requests if method == "PUT"]
    assert len(lfs_puts) == 2  # both safetensors files went through the LFS batch + PUT path
    paths = [path for _, path in hub.requests]
    assert paths.index("/api/repos/create") < paths.index("/api/models/me/tiny-int4/commit/main")
    assert result.commit_oid == commit["oid"] and result.commit_url.endswith(commit["oid"])
    assert "<repo-id>" in (variant / "README.md").read_text()  # the local card is left as it was
    out, err = capsys.readouterr()
    assert TOKEN not in caplog.text + out + err + repr(result)


def test_push_creates_a_missing_branch_and_reuses_the_repo(variant, hub):
    hf_optim.push_to_hub(variant, "me/tiny-int4")
    shutil.copy(variant / "hf_optim.json", variant.parent / "first.json")
    (variant / "hf_optim.json").write_text('{"changed": true}')
    result = hf_optim.push_to_hub(variant, "me/tiny-int4", revision="v2")
    assert result.revision == "v2" and [c["revision"] for c in hub.commits] == ["main", "v2"]
    assert ("POST", "/api/models/me/tiny-int4/branch/v2") in hub.requests
    branches = hub.repos["me/tiny-int4"]["branches"]
    assert branches["v2"]["hf_optim.json"] == b'{"changed": true}'
    assert branches["main"]["hf_optim.json"] == (variant.parent / "first.json").read_bytes()  # main kept the first
    pr = hf_optim.push_to_hub(variant, "me/tiny-int4", revision="v2", create_pr=True)
    assert pr.pr_url.endswith("/discussions/1") and hub.commits[-1]["create_pr"]
    assert hub.unexpected == []


def test_push_refuses_bad_input_before_sending_anything(variant, hub, tmp_path, monkeypatch, caplog):
    from huggingface_hub import constants

    for repo_id in ("tiny-int4", "me/tiny--int4", "me/a/b", "me/../x", "me/name.git", ""):
        with pytest.raises(ConfigError, match="is not a Hub repo id"):
            hf_optim.push_to_hub(variant, repo_id, dry_run=True)
    (variant / "README.md").unlink()
    with pytest.raises(ConfigError, match="not a variant folder: no README.md model card"):
        hf_optim.push_to_hub(variant, "me/x")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="no config.json; no model file"):
        hf_optim.push_to_hub(bare, "me/x", dry_run=True)
    assert hf_optim.push_to_hub(bare, "me/x", dry_run=True, force=True).files == ["notes.txt"]

    hf_optim.update_model_card(variant, {"perplexity": 9.0}, base_model=str(tmp_path))  # a local path
    with pytest.raises(ConfigError, match="is not a Hub model id"):
        hf_optim.push_to_hub(variant, "me/x")
    caplog.set_level(logging.WARNING)
    assert hf_optim.push_to_hub(variant, "me/x", dry_run=True).files  # a dry run lists the files and warns
    assert "A real push would be refused" in caplog.text
    hf_optim.update_model_card(variant, base_model="org/base")

    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ConfigError, match="No Hugging Face token"):
        hf_optim.push_to_hub(variant, "me/x")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE=1"):
        hf_optim.push_to_hub(variant, "me/x", token=TOKEN)
    assert hub.requests == []


def test_push_with_force_and_hub_errors(variant, hub, tmp_path):
    (variant / "README.md").unlink()
    result = hf_optim.push_to_hub(variant, "me/no-card", force=True)
    assert "README.md" not in hub.commits[0]["files"] and sorted(hub.commits[0]["files"]) == result.files
    with pytest.raises(HubPushError, match="401") as raised:
        hf_optim.push_to_hub(variant, "me/no-card", token="hf_wrong", force=True)
    assert "hf_wrong" not in str(raised.value)
    hf_optim.update_model_card(variant, {"perplexity": 9.0}, base_model="org/base")
    card = variant / "README.md"
    card.write_text(card.read_text().replace("base_model_relation: quantized", "base_model_relation: distilled"))
    with pytest.raises(HubPushError, match="base_model_relation"):  # the Hub's YAML check; we warn locally too
        hf_optim.push_to_hub(variant, "me/no-card", force=True)
    assert len(hub.commits) == 1


def _cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    # Any request that escapes the loopback goes to a dead proxy instead of the internet.
    env.update(HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", ALL_PROXY="http://127.0.0.1:9",
               NO_PROXY="127.0.0.1,localhost", HF_HUB_DISABLE_XET="1", **extra)
    return env


def test_cli_dry_run_prints_one_path_per_line_and_sends_nothing(variant, tmp_path):
    with FakeHub(token=TOKEN) as fake:
        env = _cli_env(HF_ENDPOINT=fake.url, HF_HOME=str(tmp_path / "hf_home"), HF_TOKEN=TOKEN, HF_HUB_OFFLINE="1")
        run = subprocess.run([str(HF_OPTIM_CLI), "push", str(variant), "--repo-id", "user/name", "--dry-run"],
                             check=False, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
        assert fake.requests == []
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == PUBLISHED and run.stdout.endswith("\n")
    assert "would upload these 9 files to user/name" in run.stderr and TOKEN not in run.stdout + run.stderr


def test_cli_push_to_the_loopback_hub_keeps_the_token_out_of_the_output(variant, tmp_path):
    with FakeHub(token=TOKEN) as fake:
        env = _cli_env(HF_ENDPOINT=fake.url, HF_HOME=str(tmp_path / "hf_home"), HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0")
        run = subprocess.run([str(HF_OPTIM_CLI), "push", str(variant), "--repo-id", "user/name", "--revision", "exp"],
                             check=False, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
        assert run.returncode == 0, run.stderr
        assert [c["revision"] for c in fake.commits] == ["exp"] and sorted(fake.commits[0]["files"]) == PUBLISHED
        assert fake.unexpected == []
    assert run.stdout.startswith("Uploaded 9 files to user/name (exp) in one commit: http://127.0.0.1:")
    assert TOKEN not in run.stdout + run.stderr
    bad = subprocess.run([str(HF_OPTIM_CLI), "push", str(variant), "--repo-id", "user--name", "--dry-run"],
                         check=False, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
    assert bad.returncode == 2 and bad.stdout == "" and "is not a Hub repo id" in bad.stderr
