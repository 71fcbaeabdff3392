"""Resumable training checkpoints: atomic (write, then rename), the last K kept, ``resume_from=<dir|latest>``.

A checkpoint is ``<output_dir>/checkpoints/step-00000100/`` holding Accelerate's state (model, optimizer,
scheduler, RNG, data sampler; sharded as the strategy shards it) plus ``trainer_state.json``. It is written to
``step-00000100.tmp`` first and renamed only once every rank has finished, so a killed run never leaves a
half-written checkpoint that ``latest`` would pick.

Example:
    >>> save_checkpoint(accelerator, "outputs/run", TrainerState(step=100, epoch=0, batches_in_epoch=400), keep_last_k=2)  # doctest: +SKIP
    >>> state = load_checkpoint(accelerator, resolve_checkpoint("outputs/run", "latest"))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from hf_optim.core.errors import ConfigError

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
_PREFIX = "step-"
_TMP_SUFFIX = ".tmp"


@dataclasses.dataclass
class TrainerState:
    """Where training stands: enough to continue with the same data order and the same losses."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch the next micro-batch comes from
    batches_in_epoch: int = 0  # micro-batches of that epoch already consumed (per rank)
    tokens_seen: int = 0


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR / f"{_PREFIX}{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first (temporary folders of killed saves are skipped)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and not p.name.endswith(_TMP_SUFFIX)]
    return sorted((p for p in found if (p / STATE_FILE).is_file()), key=lambda p: p.name)


def save_checkpoint(accelerator, output_dir: str | Path, state: TrainerState, keep_last_k: int) -> Path:
    """Save the full training state of every rank atomically and prune all but the newest ``keep_last_k``."""
    final = checkpoint_dir(output_dir, state.step)
    tmp = final.with_name(final.name + _TMP_SUFFIX)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a run killed mid-save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=2))
        if final.exists():  # the same step saved again, e.g. after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep_last_k]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(output_dir: str | Path, resume_from: str) -> Path:
    """Turn ``resume_from`` (a checkpoint folder or ``"latest"``) into a checked checkpoint path."""
    if resume_from == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise ConfigError(
                f"resume_from=latest but {Path(output_dir) / CHECKPOINTS_DIR} holds no complete checkpoint; "
                "drop resume_from to start a fresh run."
            )
        return checkpoints[-1]
    path = Path(resume_from)
    if not path.is_dir():
        raise ConfigError(f"resume_from={resume_from!r} is not a folder; pass a checkpoint folder or 'latest'.")
    if not (path / STATE_FILE).is_file():
        raise ConfigError(
            f"resume_from={resume_from!r} has no {STATE_FILE}: it is not a checkpoint or it is incomplete "
            "(a save that was killed). Pick another one or use resume_from=latest."
        )
    return path


def load_checkpoint(accelerator, path: str | Path) -> TrainerState:
    """Restore model, optimizer, scheduler, RNG and sampler state from ``path``; return the trainer state."""
    path = Path(path)
    try:
        state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ConfigError(f"Checkpoint {str(path)!r} has a corrupt {STATE_FILE}: {exc}.") from exc
    try:
        accelerator.load_state(str(path))
    except Exception as exc:  # torch/safetensors/DeepSpeed raise many types for truncated or foreign files
        raise ConfigError(
            f"Checkpoint {str(path)!r} could not be loaded ({type(exc).__name__}: {exc}). It may be corrupt or "
            "written by another strategy or model; resume from another checkpoint."
        ) from exc
    return state
