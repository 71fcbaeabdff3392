"""The end-to-end pipeline: one recipe takes a model through compression and export to measured, monitored variants.

- :mod:`~hf_optim.pipeline.recipe`: the optimize recipe (variants, data, quality budget) as YAML.
- :mod:`~hf_optim.pipeline.variants`: building one variant folder (PyTorch compression steps, ONNX, TFLite).
- :mod:`~hf_optim.pipeline.agreement`: top-1 agreement and KL divergence with the base model (pure math).
- :mod:`~hf_optim.pipeline.selection`: quality budget and Pareto front (pure functions).
- :mod:`~hf_optim.pipeline.report`: the results table, ``results.json``, ``report.md``/``report.html`` and plots.
- :mod:`~hf_optim.pipeline.run`: :func:`~hf_optim.pipeline.run.optimize`, which ties them together.
- :mod:`~hf_optim.pipeline.callbacks`: a ``transformers`` ``TrainerCallback`` applying a compression schedule.

Example:
    >>> import hf_optim
    >>> results = hf_optim.optimize("path/to/model", "recipes/optimize_tiny.yaml", "out/optimize")  # doctest: +SKIP
    >>> print(results.to_markdown())  # doctest: +SKIP
"""
