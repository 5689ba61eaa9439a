"""Errors a user can meet, each with a message that names the file, key or value at fault."""

from __future__ import annotations


class OffloadMoeError(Exception):
    """Base class: the CLI prints these as one readable line (no traceback unless --debug)."""


class CheckpointError(OffloadMoeError):
    """The checkpoint on disk is missing, incomplete, truncated or has tensors of the wrong shape."""


class UnsupportedArchitectureError(OffloadMoeError):
    """config.json names a model type this version cannot offload."""


class ConfigError(OffloadMoeError):
    """A load or generation setting has a value that cannot work."""
