"""Worker for tests/test_strategies.py: a few optimizer steps of a tiny Llama under whatever strategy
``accelerate launch --config_file accelerate_configs/<name>.yaml`` sets up, with the recipe's loss convention.

Each micro-batch's loss is sum(CE over its target tokens) / (target tokens of the whole optimizer step over all
micro-batches and ranks) x gradient_accumulation_steps x world_size, so that Accelerate's division by the accumulation
steps and the backends' averaging over ranks give the exact token-weighted mean of the step. Rows have random padding,
so token counts differ between micro-batches and ranks.

Rank 0 writes into --out: result.json (per-step losses, strategy, timings), final_state.pt (full trained weights),
probe_logits.pt (eval-mode logits of the prepared, possibly sharded, model) and model/ (save_consolidated_model).

Run by hand (after saving tests.helpers.tiny_model("llama") with save_pretrained into /tmp/tiny):
    accelerate launch --config_file accelerate_configs/zero3.yaml tests/workers/train_worker.py --model /tmp/tiny \
        --out /tmp/zero3
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from hf_optim.training.accelerator import (  # noqa: E402
    build_accelerator,
    check_model,
    save_consolidated_model,
    strategy_name,
)
from transformers import AutoModelForCausalLM  # noqa: E402

PAD_ID = 1


def synthetic_rows(num_rows: int, seq_len: int, vocab_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Random token rows, right-padded to random lengths (labels -100 on padding)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_rows):
        length = int(torch.randint(seq_len // 4, seq_len + 1, (1,), generator=generator))
        # 32 distinct tokens: a unigram distribution the model learns within a few steps, so losses move a lot.
        ids = torch.randint(2, min(vocab_size, 34), (seq_len,), generator=generator)
        mask = torch.zeros(seq_len, dtype=torch.long)
        mask[:length] = 1
        ids[length:] = PAD_ID
        labels = ids.clone()
        labels[length:] = -100
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", required=True, help="A Hugging Face model folder (the tests save a tiny Llama).")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=2, help="Rows per rank per micro-batch.")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--eps", type=float, default=1.0)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    # Off by default: clipping rescales the gradient and would hide a wrong gradient scale.
    parser.add_argument("--max-grad-norm", type=float, default=0.0, help="0 = no clipping.")
    parser.add_argument("--mixed-precision", default="no")
    parser.add_argument("--rows-per-step", type=int, default=None, help="Default: micro_batch * accum * world size.")
    args = parser.parse_args()
    started = time.perf_counter()

    accelerator = build_accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum, seed=0,
        max_grad_norm=args.max_grad_norm,
    )
    world = accelerator.num_processes
    # Loaded after the Accelerator, as the recipe does: under ZeRO-3 transformers then partitions it while loading.
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
    vocab_size = model.config.vocab_size
    rows_per_step = args.rows_per_step or args.micro_batch * args.grad_accum * world
    rows = synthetic_rows(args.steps * rows_per_step, args.seq_len, vocab_size, seed=1234)
    loader = torch.utils.data.DataLoader(rows, batch_size=args.micro_batch, shuffle=False)
    # eps=1 makes AdamW's update proportional to the gradient (|g| << 1), so a wrong gradient scale (ranks summed
    # instead of averaged, accumulation not divided) changes the losses; a tiny eps would normalise it away.
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, eps=args.eps)
    # Linear warm-up: a scheduler stepped more than once per optimizer step (Accelerate's default steps it once per
    # rank) would raise the LR early and change the losses.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / args.steps))

    check_model(model, accelerator, optimizer)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    prepared_at = time.perf_counter()

    model.train()
    batches = iter(loader)
    losses = []
    for _ in range(args.steps):
        micro_batches = [next(batches) for _ in range(args.grad_accum)]
        local_tokens = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches)
        step_tokens = accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), "sum")
        loss_sum = torch.zeros((), device=accelerator.device)
        for mb in micro_batches:
            with accelerator.accumulate(model):
                logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
                ce = torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), mb["labels"][:, 1:].flatten(), ignore_index=-100,
                    reduction="sum",
                )
                loss = ce / step_tokens * args.grad_accum * world
                accelerator.backward(loss)
                loss_sum += ce.detach()
                if accelerator.sync_gradients:
                    if args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
        step_loss = accelerator.reduce(loss_sum, "sum") / step_tokens
        losses.append(float(step_loss))
    trained_at = time.perf_counter()

    # Probe logits from the prepared (sharded) model: forward passes are collective under FSDP2/ZeRO-3.
    model.eval()
    probe = synthetic_rows(2, args.seq_len, vocab_size, seed=99)
    with torch.no_grad():
        probe_logits = model(
            input_ids=torch.stack([r["input_ids"] for r in probe]),
            attention_mask=torch.stack([r["attention_mask"] for r in probe]),
        ).logits.float().cpu()
    full_state = accelerator.get_state_dict(model)
    out = Path(args.out)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(probe_logits, out / "probe_logits.pt")
        torch.save({k: v.detach().float().cpu().clone() for k, v in full_state.items()}, out / "final_state.pt")
    save_consolidated_model(accelerator, model, out / "model")
    if accelerator.is_main_process:
        result = {
            "strategy": strategy_name(accelerator),
            "world_size": world,
            "distributed_type": str(accelerator.distributed_type),
            "losses": losses,
            "finite": all(math.isfinite(x) for x in losses),
            "seconds": {
                "setup_and_prepare": prepared_at - started,
                "train": trained_at - prepared_at,
                "save": time.perf_counter() - trained_at,
            },
        }
        (out / "result.json").write_text(json.dumps(result, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
