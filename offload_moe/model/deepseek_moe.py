"""DeepSeekMoE-16B (`deepseek-ai/deepseek-moe-16b-base` / `-chat`), natively, without its remote code.

No transformers class computes it: DeepSeek-V2/V3 share its shared-expert MoE but use MLA
attention (and V2's router runs in fp32, 16B's in the model's dtype); Qwen2-MoE gates its shared
expert with a sigmoid. DeepSeekMoE-16B is LLaMA with the MLP of every layer from
`first_k_dense_replace` on (every `moe_layer_freq`-th) replaced by DeepseekMoE, so the model is
transformers' LlamaForCausalLM (LlamaAttention, LlamaRMSNorm, LlamaRotaryEmbedding) with that
MLP swapped in. The published modeling_deepseek.py computes, per token x [H]:

  logits = x @ gate.weight.T                       (MoEGate, in the model's dtype)
  scores = softmax(logits)                         (scoring_func "softmax")
  w, idx = topk(scores, num_experts_per_tok)       (norm_topk_prob false: w not renormalised)
  y = sum over idx, in ascending expert order, of w_e * down_e(silu(gate_e x) * up_e x)
  y = y + shared_experts(x)                        (one MLP of width n_shared * moe_intermediate_size, no gate)

Routed experts are transformers' fused experts (Qwen2MoeExperts: the shared contract, so
offloading applies unchanged); its eager forward adds the weighted expert outputs into zeros in
ascending expert order, as moe_infer's scatter_reduce_ does. Tensor names are the published
ones: `model.layers.N.mlp.gate.weight`, `model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`,
`model.layers.N.mlp.shared_experts.{gate,up,down}_proj.weight`, dense layers
`model.layers.N.mlp.{gate,up,down}_proj.weight`, the rest as LLaMA's.

One difference from the published code is in attention: it divides the scores by
sqrt(head_dim), LlamaAttention multiplies by head_dim**-0.5. The two agree bit for bit when
sqrt(head_dim) is a power of two (head_dim 16, 64, 256); DeepSeekMoE-16B's head_dim of 128
gives scores that can differ in the last bit.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2MLP
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

from offload_moe.model.remote_configs import DeepseekMoeConfig


def deepseek_conversions() -> list:
    """Published per-expert tensors onto the fused experts: transformers' own Qwen2-MoE mapping
    (`mlp.experts.*.{gate,up}_proj.weight` -> `mlp.experts.gate_up_proj`, down likewise)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    return get_checkpoint_conversion_mapping("qwen2_moe")


class DeepseekMoeGate(nn.Module):
    """MoEGate's scoring linear: the router whose logits [T, E] the MoE block turns into weights."""

    def __init__(self, config: DeepseekMoeConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden_states, self.weight, None)


class DeepseekMoeBlock(nn.Module):
    """DeepseekMoE at inference: softmax top-k routed experts plus ungated shared experts."""

    def __init__(self, config: DeepseekMoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = DeepseekMoeGate(config)  # first: the router describe_model finds
        self.experts = Qwen2MoeExperts(config)  # num_experts (= n_routed_experts), moe_intermediate_size
        self.shared_experts = None
        if config.n_shared_experts is not None:
            self.shared_experts = DeepseekV2MLP(config, intermediate_size=config.moe_intermediate_size
                                                * config.n_shared_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        identity, shape = hidden_states, hidden_states.shape
        flat = hidden_states.view(-1, shape[-1])
        scores = self.gate(flat).softmax(dim=-1)
        top_k_weights, top_k_index = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        out = self.experts(flat, top_k_index, top_k_weights).view(*shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(identity)
        return out


class DeepseekMoeForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with DeepseekMoE as the MLP of the sparse layers."""

    config_class = DeepseekMoeConfig

    def __init__(self, config: DeepseekMoeConfig):
        super().__init__(config)
        for index, layer in enumerate(self.model.layers):
            if config.is_sparse_layer(index):
                layer.mlp = DeepseekMoeBlock(config)

    @staticmethod
    def checkpoint_conversions() -> list:
        return deepseek_conversions()
