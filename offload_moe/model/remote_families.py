"""DeepSeekMoE-16B and LLaMA-MoE v1: two MoE families published only with remote code, run natively.

Both checkpoints ship their modeling code (`auto_map` in config.json, loaded by transformers only
with `trust_remote_code`). offload_moe never runs it: `auto_map` and `architectures` are read
only to recognise the family, the config is built by model/remote_configs.py, and the model by
offload_moe's own modules (model/deepseek_moe.py, model/llama_moe.py) made of transformers' Llama
attention, RMSNorm and rotary classes and the shared fused experts contract.

Where each config key comes from (the families' published code, read, never imported):

* DeepSeekMoE (`deepseek-ai/deepseek-moe-16b-base` / `-chat`, configuration_deepseek.py and
  modeling_deepseek.py on the Hub; the architecture of github.com/deepseek-ai/DeepSeek-MoE):
  model_type "deepseek", auto_map `configuration_deepseek.DeepseekConfig` /
  `modeling_deepseek.DeepseekForCausalLM`; LLaMA keys (hidden_size, intermediate_size for the
  dense layers, num_attention_heads, num_key_value_heads, rms_norm_eps, rope_theta,
  rope_scaling, attention_bias, pretraining_tp) plus `n_routed_experts`, `n_shared_experts`,
  `moe_intermediate_size`, `num_experts_per_tok`, `first_k_dense_replace`, `moe_layer_freq`,
  `scoring_func`, `norm_topk_prob`, `aux_loss_alpha`, `seq_aux` (training only).
* LLaMA-MoE v1 (`llama-moe/LLaMA-MoE-v1-3_5B-2_8` and siblings, configuration_llama_moe.py and
  modeling_llama_moe_hf.py, github.com/pjlab-sys4nlp/llama-moe smoe/models/llama_moe/):
  model_type "llama_moe", auto_map `configuration_llama_moe.LlamaMoEConfig` /
  `modeling_llama_moe_hf.LlamaMoEForCausalLM`; LLaMA keys plus `num_experts`, `num_selects`
  (top-k), `size_experts` (per layer, per expert FFN widths), `gate_type`, `gate_network`,
  `gate_use_softmax`, `gate_add_noise` / `gate_noise_epsilon` (training only),
  `calculator_type`, `multiply_gate_scores`, `score_scale_factor` (a number or one per layer),
  `add_weight_norm`.

Settings of either family that the published code computes differently from what offload_moe
implements (another scoring function, token dropping, per-expert widths that differ, RoPE
scaling, tensor-parallel slicing) are refused by name, never run with other numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offload_moe.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class RemoteFamily:
    """How a remote-code family names itself in config.json."""

    model_type: str
    config_class: str  # auto_map's AutoConfig class name
    causal_lm_class: str  # auto_map's AutoModelForCausalLM class name and `architectures`
    config_module: str
    modeling_module: str

    def auto_map(self) -> dict[str, str]:
        """The auto_map the published config.json carries."""
        return {"AutoConfig": f"{self.config_module}.{self.config_class}",
                "AutoModel": f"{self.modeling_module}.{self.causal_lm_class.removesuffix('ForCausalLM')}Model",
                "AutoModelForCausalLM": f"{self.modeling_module}.{self.causal_lm_class}"}


REMOTE_FAMILIES: dict[str, RemoteFamily] = {
    "deepseek": RemoteFamily("deepseek", "DeepseekConfig", "DeepseekForCausalLM", "configuration_deepseek",
                             "modeling_deepseek"),
    "llama_moe": RemoteFamily("llama_moe", "LlamaMoEConfig", "LlamaMoEForCausalLM", "configuration_llama_moe",
                              "modeling_llama_moe_hf"),
}


def remote_config_class(model_type: str) -> type:
    """offload_moe's config class of a remote-code family (model/remote_configs.py; imported
    when needed, so that looking up offload_moe.load does not import transformers)."""
    from offload_moe.model.remote_configs import REMOTE_CONFIG_CLASSES

    return REMOTE_CONFIG_CLASSES[model_type]


def recognise_remote_family(raw: dict[str, Any]) -> RemoteFamily | None:
    """The family of a config.json that names one of these families by model_type and by its
    published class names (auto_map or architectures), else None. Nothing is imported or run."""
    family = REMOTE_FAMILIES.get(raw.get("model_type"))
    if family is None:
        return None
    auto_map = raw.get("auto_map")
    names = {str(v).rpartition(".")[2] for v in auto_map.values()} if isinstance(auto_map, dict) else set()
    architectures = raw.get("architectures")
    if isinstance(architectures, list):
        names |= {a for a in architectures if isinstance(a, str)}
    return family if names & {family.config_class, family.causal_lm_class} else None


def check_remote_settings(raw: dict[str, Any], config_path: Path | str) -> None:
    """Refuse, by key and value, the settings of a recognised family that offload_moe does not
    compute exactly as the published code does."""
    model_type = raw["model_type"]

    def refuse(key: str, why: str) -> None:
        raise UnsupportedArchitectureError(
            f"{config_path}: model_type {model_type!r} with {key}={raw.get(key)!r} is not supported: {why}")

    if raw.get("pretraining_tp", 1) not in (None, 1):
        refuse("pretraining_tp", "the published code then slices every projection into separate matmuls")
    if raw.get("rope_scaling") is not None:
        refuse("rope_scaling", "the published code scales RoPE its own way (its cos/sin cache)")
    if model_type == "deepseek":
        _check_deepseek(raw, refuse)
    else:
        _check_llama_moe(raw, refuse)


def _check_deepseek(raw: dict[str, Any], refuse) -> None:
    if raw.get("n_routed_experts") is None:
        refuse("n_routed_experts", "a DeepSeek model without routed experts is a dense model, not a MoE")
    if raw.get("scoring_func", "softmax") != "softmax":
        refuse("scoring_func", "MoEGate implements only softmax scoring")
    if raw.get("norm_topk_prob", False) is not False:
        refuse("norm_topk_prob", "offload_moe runs DeepSeekMoE-16B's routing, whose top-k weights are not renormalised")


def _check_llama_moe(raw: dict[str, Any], refuse) -> None:
    if raw.get("gate_type", "TopKBalancedNoisyGate") != "TopKBalancedNoisyGate":
        refuse("gate_type", "offload_moe implements the TopKBalancedNoisyGate of LLaMA-MoE v1")
    if raw.get("calculator_type", "UniversalCalculator") != "UniversalCalculator":
        refuse("calculator_type", "only the UniversalCalculator computes every routed token (no capacity drops)")
    if raw.get("add_weight_norm", False) is not False:
        refuse("add_weight_norm", "the calculator's weight norm is not implemented")
    if raw.get("gate_network", "mlp") not in ("mlp", "linear"):
        refuse("gate_network", "TopKBalancedNoisyGate's gate network is 'mlp' or 'linear'")
    sizes, experts, width = raw.get("size_experts"), raw.get("num_experts", 16), raw.get("intermediate_size", 11008)
    if sizes is not None:
        rows = isinstance(sizes, list) and len(sizes) == raw.get("num_hidden_layers") and all(
            isinstance(layer, list) and len(layer) == experts for layer in sizes)
        widths = {w for layer in sizes for w in layer} if rows else set()
        if len(widths) != 1 or not _positive_int(next(iter(widths))):
            refuse("size_experts", "it must give every expert of every layer the same width (one list per layer)")
    elif _positive_int(experts) and _positive_int(width) and width % experts:
        refuse("intermediate_size", f"it does not split into num_experts={experts} equal experts")
    factor = raw.get("score_scale_factor", 1.0)
    factors = factor if isinstance(factor, list) else [factor]
    if (not factors or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f)
                           for f in factors)
            or (isinstance(factor, list) and len(factor) != raw.get("num_hidden_layers"))):
        refuse("score_scale_factor", "it must be a finite number or a list of them, one per layer")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
