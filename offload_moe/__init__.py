"""offload_moe: run large Mixture-of-Experts LLMs on one small GPU, or none.

Attention and the other non-expert layers stay on the device; the experts live in host RAM and
a per-layer cache keeps the hot ones in device slots.
"""

import importlib
from typing import TYPE_CHECKING

from offload_moe.errors import CheckpointError, ConfigError, OffloadMoeError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from offload_moe.api import OffloadedModel, load
    from offload_moe.conversion import convert

__all__ = [
    "load",
    "convert",
    "OffloadedModel",
    "OffloadMoeError",
    "CheckpointError",
    "ConfigError",
    "UnsupportedArchitectureError",
]
__version__ = "0.1.0"

# `import offload_moe` stays light (and so does `offload-moe --help`, which runs this file
# first): load, OffloadedModel and convert, with torch and the runtime behind them, are imported
# the first time one of them is used (PEP 562).
_LAZY = {"load": "offload_moe.api", "OffloadedModel": "offload_moe.api", "convert": "offload_moe.conversion"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

