"""Build a transformers model from its config with empty (meta) parameters: no weights read."""

from __future__ import annotations

import torch
from torch import nn


def build_empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The transformers model with parameters on the meta device and real (CPU) buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model
