"""Monitoring of served text: drift of inputs and outputs, label-free quality, against a reference profile.

Example:
    >>> from hf_optim.monitoring import ReferenceProfile, TextMonitor
    >>> profile = ReferenceProfile.fit(reference_texts, tokenizer="path/to/model")  # doctest: +SKIP
    >>> TextMonitor(profile).calculate(live_texts).drift  # doctest: +SKIP
    False
"""

from hf_optim.monitoring.monitor import MetricResult, MonitoringResult, TextMonitor
from hf_optim.monitoring.profile import ReferenceProfile

__all__ = ["MetricResult", "MonitoringResult", "ReferenceProfile", "TextMonitor"]
