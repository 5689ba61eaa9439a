"""offload_moe: run large Mixture-of-Experts LLMs on one small GPU, or none.

Attention and the other non-expert layers stay on the device; the experts live in host RAM and
a per-layer cache keeps the hot ones in device slots.
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING

from offload_moe.errors import CheckpointError, ConfigError, OffloadMoeError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from offload_moe.api import OffloadedModel, load
    from offload_moe.convert import convert

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
_LAZY = {"load": "offload_moe.api", "OffloadedModel": "offload_moe.api", "convert": "offload_moe.convert"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """offload_moe.convert stays the function: the first import of the submodule of that name
    (`from offload_moe.convert import ...`, anywhere) would otherwise rebind the package's
    attribute to the module, as the import system does for every submodule."""

    def __setattr__(self, name: str, value) -> None:
        if name == "convert" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
