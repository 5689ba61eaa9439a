"""The configs of published MoE checkpoints, so `offload-moe plan` can answer before any download.

Only shapes that matter to planning are given (copied from each checkpoint's config.json);
everything else keeps the transformers default. `offload-moe plan Qwen/Qwen3-30B-A3B` uses the
entry here when no such directory exists locally.
"""

from __future__ import annotations

from offload_moe.errors import CheckpointError
from offload_moe.model.remote_families import REMOTE_FAMILIES, remote_config_class

# DeepSeekMoE-16B base and chat share one config.json (bar the tokenizer's chat template).
_DEEPSEEK_MOE_16B = dict(
    model_type="deepseek", architectures=["DeepseekForCausalLM"], vocab_size=102400, hidden_size=2048,
    intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
    moe_layer_freq=1, scoring_func="softmax", norm_topk_prob=False, max_position_embeddings=4096, rms_norm_eps=1e-6,
    rope_theta=10000.0, bos_token_id=100000, eos_token_id=100001)
# LLaMA-MoE v1: LLaMA-2-7B's FFN (11008) split into equal experts; the siblings differ in experts and top-k.
_LLAMA_MOE_V1 = dict(
    model_type="llama_moe", architectures=["LlamaMoEForCausalLM"], vocab_size=32000, hidden_size=4096,
    intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    max_position_embeddings=4096, rms_norm_eps=1e-5, gate_network="mlp", gate_use_softmax=True,
    multiply_gate_scores=True, pad_token_id=0)

PUBLISHED: dict[str, dict] = {
    "mistralai/Mixtral-8x7B-Instruct-v0.1": dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, rope_theta=1e6),
    "mistralai/Mixtral-8x22B-Instruct-v0.1": dict(
        model_type="mixtral", vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
        num_attention_heads=48, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=65536, rope_theta=1e6),
    "Qwen/Qwen1.5-MoE-A2.7B-Chat": dict(
        model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
        max_position_embeddings=8192),
    "Qwen/Qwen3-30B-A3B": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960, rope_theta=1e6),
    "allenai/OLMoE-1B-7B-0924-Instruct": dict(
        model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        max_position_embeddings=4096),
    "deepseek-ai/DeepSeek-V2-Lite-Chat": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, n_group=1,
        topk_group=1, topk_method="greedy", kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
        qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=163840),
    "deepseek-ai/DeepSeek-V3": dict(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3, n_group=8,
        topk_group=4, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
        qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=163840),
    "microsoft/Phi-3.5-MoE-instruct": dict(
        model_type="phimoe", vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=16, num_experts_per_tok=2,
        max_position_embeddings=131072),
    "openai/gpt-oss-20b": dict(
        model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
        sliding_window=128, max_position_embeddings=131072),
    "ibm-granite/granite-3.0-3b-a800m-instruct": dict(
        model_type="granitemoe", vocab_size=49155, hidden_size=1536, intermediate_size=512, num_hidden_layers=32,
        num_attention_heads=24, num_key_value_heads=8, num_local_experts=40, num_experts_per_tok=8,
        max_position_embeddings=4096),
    "databricks/dbrx-instruct": dict(
        model_type="dbrx", vocab_size=100352, d_model=6144, n_heads=48, n_layers=40, max_seq_len=32768,
        attn_config=dict(kv_n_heads=8, clip_qkv=8.0, rope_theta=5e5),
        ffn_config=dict(ffn_hidden_size=10752, moe_num_experts=16, moe_top_k=4)),
    "ai21labs/Jamba-v0.1": dict(
        model_type="jamba", vocab_size=65536, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_experts=16, num_experts_per_tok=2, attn_layer_period=8,
        attn_layer_offset=4, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=16, mamba_d_conv=4,
        mamba_expand=2, mamba_dt_rank=256),
    # Published only with remote code, run by offload_moe's own modules (model/remote_families.py).
    "deepseek-ai/deepseek-moe-16b-base": dict(_DEEPSEEK_MOE_16B),
    "deepseek-ai/deepseek-moe-16b-chat": dict(_DEEPSEEK_MOE_16B),
    "llama-moe/LLaMA-MoE-v1-3_5B-2_8": dict(_LLAMA_MOE_V1, num_experts=8, num_selects=2, size_experts=[[1376] * 8] * 32,
                                            score_scale_factor=4.0),
    "llama-moe/LLaMA-MoE-v1-3_0B-2_16": dict(_LLAMA_MOE_V1, num_experts=16, num_selects=2,
                                             size_experts=[[688] * 16] * 32, score_scale_factor=8.0),
    "llama-moe/LLaMA-MoE-v1-3_5B-4_16": dict(_LLAMA_MOE_V1, num_experts=16, num_selects=4,
                                             size_experts=[[688] * 16] * 32, score_scale_factor=4.0),
}

# Switch Transformers (google/switch-*): T5-style encoder-decoders, non-gated ReLU experts,
# top-1 routing, expert capacity 64; the Hub's config.json values (they set no
# tie_word_embeddings: transformers' default, tied, applies). switch-c-2048's config says 12
# decoder blocks and 15 sparse ones: transformers derives decoder_sparse_step = 12 // 15 = 0
# from that and builds a dense decoder, so its MoE layers are the encoder's 15 only.
# switch-large-128 and switch-xxl-128: shapes of the Switch Transformers paper (Fedus et al.
# 2021, Table 9), not checked against their config.json.
_SWITCH = dict(model_type="switch_transformers", vocab_size=32128, d_kv=64, expert_capacity=64,
               router_dtype="float32", dense_act_fn="relu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
               tie_word_embeddings=True)
_SWITCH_BASE = dict(_SWITCH, d_model=768, d_ff=3072, num_heads=12, num_layers=12, num_decoder_layers=12,
                    num_sparse_encoder_layers=6, num_sparse_decoder_layers=6, num_selected_experts=1)
PUBLISHED.update({f"google/switch-base-{n}": dict(_SWITCH_BASE, num_experts=n) for n in (8, 16, 32, 64, 128, 256)})
PUBLISHED.update({
    "google/switch-large-128": dict(
        _SWITCH, d_model=1024, d_ff=2816, num_heads=16, num_layers=24, num_decoder_layers=24,
        num_sparse_encoder_layers=12, num_sparse_decoder_layers=12, num_experts=128),
    "google/switch-xxl-128": dict(
        _SWITCH, d_model=4096, d_ff=10240, num_heads=64, num_layers=24, num_decoder_layers=24,
        num_sparse_encoder_layers=12, num_sparse_decoder_layers=12, num_experts=128),
    "google/switch-c-2048": dict(
        _SWITCH, d_model=2080, d_ff=6144, num_heads=30, num_layers=15, num_decoder_layers=12,
        num_sparse_encoder_layers=15, num_sparse_decoder_layers=15, num_experts=2048),
    # NLLB-MoE (its config.json): 128 experts every 4th block, top-2 routing; offload_moe runs
    # its intended expert combine, not transformers 5.24's experts forward (model/arch.py).
    "facebook/nllb-moe-54b": dict(
        model_type="nllb-moe", vocab_size=256206, d_model=2048, encoder_layers=24, decoder_layers=24,
        encoder_ffn_dim=8192, decoder_ffn_dim=8192, encoder_attention_heads=16, decoder_attention_heads=16,
        num_experts=128, encoder_sparse_step=4, decoder_sparse_step=4, expert_capacity=64, router_dtype="float32",
        max_position_embeddings=1024, scale_embedding=True, activation_function="relu", bos_token_id=0,
        pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, moe_token_dropout=0.2,
        moe_eval_capacity_token_fraction=1.0, second_expert_policy="all", normalize_router_prob_before_dropping=False,
        batch_prioritized_routing=False),
})


def published_config(name: str):
    """The transformers config of a published checkpoint named like on the Hub."""
    from transformers import AutoConfig

    try:
        settings = dict(PUBLISHED[name])
    except KeyError:
        raise CheckpointError(
            f"{name}: no such model directory, and not a checkpoint offload_moe knows the config of "
            f"(known: {', '.join(sorted(PUBLISHED))})"
        ) from None
    model_type = settings.pop("model_type")
    settings.setdefault("tie_word_embeddings", False)
    if model_type in REMOTE_FAMILIES:  # a remote-code family: offload_moe's own config class
        return remote_config_class(model_type)(**settings)
    return AutoConfig.for_model(model_type, **settings)
