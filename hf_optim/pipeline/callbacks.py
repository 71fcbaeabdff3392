"""A ``transformers`` ``TrainerCallback`` that applies a compression schedule while ``Trainer`` trains.

Two schedules, one callback:

- **gradual pruning**: a :class:`hf_optim.GradualPruner` (magnitude masks following a polynomial or constant sparsity
  schedule) re-applies its masks after every optimizer step and updates them at the schedule's update steps: the
  behaviour of :class:`hf_optim.GradualPruningCallback`, which this class extends.
- **cluster-preserving fine-tuning**: on a model clustered with :func:`hf_optim.cluster`, the codebooks train and the
  assignments stay fixed (:func:`hf_optim.make_cluster_trainable`, called when the callback is created, so before
  ``Trainer`` builds its optimizer); at the end of training :func:`hf_optim.finalize_clusters` turns the layers back
  into dense weights with a fresh packed form, ready for :func:`hf_optim.save_optimized`.

Both at once is refused: the pruning masks would act on weights that only exist as ``codebook[indices]``
(prune before clustering, with ``ClusterConfig(preserve_sparsity=True)``, to keep the zeros).

Example:
    >>> hf_optim.cluster(model, hf_optim.ClusterConfig(n_clusters=16))  # doctest: +SKIP
    >>> callback = CompressionScheduleCallback(model, preserve_clusters=True)  # doctest: +SKIP
    >>> Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()  # doctest: +SKIP
    >>> hf_optim.save_optimized(model, "out/cluster16-finetuned")  # doctest: +SKIP
"""

from __future__ import annotations

from torch import nn

from hf_optim.compression.clustering import finalize_clusters, make_cluster_trainable
from hf_optim.compression.schedule import GradualPruner, GradualPruningCallback
from hf_optim.core.errors import ConfigError


class CompressionScheduleCallback(GradualPruningCallback):
    """Gradual pruning (``pruner=``) or cluster-preserving fine-tuning (``preserve_clusters=True``) inside ``Trainer``.

    Example:
        >>> pruner = hf_optim.GradualPruner(model, hf_optim.MagnitudeConfig(sparsity=0.5),
        ...                                 hf_optim.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=100, frequency=10))  # doctest: +SKIP
        >>> Trainer(..., callbacks=[CompressionScheduleCallback(model, pruner=pruner)])  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, *, pruner: GradualPruner | None = None, preserve_clusters: bool = False) -> None:
        if (pruner is None) == (not preserve_clusters):
            raise ConfigError(
                "CompressionScheduleCallback applies one schedule: pass pruner=GradualPruner(...) for gradual pruning "
                "or preserve_clusters=True for cluster-preserving fine-tuning (prune first, then cluster with "
                "preserve_sparsity=True, to combine them)."
            )
        super().__init__(pruner)
        self.model = model
        self.preserve_clusters = preserve_clusters
        self.codebooks = make_cluster_trainable(model) if preserve_clusters else []

    def on_train_begin(self, args, state, control, **kwargs):
        if self.pruner is not None:
            super().on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if self.pruner is not None:
            super().on_step_end(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.preserve_clusters:
            finalize_clusters(self.model)
