"""Build a transformers model from its config with empty (meta) parameters: no weights read."""

from __future__ import annotations

import torch
from torch import nn


def build_empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The transformers model with parameters on the meta device and real (CPU) buffers."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = auto_model_class(config).from_config(config, dtype=dtype)
    return model


def auto_model_class(config) -> type:
    """transformers' auto class for the config: text-to-text for encoder-decoder models
    (Switch Transformers), else the causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def build_shape_model(config, dtype: torch.dtype) -> nn.Module:
    """The model with every parameter and buffer on the meta device and no weight initialisation
    run: shapes and names only, for planning from a config (initialising switch-c-2048's 61440
    experts, even on meta, takes minutes)."""
    from transformers.initialization import no_init_weights

    with torch.device("meta"), no_init_weights():
        return auto_model_class(config).from_config(config, dtype=dtype)
