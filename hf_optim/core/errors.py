"""Exceptions raised for bad user input, so callers can tell a usage error from a bug."""

from __future__ import annotations


class HfOptimError(Exception):
    """Base class of every error hf_optim raises on purpose."""


class ConfigError(HfOptimError, ValueError):
    """A configuration value is invalid; the message names the value and how to fix it."""
