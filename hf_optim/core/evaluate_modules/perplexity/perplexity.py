"""Perplexity of a causal LM on texts — hf_optim's local `evaluate` module (works offline).

Corpus perplexity uses a strided sliding window (texts joined with blank lines, windows of ``max_length`` tokens
moved by ``stride``, every token scored once); per-text perplexities score each text on its own.

Example:
    >>> import evaluate
    >>> from hf_optim.core.evaluate_modules import metric_path
    >>> metric = evaluate.load(metric_path("perplexity"))
    >>> metric.compute(predictions=["Once upon a time"], model_id="path/to/model")  # doctest: +SKIP
    {'perplexity': 5.1, 'perplexities': [5.1], 'mean_perplexity': 5.1}
"""

import datasets
import evaluate

_DESCRIPTION = """Perplexity (exp of the mean next-token negative log-likelihood) of a causal language model."""
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the texts to score.
    model_id (str): a local model folder (or a Hub id where the Hub is reachable).
    max_length (int, optional): window length in tokens; default the model's context, at most 1024.
    stride (int, optional): window step; default max_length // 2.
    trust_remote_code (bool): allow the model's own code; default False.
Returns:
    perplexity: strided perplexity of the texts joined with blank lines.
    perplexities: perplexity of each text on its own.
    mean_perplexity: mean of `perplexities`.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, model_id, max_length=None, stride=None, trust_remote_code=False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from hf_optim.core.evaluation import evaluate_perplexity

        model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        per_text = [evaluate_perplexity(model, tokenizer, [text], max_length, stride) for text in predictions]
        return {
            "perplexity": evaluate_perplexity(model, tokenizer, list(predictions), max_length, stride),
            "perplexities": per_text,
            "mean_perplexity": sum(per_text) / len(per_text),
        }
