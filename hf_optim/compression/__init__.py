"""Compression: pruning, quantization and weight clustering of Transformers causal LMs, one verb per technique."""
