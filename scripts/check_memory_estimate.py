"""Print the memory estimator next to what a Llama really holds on CPU, for a few configs (table, optional JSON).

Measured: exact parameter / gradient / AdamW-state sums after one step, bytes autograd saves for backward
(saved_tensors_hooks, storages deduplicated) plus one block's recompute under checkpointing, and the peak RSS of a
steady-state training step above the bare model, in a fresh process (Linux). State sums and RSS are skipped for the
bf16-model rows: the ZeRO accounting there assumes an fp32 master copy that a plain bf16 model does not have.

Example:
    $ .venv/bin/python scripts/check_memory_estimate.py --json-out outputs/memory_check.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_optim.training.activations import apply_activation_checkpointing  # noqa: E402
from hf_optim.training.memory import estimate_memory  # noqa: E402
from tests.test_memory import recompute_bytes, saved_activation_bytes, state_bytes  # noqa: E402

SIZES = {"hidden": 256, "layers": 4, "vocab_size": 4096}
BATCH, SEQ = 4, 256
CONFIGS = [  # (attention, checkpointing, precision): "no" = fp32, "bf16" = a bf16 model, "autocast" = Accelerate's DDP
    ("sdpa", "off", "no"), ("sdpa", "selective", "no"), ("sdpa", "full", "no"), ("eager", "off", "no"),
    ("sdpa", "off", "bf16"), ("sdpa", "full", "bf16"), ("sdpa", "off", "autocast"),
]


def _model(attn: str, precision: str):
    from accelerate.utils import convert_outputs_to_fp32
    from transformers import AutoModelForCausalLM

    from tests.helpers import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", **SIZES), attn_implementation=attn)
    model.to(torch.bfloat16 if precision == "bf16" else torch.float32).train()
    if precision == "autocast":  # what Accelerate's prepare() does with mixed_precision=bf16 under DDP
        model.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward))
    return model


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _rss_step(attn: str, mode: str, precision: str) -> dict[str, int]:
    """In a fresh process: peak RSS of a steady-state AdamW step above the bare model, and the exact model-state
    sums (Linux: reads /proc/self/status)."""
    torch.set_num_threads(1)
    model = _model(attn, precision)
    apply_activation_checkpointing(model, mode, every_n_layers=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, SIZES["vocab_size"], (BATCH, SEQ))
    baseline = _status_kib("VmRSS")  # parameters (and the interpreter), nothing else yet
    for _ in range(2):  # the first step creates the AdamW states; gradients stay allocated, as DDP/ZeRO buffers do
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) so it covers this step only
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    return {"rss_step_delta": (_status_kib("VmHWM") - baseline) * 1024, **state_bytes(model, optimizer)}


def check(attn: str, mode: str, precision: str) -> dict:
    model = _model(attn, precision)
    est = estimate_memory(model.config, mixed_precision="bf16" if precision == "autocast" else precision,
                          autocast=precision == "autocast", batch_size=BATCH, seq_len=SEQ,
                          gradient_checkpointing=mode, attn_implementation=attn)
    ids = torch.randint(0, SIZES["vocab_size"], (BATCH, SEQ))
    checkpointed = apply_activation_checkpointing(model, mode, every_n_layers=2)
    detail = est.activation_detail
    estimate = {**est.gpu, "stored_activations": detail["layers"] + detail["head"], "recompute": detail["recompute"]}
    # autocast's 16-bit weight copies are saved tensors: compare them with the stored activations
    cast_cache = est.gpu["parameters"] - 4 * est.model.num_params if precision == "autocast" else 0
    estimate["parameters"] -= cast_cache
    estimate["stored_activations"] += cast_cache
    measured = {"stored_activations": saved_activation_bytes(model, ids),
                "recompute": recompute_bytes(_model(attn, precision), ids) if checkpointed else 0}
    if precision != "bf16":  # the ZeRO accounting of 16-bit states assumes an fp32 master copy a bf16 model lacks
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            measured.update(pool.apply(_rss_step, (attn, mode, precision)))
        estimate["step_growth"] = cast_cache + sum(est.gpu[k] for k in ("gradients", "optimizer_states", "activations"))
    label = f"{attn}/{mode}/{'fp32' if precision == 'no' else precision}"
    return {"config": label, "estimate": estimate, "measured": measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json-out", type=Path, help="Also write the rows as JSON here.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # glibc keeps freed blocks below its (adaptive) mmap threshold in RSS; a fixed low one makes RSS follow live tensors
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    rows = [check(*config) for config in CONFIGS]
    print(f"Llama {SIZES}, batch {BATCH} x {SEQ} tokens; MiB estimate / measured (error)")
    columns = [("parameters", "parameters"), ("gradients", "gradients"), ("optimizer_states", "optimizer_states"),
               ("stored_activations", "stored_activations"), ("recompute", "recompute"),
               ("step_growth", "rss_step_delta")]
    print(f"{'config':<20}" + "".join(f"{name:>26}" for name, _ in columns))
    for row in rows:
        cells = []
        for est_key, meas_key in columns:
            est, meas = row["estimate"].get(est_key), row["measured"].get(meas_key)
            error = f" ({(est - meas) / meas:+.1%})" if meas else ""
            cells.append("-" if meas is None else f"{est / 2**20:.2f}/{meas / 2**20:.2f}{error}")
        print(f"{row['config']:<20}" + "".join(f"{cell:>26}" for cell in cells))
    print("step_growth: gradients + optimizer states + peak activations (stored + the larger of the loss gradients "
          "and one recompute) vs the peak RSS of a second training step above the bare model (fresh process).")
    print("autocast rows: the 16-bit weight copies autocast caches are saved tensors, so they count as stored here.")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"sizes": SIZES, "batch": BATCH, "seq_len": SEQ, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
