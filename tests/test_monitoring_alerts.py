"""Alert sinks (log, webhook over loopback, callables), once-per-incident with cooldown, and the retraining trigger."""

from __future__ import annotations

import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from hf_optim.core.errors import ConfigError
from hf_optim.monitoring.alerts import AlertManager, LogSink, WebhookSink, build_sinks
from hf_optim.monitoring.retrain import RetrainTrigger
from tests.helpers import free_port


class WebhookReceiver:
    """A loopback HTTP server that records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        received, arrived = [], threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append({"path": self.path, "content_type": self.headers["Content-Type"],
                                 "body": json.loads(body)})
                arrived.set()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.received, self.arrived = received, arrived
        self._server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks/drift"

    def __enter__(self) -> WebhookReceiver:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def _result(*alerting: str, kind: str = "drift") -> SimpleNamespace:
    """A monitoring result whose ``alerts`` are the named metrics (what AlertManager and RetrainTrigger read)."""
    metrics = [SimpleNamespace(name=name, kind=kind, value=0.9, threshold=0.5, alert=True) for name in alerting]
    return SimpleNamespace(alerts=metrics, drift=bool(metrics) and kind == "drift")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_notification_per_incident():
    received = []
    manager = AlertManager([received.append], cooldown_s=0)
    for result in (_result("token_js"), _result("token_js"), _result("token_js", "char_length"), _result(),
                   _result("token_js")):
        manager.update(result)
    # token_js: incident 1 (windows 1-3), incident 2 (window 5); char_length: incident in window 3
    assert [(a.metric, a.window) for a in received] == [("token_js", 1), ("char_length", 3), ("token_js", 5)]
    assert received[0].to_dict()["message"].startswith("drift alert: token_js=0.9")


def test_cooldown_suppresses_a_flapping_metric():
    clock, received = FakeClock(), []
    manager = AlertManager([received.append], cooldown_s=60, clock=clock)
    manager.update(_result("token_js"))
    manager.update(_result())
    clock.now += 30
    manager.update(_result("token_js"))  # a new incident, but within the cooldown
    assert len(received) == 1
    manager.update(_result())
    clock.now += 31
    manager.update(_result("token_js"))
    assert len(received) == 2


def test_webhook_receives_json_body_and_a_broken_sink_does_not_stop_the_others(caplog):
    called = []
    with WebhookReceiver() as receiver:
        dead = WebhookSink(f"http://127.0.0.1:{free_port()}/nobody-listens", timeout_s=2)
        manager = AlertManager([dead, *build_sinks([receiver.url], [called.append])], cooldown_s=0)
        with caplog.at_level(logging.WARNING, logger="hf_optim.monitoring.alerts"):
            sent = manager.update(_result("prompt_perplexity", kind="quality"))
        assert receiver.arrived.wait(10)
    assert len(sent) == 1 and called == sent
    hook = receiver.received[0]
    assert hook["path"] == "/hooks/drift" and hook["content_type"] == "application/json"
    assert hook["body"]["metric"] == "prompt_perplexity" and hook["body"]["kind"] == "quality"
    assert hook["body"]["value"] == 0.9 and hook["body"]["threshold"] == 0.5
    assert manager.sink_failures == 1  # the dead webhook, logged and skipped
    assert any("quality alert: prompt_perplexity" in r.getMessage() for r in caplog.records)  # the LogSink line
    assert any("alert sink" in r.getMessage() and "failed" in r.getMessage() for r in caplog.records)


def test_bad_sink_settings_are_config_errors():
    with pytest.raises(ConfigError, match="http:// or https://"):
        WebhookSink("ftp://example.org/hook")
    with pytest.raises(ConfigError, match="cooldown"):
        AlertManager([LogSink()], cooldown_s=-1)


def _marker_command(marker) -> list[str]:
    # writes the traffic file it was given into the marker, and says so on stdout (for the log)
    code = ("import os, sys; open(sys.argv[1], 'w').write(os.environ.get('HF_OPTIM_TRAFFIC_LOG', '')); "
            "print('retraining on', sys.argv[2])")
    return [sys.executable, "-c", code, str(marker), "{traffic}"]


def test_retrain_starts_after_k_consecutive_windows_with_a_traffic_snapshot(tmp_path):
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "partial')  # a line still being written
    marker, log = tmp_path / "marker.txt", tmp_path / "retrain.log"
    trigger = RetrainTrigger(_marker_command(marker), consecutive_windows=3, cooldown_s=3600, log_path=log,
                             traffic_path=traffic)
    assert not trigger.update(_result("token_js"))
    assert not trigger.update(_result("token_js"))
    assert not trigger.update(_result())  # a clean window resets the streak
    assert [trigger.update(_result("output_entropy", kind="quality")) for _ in range(3)] == [False, False, True]
    assert trigger.wait(timeout=30) == 0
    snapshot = marker.read_text()
    assert snapshot != str(traffic) and snapshot.endswith(".jsonl")
    with open(snapshot) as file:
        assert [json.loads(line)["text"] for line in file] == ["a", "b"]  # complete lines only
    output = log.read_text()
    assert "starting:" in output and f"retraining on {snapshot}" in output
    assert trigger.state()["last_returncode"] == 0 and len(trigger.runs) == 1


def test_retrain_runs_at_most_once_per_cooldown(tmp_path):
    clock = FakeClock()
    marker = tmp_path / "marker.txt"
    trigger = RetrainTrigger([sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"], consecutive_windows=1,
                             cooldown_s=600, log_path=tmp_path / "retrain.log", clock=clock)
    assert trigger.update(_result("token_js"))
    trigger.wait(30)
    assert not trigger.update(_result("token_js"))  # still alerting, but within the cooldown
    clock.now += 601
    assert trigger.update(_result("token_js"))
    trigger.wait(30)
    assert marker.read_text() == "xx"


def test_retrain_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="traffic"):
        RetrainTrigger("python train.py {traffic}", log_path=tmp_path / "log")
    with pytest.raises(ConfigError, match="consecutive_windows"):
        RetrainTrigger("python train.py", consecutive_windows=0)
    with pytest.raises(ConfigError, match="empty"):
        RetrainTrigger("  ")
