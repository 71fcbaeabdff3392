"""Run under torchrun with 2 CPU processes: accumulate one step's gradients and save them from rank 0.

Rank r gets micro-batches of sequences [4r, 4r+2) and [4r+2, 4r+4) of the same 8 unevenly padded sequences
that the single-process reference sees as one batch.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from hf_optim.training.step import accumulate_gradients  # noqa: E402
from tests.helpers import right_padded_batch, tiny_model, unevenly_padded_sequences  # noqa: E402

torch.set_num_threads(1)
accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
model = accelerator.prepare(tiny_model("llama", seed=0))
sequences = unevenly_padded_sequences(8, seed=1)
rank = accelerator.process_index
micro = [right_padded_batch(sequences[4 * rank + 2 * i : 4 * rank + 2 * i + 2]) for i in range(2)]
result = accumulate_gradients(accelerator, model, micro)
if accelerator.is_main_process:
    grads = {name: p.grad.detach().clone() for name, p in accelerator.unwrap_model(model).named_parameters()}
    torch.save({"loss": result.loss, "tokens": result.target_tokens, "grads": grads}, sys.argv[1])
accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()
