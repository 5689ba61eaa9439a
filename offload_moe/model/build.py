"""Build a transformers model from its config with empty (meta) parameters: no weights read."""

from __future__ import annotations

import torch
from torch import nn

from offload_moe.model.deepseek_moe import DeepseekMoeForCausalLM
from offload_moe.model.llama_moe import LlamaMoeForCausalLM
from offload_moe.model.remote_families import DeepseekMoeConfig, LlamaMoeConfig

# Families published only with remote code, built by offload_moe's own modules (never the checkpoint's).
NATIVE_CAUSAL_LM: dict[type, type] = {DeepseekMoeConfig: DeepseekMoeForCausalLM, LlamaMoeConfig: LlamaMoeForCausalLM}


def causal_lm_class(config) -> type | None:
    """offload_moe's own causal-LM class for a remote-code family's config, else None (transformers')."""
    return NATIVE_CAUSAL_LM.get(type(config))


def build_empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The transformers model with parameters on the meta device and real (CPU) buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    native = causal_lm_class(config)
    with init_empty_weights(include_buffers=False):
        if native is not None:
            return native._from_config(config, dtype=dtype)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model
