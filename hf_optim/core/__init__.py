"""Utilities shared by every stage: configuration files, atomic writes, errors, environment report."""
