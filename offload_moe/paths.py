"""Where offload_moe keeps files it builds for the user (the demo model, memory-mapped stores)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """`$OFFLOAD_MOE_CACHE`, else `$XDG_CACHE_HOME/offload_moe`, else `~/.cache/offload_moe`."""
    explicit = os.environ.get("OFFLOAD_MOE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "offload_moe"
    return Path.home() / ".cache" / "offload_moe"
