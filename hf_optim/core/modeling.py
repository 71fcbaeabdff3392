"""Building Transformers models outside DeepSpeed ZeRO-3's ``zero.Init``: on the meta device, or in full.

Once Accelerate has set up ZeRO-3, ``from_config`` partitions every new model on creation; transformers 5.24 then
fails on the rotary buffers ("Cannot copy out of meta tensor"), and a model built only to count its parameters
would be partitioned for nothing.

Example:
    >>> config = transformers.AutoConfig.for_model("llama", hidden_size=64, num_hidden_layers=2)  # doctest: +SKIP
    >>> sum(p.numel() for p in meta_model(config).parameters())  # no memory allocated  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def without_zero3_init() -> Iterator[None]:
    """Inside, transformers does not see the ZeRO-3 config that Accelerate registered (restored on exit)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


def meta_model(config, trust_remote_code: bool = False) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_config(config)`` on the meta device: shapes and parameter counts, no weights."""
    from transformers import AutoModelForCausalLM

    with without_zero3_init(), torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
