"""Build a transformers model from its config with empty (meta) parameters: no weights read."""

from __future__ import annotations

import torch
from torch import nn

from offload_moe.model.remote_families import REMOTE_FAMILIES, remote_config_class


def causal_lm_class(config) -> type | None:
    """offload_moe's own causal-LM class for a remote-code family's config (DeepSeekMoE-16B,
    LLaMA-MoE v1: never the checkpoint's code), else None: transformers' class is used."""
    model_type = getattr(config, "model_type", None)
    if model_type not in REMOTE_FAMILIES or not isinstance(config, remote_config_class(model_type)):
        return None
    from offload_moe.model.deepseek_moe import DeepseekMoeForCausalLM
    from offload_moe.model.llama_moe import LlamaMoeForCausalLM

    return {"deepseek": DeepseekMoeForCausalLM, "llama_moe": LlamaMoeForCausalLM}[model_type]


def build_empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The transformers model with parameters on the meta device and real (CPU) buffers."""
    from accelerate import init_empty_weights

    native = causal_lm_class(config)
    with init_empty_weights(include_buffers=False):
        if native is not None:
            return native._from_config(config, dtype=dtype)
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

    native = causal_lm_class(config)
    with torch.device("meta"), no_init_weights():
        if native is not None:
            return native._from_config(config, dtype=dtype)
        return auto_model_class(config).from_config(config, dtype=dtype)
