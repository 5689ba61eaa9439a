"""LLaMA-MoE v1 (`llama-moe/LLaMA-MoE-v1-3_5B-2_8` and siblings), natively, without its remote code.

LLaMA-MoE v1 is LLaMA-2-7B with every FFN split into experts (LinearGLUMoELayer); attention,
norms and rotary embeddings are LLaMA's, so the model is transformers' LlamaForCausalLM with that
MLP swapped into every layer. The published modeling_llama_moe_hf.py computes, per token x [H],
at inference (TopKBalancedNoisyGate adds its noise only in training):

  logits = gate_network(x)                          ("mlp": Linear(H, E) -> tanh -> Linear(E, E);
                                                     "linear": Linear(H, E); no biases)
  top_logits, idx = topk(logits, min(k + 1, E))[:, :k]   (k = num_selects)
  s = softmax(float32(top_logits)).to(dtype)        (gate_use_softmax; else s = top_logits)
  y = sum over idx, in ascending expert order, of (s_e * score_scale_factor) * down_e(silu(gate_e x) * up_e x)
                                                    (UniversalCalculator with multiply_gate_scores;
                                                     without it the outputs are summed unscaled)

The experts are transformers' fused experts (Qwen2MoeExperts, the shared contract, so
offloading applies unchanged): weighted outputs added into zeros in ascending expert order, as
the calculator's index_add over expert-sorted rows does; gate and up fused into one matmul give
the same bits as the published two on the CPU (checked by the tests). Multiplying by a weight of
1.0 when multiply_gate_scores is false changes no bit.

Tensor names are the published ones: `model.layers.N.mlp.gate.gate_network.{0,2}.weight` (or
`.gate_network.weight` for "linear"), `model.layers.N.mlp.calculator.experts.weight_{gate,up,down}.E`
(per expert, [F, H], [F, H], [H, F]); `mlp.gate.weight_noise.weight` is read by the published code
only in training and left unused. Attention scores: see model/deepseek_moe.py (the published code
divides by sqrt(head_dim); LLaMA-MoE's head_dim of 128 can differ in the last bit).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

from offload_moe.model.remote_configs import LlamaMoeConfig

# Published per-expert tensor names, relative to a decoder layer's `mlp` (expert number last).
EXPERT_PATTERNS = {"gate": "mlp.calculator.experts.weight_gate.*", "up": "mlp.calculator.experts.weight_up.*",
                   "down": "mlp.calculator.experts.weight_down.*"}


def llama_moe_conversions() -> list:
    """The published per-expert tensors onto the fused experts at `mlp.experts`, with
    transformers' own converters (stack the experts, then concatenate gate and up)."""
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    return [
        WeightConverter(source_patterns=[EXPERT_PATTERNS["gate"], EXPERT_PATTERNS["up"]],
                        target_patterns="mlp.experts.gate_up_proj",
                        operations=[MergeModulelist(dim=0), Concatenate(dim=1)]),
        WeightConverter(source_patterns=EXPERT_PATTERNS["down"], target_patterns="mlp.experts.down_proj",
                        operations=[MergeModulelist(dim=0)]),
    ]


class LlamaMoeGate(nn.Module):
    """TopKBalancedNoisyGate's gate network: hidden states [T, H] -> logits [T, E]."""

    def __init__(self, config: LlamaMoeConfig):
        super().__init__()
        h, e = config.hidden_size, config.num_experts
        if config.gate_network == "mlp":
            self.gate_network = nn.Sequential(nn.Linear(h, e, bias=False), nn.Tanh(), nn.Linear(e, e, bias=False))
        else:
            self.gate_network = nn.Linear(h, e, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.gate_network(hidden_states)


class LlamaMoeBlock(nn.Module):
    """LinearGLUMoELayer at inference: top-k of the gate's logits, softmax over those k, scaled."""

    router_name = "gate"  # the router is the whole gate network (arch._find_router)

    def __init__(self, config: LlamaMoeConfig, layer: int):
        super().__init__()
        self.top_k, self.num_experts = config.num_selects, config.num_experts
        self.use_softmax = config.gate_use_softmax
        self.multiply_gate_scores = config.multiply_gate_scores
        self.score_scale_factor = config.scale_of_layer(layer)
        self.gate = LlamaMoeGate(config)
        self.experts = Qwen2MoeExperts(config)  # num_experts, moe_intermediate_size (one expert's width)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        logits = self.gate(flat)
        top_logits, top_index = logits.topk(min(self.top_k + 1, self.num_experts), dim=1)
        top_k_logits, top_k_index = top_logits[:, : self.top_k], top_index[:, : self.top_k]
        scores = torch.softmax(top_k_logits.to(torch.float32), dim=1) if self.use_softmax else top_k_logits
        scores = scores.to(logits.dtype)
        weights = scores * self.score_scale_factor if self.multiply_gate_scores else torch.ones_like(scores)
        return self.experts(flat, top_k_index, weights).reshape(shape)


class LlamaMoeForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with LinearGLUMoELayer as the MLP of every layer."""

    config_class = LlamaMoeConfig

    def __init__(self, config: LlamaMoeConfig):
        super().__init__(config)
        for index, layer in enumerate(self.model.layers):
            layer.mlp = LlamaMoeBlock(config, index)

    @staticmethod
    def checkpoint_conversions() -> list:
        return llama_moe_conversions()
