"""Shadow comparison: does an optimized model still behave like its base model on real traffic?

On a random sample of served requests, the base model and the served (optimized) variant both score the same
sequence — the prompt followed by the tokens the variant generated — in one teacher-forced forward pass each.
At every position that predicts a generated token we compare their next-token distributions with
KL(base || variant) and check whether their greedy (arg-max) tokens agree. A compressed or exported model that
drifts away from its base shows up as rising KL and falling agreement, without any labels.

Example:
    >>> shadow = ShadowComparator(base_model, sample_rate=0.1)
    >>> comparison = shadow.compare(served_model, token_ids=prompt_ids + new_ids, prompt_length=len(prompt_ids))
    >>> comparison.mean_kl, comparison.greedy_agreement  # doctest: +SKIP
    (0.0021, 1.0)
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

import torch

from hf_optim.core.errors import ConfigError


def next_token_kl(base_logits: torch.Tensor, variant_logits: torch.Tensor) -> torch.Tensor:
    """KL(base || variant) of the next-token distributions at each position: (..., vocab) logits -> (...) nats.

    Example:
        >>> next_token_kl(torch.zeros(3, 5), torch.zeros(3, 5))
        tensor([0., 0., 0.])
    """
    if base_logits.shape != variant_logits.shape:
        raise ConfigError(f"logits shapes differ: base {tuple(base_logits.shape)} vs variant "
                          f"{tuple(variant_logits.shape)}; the models must share the tokenizer and vocabulary.")
    base_log_probs = torch.log_softmax(base_logits.double(), dim=-1)
    variant_log_probs = torch.log_softmax(variant_logits.double(), dim=-1)
    kl = (base_log_probs.exp() * (base_log_probs - variant_log_probs)).sum(dim=-1)
    return kl.clamp_min(0.0).float()  # rounding can give -1e-17 for identical rows


def greedy_agreement(base_logits: torch.Tensor, variant_logits: torch.Tensor) -> float:
    """Share of positions where both models' most likely next token is the same (1.0 = identical greedy decoding).

    Example:
        >>> greedy_agreement(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[0.0, 2.0], [0.0, 1.0]]))
        0.5
    """
    same = base_logits.argmax(dim=-1) == variant_logits.argmax(dim=-1)
    return float(same.float().mean()) if same.numel() else float("nan")


@dataclass(frozen=True)
class ShadowComparison:
    """One compared request: mean and max KL(base || variant) in nats, greedy agreement, positions compared."""

    mean_kl: float
    max_kl: float
    greedy_agreement: float
    positions: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def _logits(model: Any, token_ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits (seq, vocab) of a PyTorch causal LM or an :class:`hf_optim.OnnxCausalLM`."""
    parameters = getattr(model, "parameters", None)
    device = next(parameters()).device if parameters is not None else torch.device("cpu")
    return model(input_ids=token_ids[None].to(device)).logits[0].float().cpu()


class ShadowComparator:
    """Holds the base model; samples requests and compares the served variant's behaviour against it.

    ``sample_rate`` is the share of requests compared (each costs two forward passes off the request path).

    Example:
        >>> shadow = ShadowComparator(AutoModelForCausalLM.from_pretrained("base/"), sample_rate=0.05)
        >>> if shadow.should_sample():
        ...     shadow.compare(served_model, token_ids, prompt_length)  # doctest: +SKIP
    """

    def __init__(self, base_model: Any, sample_rate: float = 0.1, seed: int = 0) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise ConfigError(f"shadow sample_rate={sample_rate} must be in (0, 1].")
        self.base_model = base_model.eval() if hasattr(base_model, "eval") else base_model
        self.sample_rate = sample_rate
        self._random = random.Random(seed)
        self.compared = 0
        self._kl_sum = 0.0
        self._agreement_sum = 0.0

    def check_compatible(self, variant: Any) -> None:
        """Refuse a variant whose vocabulary differs from the base model's (the comparison would be meaningless)."""
        base_vocab = getattr(getattr(self.base_model, "config", None), "vocab_size", None)
        variant_vocab = getattr(getattr(variant, "config", None), "vocab_size", None)
        if base_vocab is not None and variant_vocab is not None and base_vocab != variant_vocab:
            raise ConfigError(f"shadow base model has vocab_size={base_vocab} but the served model has "
                              f"{variant_vocab}; pass the base model the served one was optimized from.")

    def should_sample(self) -> bool:
        """Draw whether the next request is compared (seeded, so runs are reproducible)."""
        return self._random.random() < self.sample_rate

    def compare(self, variant: Any, token_ids: torch.Tensor | list[int], prompt_length: int) -> ShadowComparison:
        """Score ``token_ids`` (prompt + generated) with both models; compare positions that predict new tokens."""
        token_ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        if not 0 < prompt_length <= token_ids.numel():
            raise ConfigError(f"prompt_length={prompt_length} must be in [1, {token_ids.numel()}].")
        # logits at position i predict token i + 1: from the last prompt token to the second-to-last token
        start, stop = prompt_length - 1, max(token_ids.numel() - 1, prompt_length)
        base = _logits(self.base_model, token_ids)[start:stop]
        served = _logits(variant, token_ids)[start:stop]
        kl = next_token_kl(base, served)
        comparison = ShadowComparison(float(kl.mean()), float(kl.max()), greedy_agreement(base, served), len(kl))
        self.compared += 1
        self._kl_sum += comparison.mean_kl
        self._agreement_sum += comparison.greedy_agreement
        return comparison

    def summary(self) -> dict[str, Any]:
        """Requests compared so far, with their mean KL and mean greedy agreement (JSON-able)."""
        n = self.compared
        return {
            "compared": n, "sample_rate": self.sample_rate,
            "mean_kl": self._kl_sum / n if n else None, "mean_greedy_agreement": self._agreement_sum / n if n else None,
        }
