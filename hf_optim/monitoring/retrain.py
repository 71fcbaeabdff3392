"""Retraining trigger: start a configured command when drift or quality alerts persist for K consecutive windows.

The command runs as a child process (no shell), with its stdout and stderr appended to a log file; the trigger
never waits for it, so requests are never blocked. It starts at most once per ``cooldown_s`` and never while an
earlier run is still going. ``{traffic}`` in the command is replaced by a snapshot of the collected traffic (JSON
lines with a ``text`` field, copied at trigger time so that the run sees a fixed file while serving goes on),
which is exactly what the training recipe reads:

Example:
    >>> trigger = RetrainTrigger(
    ...     "accelerate launch --config_file accelerate_configs/cpu_single.yaml recipes/train_clm.py "
    ...     "--config recipes/configs/stories260k_finetune.yaml train_files=[{traffic}]",
    ...     consecutive_windows=3, cooldown_s=3600, log_path="retrain.log", traffic_path="traffic.jsonl",
    ... )
    >>> trigger.update(result)  # doctest: +SKIP  (True when the command was started)
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hf_optim.core.errors import ConfigError

logger = logging.getLogger("hf_optim.monitoring.retrain")
TRAFFIC_PLACEHOLDER = "{traffic}"


class RetrainTrigger:
    """Counts consecutive alerting windows and starts ``command`` after ``consecutive_windows`` of them.

    ``kinds`` selects which alerts count ("drift", "quality" or both). After a start the streak resets, so a
    second run needs K more alerting windows *and* the cooldown to have passed.

    Example:
        >>> trigger = RetrainTrigger("python train.py {traffic}", consecutive_windows=2, log_path="retrain.log",
        ...                          traffic_path="traffic.jsonl")
    """

    def __init__(
        self,
        command: str | Sequence[str],
        consecutive_windows: int = 3,
        cooldown_s: float = 3600.0,
        log_path: str | os.PathLike = "retrain.log",
        traffic_path: str | os.PathLike | None = None,
        kinds: Sequence[str] = ("drift", "quality"),
        cwd: str | os.PathLike | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not self.argv:
            raise ConfigError("retrain command is empty; pass e.g. 'accelerate launch recipes/train_clm.py ...'.")
        if consecutive_windows < 1:
            raise ConfigError(f"consecutive_windows={consecutive_windows} must be >= 1.")
        if cooldown_s < 0:
            raise ConfigError(f"retrain cooldown_s={cooldown_s} must be >= 0.")
        unknown = set(kinds) - {"drift", "quality"}
        if unknown:
            raise ConfigError(f"retrain kinds {sorted(unknown)} are unknown; use 'drift' and/or 'quality'.")
        if any(TRAFFIC_PLACEHOLDER in arg for arg in self.argv) and traffic_path is None:
            raise ConfigError(f"the retrain command uses {TRAFFIC_PLACEHOLDER} but no traffic log is configured; "
                              "set traffic_path (hf-optim serve --traffic-log FILE).")
        self.consecutive_windows = consecutive_windows
        self.cooldown_s = cooldown_s
        self.log_path = Path(log_path)
        self.traffic_path = Path(traffic_path) if traffic_path is not None else None
        self.kinds = tuple(kinds)
        self.cwd = cwd
        self._clock = clock
        self.streak = 0
        self.runs: list[dict[str, Any]] = []
        self._process: subprocess.Popen | None = None
        self._last_start: float | None = None

    @property
    def running(self) -> bool:
        """Whether the last started command is still running."""
        return self._process is not None and self._process.poll() is None

    def update(self, result: Any) -> bool:
        """Count one window's result (anything with an ``alerts`` list); start the command if due. True if started."""
        if any(metric.kind in self.kinds for metric in result.alerts):
            self.streak += 1
        else:
            self.streak = 0
        if self.streak < self.consecutive_windows or self.running:
            return False
        if self._last_start is not None and self._clock() - self._last_start < self.cooldown_s:
            return False
        self.start()
        return True

    def start(self) -> subprocess.Popen:
        """Start the command now (snapshotting the traffic log first), its output appended to ``log_path``."""
        argv = self.argv
        snapshot = None
        if self.traffic_path is not None and any(TRAFFIC_PLACEHOLDER in arg for arg in argv):
            snapshot = self._snapshot_traffic()
            argv = [arg.replace(TRAFFIC_PLACEHOLDER, str(snapshot)) for arg in argv]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ}
        if snapshot is not None or self.traffic_path is not None:
            env["HF_OPTIM_TRAFFIC_LOG"] = str(snapshot or self.traffic_path)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {shlex.join(argv)}\n".encode())
            log.flush()
            # the child keeps its own copy of the log descriptor; its own session keeps Ctrl-C of the server away
            self._process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.cwd, env=env,
                start_new_session=True,
            )
        self._last_start = self._clock()
        self.streak = 0
        self.runs.append({"pid": self._process.pid, "argv": argv, "started": time.time(), "traffic": str(snapshot)})
        self.runs = self.runs[-20:]
        logger.warning("retraining started (pid %d): %s; output in %s", self._process.pid, shlex.join(argv),
                       self.log_path)
        return self._process

    def _snapshot_traffic(self) -> Path:
        if not self.traffic_path.is_file():
            raise ConfigError(f"traffic log {str(self.traffic_path)!r} does not exist yet; nothing to retrain on.")
        snapshot = self.traffic_path.with_name(
            f"{self.traffic_path.stem}.retrain-{time.strftime('%Y%m%d-%H%M%S')}{self.traffic_path.suffix}"
        )
        # the server may be appending right now: keep complete lines only
        data = self.traffic_path.read_bytes()
        partial = snapshot.with_name(f".{snapshot.name}.tmp")
        partial.write_bytes(data[: data.rfind(b"\n") + 1])
        os.replace(partial, snapshot)
        return snapshot

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the running command (if any) and return its exit code."""
        return None if self._process is None else self._process.wait(timeout)

    def state(self) -> dict[str, Any]:
        """Streak, settings, whether a run is going, and the recent runs, as a JSON-able dict."""
        returncode = None if self._process is None else self._process.poll()
        return {
            "streak": self.streak, "consecutive_windows": self.consecutive_windows, "cooldown_s": self.cooldown_s,
            "running": self.running, "last_returncode": returncode, "log": str(self.log_path), "runs": self.runs,
        }
