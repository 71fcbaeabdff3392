"""Label-free quality signals of a served causal LM, one number per request.

- ``prompt_perplexity``: the model's own perplexity of each prompt (exp of the mean next-token NLL).
- ``output_entropy`` / ``output_logprob``: mean entropy of the next-token distributions and mean log-probability
  of the tokens actually generated (nats per token), from the logits or scores that ``generate`` returns.
- ``empty_output``, ``truncated_output`` (generation stopped at ``max_new_tokens`` instead of an end token) and
  ``repeated_output`` (most word n-grams of the output are repeats, the signature of a degenerate loop): 0/1 flags
  whose window means are rates.

The numbers are recorded by a :class:`~hf_optim.monitoring.ReferenceProfile` as numeric features under these
names, so live windows are compared with what the model did on healthy traffic.

Example:
    >>> repetition_ratio("the cat the cat the cat the cat", n=2)  # 7 bigrams, 2 distinct
    0.7142857142857143
    >>> output_flags(["", "fine."], [0, 3], max_new_tokens=3)["truncated_output"].tolist()
    [0.0, 1.0]
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

from hf_optim.core.errors import ConfigError

_WORD = re.compile(r"\w+|[^\w\s]")


@torch.inference_mode()
def prompt_perplexities(
    model, tokenizer, texts: Sequence[str], batch_size: int = 8, max_length: int = 512
) -> np.ndarray:
    """Perplexity of each text under ``model`` (tokens beyond ``max_length`` are cut); NaN for texts of < 2 tokens.

    Example:
        >>> prompt_perplexities(model, tokenizer, ["Once upon a time"])  # doctest: +SKIP
        array([7.9])
    """
    if batch_size < 1 or max_length < 2:
        raise ConfigError(f"batch_size={batch_size} and max_length={max_length} must be >= 1 and >= 2.")
    device = next(model.parameters()).device if hasattr(model, "parameters") else torch.device("cpu")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = np.full(len(texts), np.nan)
    try:
        for begin in range(0, len(texts), batch_size):
            encoded = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts[begin : begin + batch_size]]
            width = max(len(ids) for ids in encoded)
            if width < 2:
                continue
            input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(encoded), width), dtype=torch.long)
            for row, ids in enumerate(encoded):
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[row, : len(ids)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
            targets = mask[:, 1:].float()
            counts = targets.sum(1)
            mean_nll = (nll * targets).sum(1) / counts.clamp(min=1)
            values = torch.exp(mean_nll).numpy()
            out[begin : begin + len(encoded)] = np.where(counts.numpy() > 0, values, np.nan)
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
    return out


def output_entropy_logprob(
    step_logits: Sequence[torch.Tensor] | torch.Tensor, generated_ids: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Mean next-token entropy and mean log-probability of the generated tokens, per sequence (nats per token).

    ``step_logits``: the ``logits`` (or ``scores``) of ``generate(..., output_logits=True, return_dict_in_generate=True)``,
    one ``(batch, vocab)`` tensor per step, or a ``(batch, steps, vocab)`` tensor; ``generated_ids``: ``(batch, steps)``
    new tokens; ``valid``: ``(batch, steps)`` mask of real (not padding after an end token) steps, default all.
    Sequences without a valid step get NaN. Masked-out vocabulary entries (``-inf`` scores) contribute 0 entropy.

    Example:
        >>> entropy, logprob = output_entropy_logprob(torch.zeros(1, 1, 4), torch.tensor([[2]]))
        >>> round(float(entropy[0]), 4), round(float(logprob[0]), 4)  # uniform over 4 tokens: log 4, -log 4
        (1.3863, -1.3863)
    """
    logits = torch.stack(list(step_logits), dim=1) if not isinstance(step_logits, torch.Tensor) else step_logits
    logits = logits.float()
    if logits.dim() != 3 or logits.shape[:2] != generated_ids.shape:
        raise ConfigError(
            f"step logits of shape {tuple(logits.shape)} do not match generated ids of shape {tuple(generated_ids.shape)};"
            " pass (batch, steps, vocab) logits and (batch, steps) ids."
        )
    log_probs = torch.log_softmax(logits, dim=-1)
    entropy = -(log_probs.exp() * log_probs.nan_to_num(neginf=0.0)).sum(-1)
    chosen = log_probs.gather(-1, generated_ids.long().unsqueeze(-1)).squeeze(-1)
    valid = torch.ones_like(chosen, dtype=torch.bool) if valid is None else valid.bool()
    counts = valid.sum(1).float()
    mean_entropy = (entropy * valid).sum(1) / counts.clamp(min=1)
    mean_logprob = (chosen.masked_fill(~valid, 0.0)).sum(1) / counts.clamp(min=1)
    empty = (counts == 0).numpy()
    return np.where(empty, np.nan, mean_entropy.numpy()), np.where(empty, np.nan, mean_logprob.numpy())


def repetition_ratio(text: str, n: int = 3) -> float:
    """Share of the word n-grams of ``text`` that repeat an earlier one (0 when it has no n-gram)."""
    if n < 1:
        raise ConfigError(f"n={n} must be >= 1.")
    words = _WORD.findall(text.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def output_flags(
    outputs: Sequence[str],
    new_token_counts: Sequence[int],
    max_new_tokens: int | Sequence[int],
    ended_with_eos: Sequence[bool] | None = None,
    repeat_n: int = 3,
    repeat_threshold: float = 0.5,
) -> dict[str, np.ndarray]:
    """0/1 flags per output: ``empty_output``, ``truncated_output``, ``repeated_output``.

    An output is truncated when it used all its ``max_new_tokens`` without ending on an end token
    (``ended_with_eos``; when unknown, reaching the limit counts as truncated). It is repeated when at least
    ``repeat_threshold`` of its word ``repeat_n``-grams repeat an earlier one.
    """
    if len(new_token_counts) != len(outputs):
        raise ConfigError(f"{len(new_token_counts)} token counts for {len(outputs)} outputs; pass one per output.")
    limits = np.broadcast_to(np.asarray(max_new_tokens, np.int64), (len(outputs),))
    counts = np.asarray(new_token_counts, np.int64)
    eos = np.zeros(len(outputs), bool) if ended_with_eos is None else np.asarray(ended_with_eos, bool)
    return {
        "empty_output": np.fromiter((not o.strip() for o in outputs), np.float64, len(outputs)),
        "truncated_output": ((counts >= limits) & ~eos).astype(np.float64),
        "repeated_output": np.fromiter(
            (repetition_ratio(o, repeat_n) >= repeat_threshold for o in outputs), np.float64, len(outputs)
        ),
    }
