"""offload_moe: run large Mixture-of-Experts LLMs on one small GPU, or none.

Attention and the other non-expert layers stay on the device; the experts live in host RAM and
a per-layer cache keeps the hot ones in device slots.
"""

from offload_moe.api import OffloadedModel, load
from offload_moe.convert import convert  # noqa: E402  (the function; the module stays importable by name)
from offload_moe.errors import CheckpointError, ConfigError, OffloadMoeError, UnsupportedArchitectureError

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
