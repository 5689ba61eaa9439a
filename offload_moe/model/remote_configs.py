"""The config classes of the remote-code families (model/remote_families.py says where each key
comes from): LlamaConfig plus each family's MoE keys, with the published names and defaults."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


@strict
class DeepseekMoeConfig(LlamaConfig):
    """DeepSeekMoE's config.json (configuration_deepseek.DeepseekConfig's keys and defaults)."""

    model_type = "deepseek"
    attribute_map = {"num_experts": "n_routed_experts"}

    moe_intermediate_size: int = 1407
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True

    def is_sparse_layer(self, layer: int) -> bool:
        """modeling_deepseek.DeepseekDecoderLayer: MoE where n_routed_experts is set, from layer
        first_k_dense_replace on, every moe_layer_freq-th layer."""
        return (self.n_routed_experts is not None and layer >= self.first_k_dense_replace
                and layer % self.moe_layer_freq == 0)


@strict
class LlamaMoeConfig(LlamaConfig):
    """LLaMA-MoE's config.json (configuration_llama_moe.LlamaMoEConfig's keys and defaults)."""

    model_type = "llama_moe"
    attribute_map = {"num_experts_per_tok": "num_selects"}

    num_experts: int = 16
    num_selects: int = 4
    size_experts: list | None = None
    gate_type: str = "TopKBalancedNoisyGate"
    gate_network: str = "mlp"
    gate_use_softmax: bool = True
    calculator_type: str = "UniversalCalculator"
    multiply_gate_scores: bool = True
    score_scale_factor: int | float | list = 1.0
    add_weight_norm: bool = False

    @property
    def moe_intermediate_size(self) -> int:
        """One expert's FFN width: LinearGLUExperts' size_experts[i], all equal (checked when the
        config is read), or intermediate_size split evenly."""
        if self.size_experts:
            return int(self.size_experts[0][0])
        return self.intermediate_size // self.num_experts

    def scale_of_layer(self, layer: int) -> float:
        """LlamaMoEDecoderLayer: score_scale_factor[layer] when it is a list, else the number."""
        factor = self.score_scale_factor
        return float(factor[layer] if isinstance(factor, list) else factor)


REMOTE_CONFIG_CLASSES: dict[str, type] = {"deepseek": DeepseekMoeConfig, "llama_moe": LlamaMoeConfig}
