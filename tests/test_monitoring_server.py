"""The model server over real loopback HTTP: generate, /metrics, drift + alerts + retraining, bad requests, load."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hf_optim.monitoring.collector import TrafficSample
from hf_optim.monitoring.profile import ReferenceProfile
from hf_optim.monitoring.server import BackgroundServer, ServedModel, create_app, request_quality
from hf_optim.training.data import builtin_corpus
from tests.helpers import REPO_ROOT, free_port, local_tokenizer, tiny_model
from tests.test_monitoring_alerts import WebhookReceiver


def _prose() -> list[str]:
    """English prose paragraphs of Python's own documentation (ships with CPython: no download)."""
    paragraphs = (re.sub(r"\s+", " ", p).strip() for doc in builtin_corpus() for p in doc.split("\n\n"))
    return [p for p in paragraphs if 60 <= len(p) <= 300 and not p.startswith((">>>", "*", "=", "-"))
            and sum(c.isalpha() or c == " " for c in p) / len(p) > 0.9]


def _random_characters(count: int, seed: int = 0) -> list[str]:
    """Shifted traffic: strings of random letters, digits and symbols, as long as the prose."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyzXYZ0123456789{}[]()<>#$%&*+=/\\|~^;:!?"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(60, 200))) for _ in range(count)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("served") / "model"
    tiny_model("llama").save_pretrained(path)
    local_tokenizer().save_pretrained(path)
    return path


def _metrics(url: str) -> dict[str, dict]:
    """Scrape /metrics and parse it: family name -> {(sample name, labels): value}."""
    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        family.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        for family in text_string_to_metric_families(response.text)
    }


def test_generate_and_scrape_metrics(model_dir, tmp_path):
    traffic = tmp_path / "traffic.jsonl"
    with BackgroundServer(create_app(model_dir, traffic_log=str(traffic)), port=free_port()) as url:
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["backend"] == "pytorch"
        answers = [httpx.post(f"{url}/generate", json={"prompt": prompt, "max_new_tokens": 6}, timeout=60)
                   for prompt in ("Once upon a time", "The cat sat on the mat")]
        sampled = httpx.post(f"{url}/generate", json={"prompt": "Hello", "max_new_tokens": 5, "do_sample": True,
                                                      "temperature": 0.8}, timeout=60)
        families = _metrics(url)
    for response in [*answers, sampled]:
        assert response.status_code == 200, response.text
        body = response.json()
        assert isinstance(body["text"], str) and 1 <= body["output_tokens"] <= 6 and body["prompt_tokens"] >= 1
        assert body["finish_reason"] in ("stop", "length")
        assert body["timings"]["total_s"] >= body["timings"]["generate_s"] > 0
    greedy = answers[0].json()
    if greedy["output_tokens"] > 1:
        assert 0 < greedy["timings"]["time_to_first_token_s"] < greedy["timings"]["generate_s"]
        assert greedy["timings"]["time_per_output_token_s"] > 0
    generated = sum(r.json()["output_tokens"] for r in [*answers, sampled])
    assert families["hf_optim_generated_tokens"][("hf_optim_generated_tokens_total", ())] == generated
    assert families["hf_optim_request_duration_seconds"][("hf_optim_request_duration_seconds_count", ())] == 3
    assert families["hf_optim_requests"][("hf_optim_requests_total", (("status", "ok"),))] == 3
    assert families["hf_optim_requests_in_flight"][("hf_optim_requests_in_flight", ())] == 0
    assert families["hf_optim_time_to_first_token_seconds"][("hf_optim_time_to_first_token_seconds_count", ())] == 3
    assert families["process_resident_memory_bytes"][("process_resident_memory_bytes", ())] > 10e6
    assert families["hf_optim_monitoring_samples"][("hf_optim_monitoring_samples_total", ())] == 3
    lines = [json.loads(line) for line in traffic.read_text().splitlines()]
    assert [line["text"] for line in lines] == ["Once upon a time", "The cat sat on the mat", "Hello"]
    assert lines[0]["output"] == greedy["text"]


BAD_REQUESTS = [
    (b'{"prompt": "unterminated', 400, "invalid_json"),
    (b'["a", "list"]', 422, "invalid_request"),
    (b'{"max_new_tokens": 4}', 422, "invalid_request"),  # prompt missing
    (b'{"prompt": 42}', 422, "invalid_request"),
    (b'{"prompt": "hi", "max_new_tokens": "4"}', 422, "invalid_request"),
    (b'{"prompt": "hi", "do_sample": "yes"}', 422, "invalid_request"),
    (b'{"prompt": "hi", "temperature": -1}', 422, "invalid_request"),
    (b'{"prompt": "hi", "max_tokens": 4}', 422, "invalid_request"),  # a typo is not ignored
    (b'{"prompt": ""}', 422, "invalid_request"),
    (b'{"prompt": "hi", "max_new_tokens": 65}', 422, "max_new_tokens_too_large"),
    (json.dumps({"prompt": "word " * 500}).encode(), 413, "prompt_too_long"),
    (b'{"prompt": "' + b"x" * 100_000 + b'"}', 413, "prompt_too_long"),  # refused while reading the body
]


def test_bad_requests_get_4xx_and_the_server_stays_up(model_dir):
    app = create_app(model_dir, max_new_tokens_limit=64, max_prompt_chars=2000, monitoring=False)
    with BackgroundServer(app, port=free_port()) as url, httpx.Client(base_url=url, timeout=60) as client:
        for body, status, reason in BAD_REQUESTS:
            response = client.post("/generate", content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == status, (body[:60], response.text)
            error = response.json()["error"]
            assert error["type"] == reason and error["message"]
        # the tiny model's context is 256 tokens: a prompt of 220 fits, but not with 64 new tokens
        prompt = ""
        while len(local_tokenizer()(prompt)["input_ids"]) < 220:
            prompt += "zq7 "
        assert client.post("/generate", json={"prompt": prompt, "max_new_tokens": 8}).status_code == 200
        response = client.post("/generate", json={"prompt": prompt, "max_new_tokens": 64})
        assert response.status_code == 413 and "context" in response.json()["error"]["message"]
        assert client.get("/health").json()["status"] == "ok"
        assert client.post("/generate", json={"prompt": "Still here?", "max_new_tokens": 3}).status_code == 200
        families = _metrics(url)
    errors = {dict(labels)["reason"]: value for (_, labels), value in families["hf_optim_errors"].items()}
    assert errors["invalid_json"] == 1 and errors["invalid_request"] == 8 and errors["prompt_too_long"] == 3
    assert errors["max_new_tokens_too_large"] == 1
    assert families["hf_optim_requests"][("hf_optim_requests_total", (("status", "client_error"),))] == 13


@pytest.fixture(scope="module")
def prose_profile(model_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """A profile of English prose under the served tokenizer, with the served model's quality numbers."""
    prose = _prose()
    reference, held_back = prose[0::2], prose[1::2]
    served = ServedModel.load(model_dir)
    samples = []
    for prompt in reference[:40]:
        ids = served.encode(prompt)
        generation = served.generate(ids, max_new_tokens=4)
        samples.append(TrafficSample(prompt, generation.text, len(ids), len(generation.new_ids),
                                     generation.finish_reason, 4, token_ids=ids + generation.new_ids))
    quality = request_quality(served.model, samples, {"output_entropy", "output_logprob", "truncated_output"},
                              pad_id=served.pad_id)
    profile = ReferenceProfile.fit(reference, tokenizer=str(model_dir), embeddings=False, model=served.model,
                                   numeric_features=quality)
    path = profile.save(tmp_path_factory.mktemp("profile") / "prose.npz")
    return path, held_back


def _wait_for_windows(client: httpx.Client, count: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.get("/monitoring").json()
        if state["collector"]["windows"] >= count:
            return state
        time.sleep(0.05)
    raise AssertionError(f"monitoring did not finish {count} windows: {state}")


def test_shifted_traffic_raises_drift_alerts_and_retraining(model_dir, prose_profile, tmp_path):
    profile, held_back = prose_profile
    marker = tmp_path / "retrain-started.txt"
    retrain = f"{sys.executable} -c \"import sys; open(sys.argv[1], 'w').write(sys.argv[2])\" {marker} {{traffic}}"
    called = []
    with WebhookReceiver() as receiver:
        app = create_app(
            model_dir, reference_profile=str(profile), window_size=8, window_seconds=None, traffic_log=str(
                tmp_path / "traffic.jsonl"), alert_webhooks=[receiver.url], retrain_command=retrain,
            retrain_after_windows=2, alert_callbacks=[called.append],
        )
        with BackgroundServer(app, port=free_port()) as url, httpx.Client(base_url=url, timeout=60) as client:
            for prompt in held_back[:8]:  # healthy traffic: same source as the reference
                assert client.post("/generate", json={"prompt": prompt, "max_new_tokens": 4}).status_code == 200
            healthy = _wait_for_windows(client, 1)["result"]
            for prompt in _random_characters(16):  # shifted traffic
                assert client.post("/generate", json={"prompt": prompt, "max_new_tokens": 4}).status_code == 200
            state = _wait_for_windows(client, 3)
            families = _metrics(url)
            assert receiver.arrived.wait(10)
    assert healthy["drift"] is False, healthy["alerts"]
    names = {m["name"] for m in healthy["metrics"]}
    assert {"token_js_divergence", "non_alpha_share", "prompt_perplexity", "output_entropy",
            "truncated_output"} <= names
    shifted = state["result"]
    assert shifted["drift"] is True and shifted["n"] == 8
    assert "non_alpha_share" in shifted["alerts"] and "token_js_divergence" in shifted["alerts"]
    assert state["collector"]["dropped"] == 0 and state["collector"]["processed"] == 24
    # each alerting metric notified once (windows 2 and 3 are one incident), to the webhook and the callable
    hooked = [hook["body"]["metric"] for hook in receiver.received]
    assert sorted(hooked) == sorted(set(hooked)) == sorted(alert.metric for alert in called)
    assert "non_alpha_share" in hooked and {a["metric"] for a in state["alerts"]} == set(hooked)
    # two consecutive alerting windows started the retraining command on a snapshot of the traffic log
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    snapshot = Path(marker.read_text())
    assert snapshot.parent == tmp_path and len(snapshot.read_text().splitlines()) >= 16
    assert state["retrain"]["runs"] and families["hf_optim_retrain_runs"][("hf_optim_retrain_runs_total", ())] == 1
    assert families["hf_optim_monitoring_drift"][("hf_optim_monitoring_drift", ())] == 1
    value = families["hf_optim_monitoring_metric_alert"]
    assert value[("hf_optim_monitoring_metric_alert", (("kind", "drift"), ("metric", "non_alpha_share")))] == 1
    # every metric the Grafana dashboard plots is exported (GPU memory only where CUDA is)
    dashboard = (REPO_ROOT / "scripts" / "grafana_dashboard.json").read_text()
    plotted = set(re.findall(r"\b((?:hf_optim|process)_[a-z_]+)", dashboard))
    exported = {name for family in families.values() for name, _ in family}
    missing = {name for name in plotted - exported if "gpu_memory" not in name}
    assert not missing, f"dashboard plots metrics the server does not export: {sorted(missing)}"


def test_load_16_concurrent_clients(model_dir, tmp_path):
    app = create_app(model_dir, traffic_log=str(tmp_path / "traffic.jsonl"), window_size=8, max_pending_requests=64)
    process = psutil.Process()
    with BackgroundServer(app, port=free_port()) as url:
        def client_session(requests: int, index: int) -> list[int]:
            with httpx.Client(base_url=url, timeout=120) as client:
                return [client.post("/generate", json={"prompt": f"Client {index} asks question {i}",
                                                       "max_new_tokens": 6}).status_code for i in range(requests)]

        with ThreadPoolExecutor(16) as pool:  # warm-up round: allocator pools, lazy imports, thread stacks
            warm_up = [s for session in pool.map(client_session, [1] * 16, range(16)) for s in session]
        rss_before = process.memory_info().rss
        with ThreadPoolExecutor(16) as pool:
            statuses = [s for session in pool.map(client_session, [4] * 16, range(16)) for s in session]
        rss_growth = process.memory_info().rss - rss_before
        state = httpx.get(f"{url}/monitoring").json()
        families = _metrics(url)
    assert warm_up == [200] * 16 and statuses == [200] * 64
    assert rss_growth < 64 * 2**20, f"RSS grew by {rss_growth / 2**20:.1f} MiB over 64 requests"
    assert families["hf_optim_requests"][("hf_optim_requests_total", (("status", "ok"),))] == 80
    assert families["hf_optim_requests_in_flight"][("hf_optim_requests_in_flight", ())] == 0
    collector = state["collector"]
    assert collector["submitted"] + collector["dropped"] == 80 and collector["errors"] == 0
    assert len((tmp_path / "traffic.jsonl").read_text().splitlines()) == 80  # the log misses nothing


def test_shadow_comparison_of_the_served_model_against_its_base(model_dir, tmp_path):
    base = tmp_path / "base"
    tiny_model("llama", seed=1).save_pretrained(base)  # a different model: the comparison must see it
    local_tokenizer().save_pretrained(base)
    app = create_app(model_dir, shadow=str(base), shadow_sample_rate=1.0, window_size=4)
    with BackgroundServer(app, port=free_port()) as url, httpx.Client(base_url=url, timeout=60) as client:
        for prompt in ("Once upon a time", "There was a fox", "It was raining"):
            assert client.post("/generate", json={"prompt": prompt, "max_new_tokens": 5}).status_code == 200
        deadline = time.monotonic() + 30
        count = ("hf_optim_shadow_kl_divergence_count", ())
        while _metrics(url)["hf_optim_shadow_kl_divergence"][count] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        shadow = client.get("/monitoring").json()["shadow"]
        families = _metrics(url)
    assert shadow["compared"] == 3 and shadow["mean_kl"] > 0.01 and 0 <= shadow["mean_greedy_agreement"] < 1
    assert families["hf_optim_shadow_kl_divergence"][count] == 3


@pytest.mark.slow  # a fresh interpreter importing torch + transformers: ~20 s on a busy core
def test_serve_command_line(model_dir, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "hf_optim.cli", "serve", str(model_dir), "--port", str(port),
               "--max-new-tokens-limit", "16", "--traffic-log", str(tmp_path / "traffic.jsonl"),
               "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, server.stdout.read().decode()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "hf-optim serve did not come up"
                time.sleep(0.2)
        url = f"http://127.0.0.1:{port}"
        assert httpx.post(f"{url}/generate", json={"prompt": "Hi", "max_new_tokens": 3}, timeout=60).status_code == 200
        assert httpx.post(f"{url}/generate", json={"prompt": "Hi", "max_new_tokens": 17}).status_code == 422
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0].decode()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it so the exit status tells why it stopped
    assert server.returncode in (0, -15) and "Traceback" not in output, output
    assert json.loads((tmp_path / "traffic.jsonl").read_text())["text"] == "Hi"


def test_serves_an_onnx_export_like_pytorch(model_dir, tmp_path):
    from hf_optim.export.onnx import export_onnx

    export_onnx(model_dir, tmp_path / "onnx", validate=False)
    request = {"prompt": "Once upon a time", "max_new_tokens": 6}
    with BackgroundServer(create_app(model_dir, monitoring=False), port=free_port()) as url:
        expected = httpx.post(f"{url}/generate", json=request, timeout=60).json()
    with BackgroundServer(create_app(tmp_path / "onnx", monitoring=False), port=free_port()) as url:
        assert httpx.get(f"{url}/health").json()["backend"] == "onnx"
        answer = httpx.post(f"{url}/generate", json=request, timeout=60).json()
        sampled = httpx.post(f"{url}/generate", json={**request, "do_sample": True})
    assert answer["text"] == expected["text"] and answer["output_tokens"] == expected["output_tokens"]
    assert answer["timings"]["time_to_first_token_s"] is not None
    assert sampled.status_code == 422 and "greedily" in sampled.json()["error"]["message"]


def test_output_profile_adds_drift_metrics_of_the_generated_text(model_dir, prose_profile, tmp_path):
    # Reference *outputs* of English prose: the random tiny model never writes prose, so its generations drift
    # while its prompts (held-back prose) do not.
    profile, held_back = prose_profile
    output_profile = ReferenceProfile.fit(_prose()[0::2], tokenizer=str(model_dir), embeddings=False)
    output_path = output_profile.save(tmp_path / "outputs.npz")
    app = create_app(model_dir, reference_profile=str(profile), output_reference_profile=str(output_path),
                     window_size=8, window_seconds=None)
    with BackgroundServer(app, port=free_port()) as url, httpx.Client(base_url=url, timeout=60) as client:
        for prompt in held_back[:8]:
            assert client.post("/generate", json={"prompt": prompt, "max_new_tokens": 12}).status_code == 200
        result = _wait_for_windows(client, 1)["result"]
    prompt_alerts = [name for name in result["alerts"] if not name.startswith("output_")]
    output_names = {m["name"] for m in result["metrics"] if m["name"].startswith("output_")}
    assert {"output_token_js_divergence", "output_non_alpha_share"} <= output_names
    assert not [m for m in result["metrics"] if m["alert"] and m["kind"] == "drift" and m["name"] in prompt_alerts]
    assert result["drift"] is True and "output_token_js_divergence" in result["alerts"]
