"""The math of each compression algorithm as pure functions: tensors in, tensors out, no model plumbing.

Lifecycle, configs and handlers live in ``pruning.py``, ``quantization.py`` and ``clustering.py``; the files here
(e.g. ``kmeans.py``) hold only the algorithms they call, so each can be read and tested on its own.
"""
