"""Tiny random checkpoints, written exactly as real ones look on disk, for tests and benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from offload_moe.checkpoint.validate import tied_keys
from offload_moe.model.arch import ExpertsKind, describe_model
from offload_moe.model.build import auto_model_class, causal_lm_class
from offload_moe.model.remote_families import REMOTE_FAMILIES, remote_config_class
from offload_moe.errors import UnsupportedArchitectureError

_COMMON = dict(vocab_size=320, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=None,
               tie_word_embeddings=False)
_ATTN = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)

# Small enough that a forward pass takes milliseconds on 2 CPU cores; each keeps its family's
# traits (shared experts, dense layers, grouped routing, biases, hybrid layers). Keys are the
# `arch` names make_tiny_checkpoint takes; "model_type" picks the transformers config class.
TINY_DEFAULTS: dict[str, dict] = {
    "mixtral": dict(_COMMON, **_ATTN, intermediate_size=128, num_hidden_layers=2, num_local_experts=8,
                    num_experts_per_tok=2, rms_norm_eps=1e-5),
    # Mixtral-8x22B's proportions: 6 query heads per KV head, rope_theta 1e6, a 32768-like vocab.
    "mixtral-8x22b": dict(_COMMON, model_type="mixtral", vocab_size=328, hidden_size=192, num_attention_heads=6,
                          num_key_value_heads=1, intermediate_size=256, num_hidden_layers=2, num_local_experts=8,
                          num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5),
    # Qwen2-MoE: a sigmoid-gated shared expert, layer 1 dense (mlp_only_layers).
    "qwen2_moe": dict(_COMMON, **_ATTN, intermediate_size=96, moe_intermediate_size=64,
                      shared_expert_intermediate_size=48, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                      decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False),
    "qwen3_moe": dict(_COMMON, **_ATTN, head_dim=16, intermediate_size=96, moe_intermediate_size=64,
                      num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
                      mlp_only_layers=[], norm_topk_prob=True),
    "olmoe": dict(_COMMON, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
                  num_hidden_layers=2, num_experts=8, num_experts_per_tok=2),
    # DeepSeek-V2(-Lite): MLA attention without q LoRA, 2 shared experts, layer 0 dense.
    "deepseek_v2": dict(_COMMON, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
                        moe_intermediate_size=64, num_hidden_layers=3, n_routed_experts=8, n_shared_experts=2,
                        num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1,
                        topk_method="group_limited_greedy", q_lora_rank=None, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
    # DeepSeek-V3: sigmoid routing with a correction bias, grouped top-k, routed scaling, layer 0 dense.
    "deepseek_v3": dict(_COMMON, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
                        moe_intermediate_size=64, num_hidden_layers=3, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1,
                        routed_scaling_factor=2.5, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8),
    "phimoe": dict(_COMMON, **_ATTN, intermediate_size=128, num_hidden_layers=2, num_local_experts=8,
                   num_experts_per_tok=2),
    # gpt-oss: transposed, interleaved gate/up with biases, clamped SwiGLU, attention sinks.
    "gpt_oss": dict(_COMMON, **_ATTN, head_dim=16, intermediate_size=64, num_hidden_layers=2, num_local_experts=8,
                    num_experts_per_tok=2, sliding_window=16),
    "granitemoe": dict(_COMMON, **_ATTN, intermediate_size=64, num_hidden_layers=2, num_local_experts=8,
                       num_experts_per_tok=2),
    "dbrx": dict(_COMMON, d_model=64, n_heads=4, n_layers=2, max_seq_len=512,
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=64, moe_num_experts=8, moe_top_k=2)),
    # Jamba: Mamba and attention layers, experts every second layer.
    "jamba": dict(_COMMON, **_ATTN, intermediate_size=64, num_hidden_layers=4, num_experts=8, num_experts_per_tok=2,
                  attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8),
    # DeepSeekMoE-16B (remote code, run natively): LLaMA attention, softmax top-k routing without
    # renormalisation, 2 ungated shared experts, layer 0 dense; config.json keys as published.
    "deepseek_moe": dict(_COMMON, model_type="deepseek", hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=96, moe_intermediate_size=64, num_hidden_layers=3, n_routed_experts=8,
                         n_shared_experts=2, num_experts_per_tok=3, first_k_dense_replace=1, moe_layer_freq=1,
                         scoring_func="softmax", norm_topk_prob=False, aux_loss_alpha=0.001, seq_aux=True,
                         rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, pretraining_tp=1),
    # LLaMA-MoE v1 (remote code, run natively): LLaMA attention, a tanh-MLP gate, softmax over the
    # top-k logits, outputs scaled by score_scale_factor; config.json keys as published.
    "llama_moe": dict(_COMMON, model_type="llama_moe", hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=512, num_hidden_layers=2, num_experts=8, num_selects=2,
                      size_experts=[[64] * 8] * 2, gate_type="TopKBalancedNoisyGate", gate_network="mlp",
                      gate_use_softmax=True, gate_use_balance=True, gate_balance_loss_weight=0.01,
                      gate_add_noise=True, gate_noise_epsilon=0.01, calculator_type="UniversalCalculator",
                      multiply_gate_scores=True, score_scale_factor=4.0, add_weight_norm=False,
                      rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, pretraining_tp=1),
}

# The tiny families published only with remote code (run by offload_moe's own modules; their
# reference is tests/test_remote_families.py, not a transformers class).
REMOTE_CODE_ARCHS = frozenset(arch for arch, s in TINY_DEFAULTS.items() if s.get("model_type") in REMOTE_FAMILIES)

# Encoder-decoder families (text to text, AutoModelForSeq2SeqLM), apart from TINY_DEFAULTS whose
# every entry is a causal LM. Switch: sparse every other block in encoder and decoder, top-1
# routing with an expert capacity of 4 tokens, so a 16-token source drops tokens as the published
# models do; T5's special ids (pad 0 = decoder start, eos 1, unk 2) and tied embeddings.
# NLLB-MoE: sparse every other layer in encoder and decoder, top-2 routing whose eval capacity
# (moe_eval_capacity_token_fraction 0.5: ceil(T/2) tokens per expert) drops tokens of a 24-token
# source, moe_token_dropout 0.2 (eval: expert outputs times 0.8); NLLB's special ids (<s> 0,
# <pad> 1, </s> 2 = decoder start, <unk> 3) and a tokenizer with language codes (TINY_LANGUAGE_CODES).
TINY_ENCODER_DECODER: dict[str, dict] = {
    "switch_transformers": dict(vocab_size=320, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=4,
                                num_decoder_layers=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2,
                                num_experts=8, expert_capacity=4, pad_token_id=0, eos_token_id=1,
                                decoder_start_token_id=0, tie_word_embeddings=True),
    "nllb_moe": dict(model_type="nllb-moe", vocab_size=320, d_model=64, encoder_layers=4, decoder_layers=4, encoder_ffn_dim=128,
                     decoder_ffn_dim=128, encoder_attention_heads=4, decoder_attention_heads=4, num_experts=8,
                     encoder_sparse_step=2, decoder_sparse_step=2, max_position_embeddings=512,
                     moe_eval_capacity_token_fraction=0.5, moe_token_dropout=0.2),
}

# Mixtral-Instruct's chat template ([INST] ... [/INST]), as in its tokenizer_config.json.
MIXTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}"
    "{%- endif %}{%- endfor %}"
)


def make_tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <unk>, <s>, </s>) that needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=MIXTRAL_CHAT_TEMPLATE,
    )


TINY_LANGUAGE_CODES = ("eng_Latn", "deu_Latn", "fra_Latn")  # the tiny NLLB tokenizer's (of NLLB's 202)


def _fill_vocab(vocab: dict[str, int], size: int) -> None:
    """Grow `vocab` to `size` tokens with CJK characters, so that every id a tiny model can
    generate decodes to text (a random model's greedy reply may repeat an id past the bytes)."""
    code = 0x4E00
    while len(vocab) < size:
        vocab.setdefault(chr(code), len(vocab))
        code += 1


def make_tiny_nllb_tokenizer(vocab_size: int = 0):
    """transformers' own NllbTokenizer over a character vocabulary (<s> 0, <pad> 1, </s> 2,
    <unk> 3, then "▁" and the 256 characters of the byte-level alphabet, filled up to
    `vocab_size` with <mask> and the language codes TINY_LANGUAGE_CODES, the last ids) with the
    codes as special tokens: `src_lang` puts its code before the source, and a
    target code's id is what generation forces first, as with facebook/nllb-moe-54b's tokenizer."""
    from tokenizers import pre_tokenizers
    from transformers import NllbTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "\u2581": 4}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # sorted: alphabet()'s order changes per process
        vocab.setdefault(ch, len(vocab))
    _fill_vocab(vocab, vocab_size - 1 - len(TINY_LANGUAGE_CODES))  # <mask> and the codes come after
    return NllbTokenizer(vocab=vocab, merges=[], additional_special_tokens=list(TINY_LANGUAGE_CODES),
                         src_lang=TINY_LANGUAGE_CODES[0])


def make_tiny_seq2seq_tokenizer(config):
    """A byte-level tokenizer for a tiny encoder-decoder model, its special tokens at the config's
    ids (Switch/T5: <pad> 0, </s> 1, <unk> 2; NLLB: <s> 0, <pad> 1, </s> 2, <unk> 3); the source
    ends with </s>, as T5's and NLLB's tokenizers end it. No chat template: text to text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if config.model_type == "nllb-moe":
        return make_tiny_nllb_tokenizer(config.vocab_size)
    specials = {"<s>": config.bos_token_id, "<pad>": config.pad_token_id, "</s>": config.eos_token_id}
    specials = {name: i for name, i in specials.items() if isinstance(i, int)}
    specials["<unk>"] = max(specials.values()) + 1
    vocab = dict(sorted(specials.items(), key=lambda item: item[1]))
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # sorted: alphabet()'s order changes per process
        vocab.setdefault(ch, len(vocab))
    _fill_vocab(vocab, config.vocab_size)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", specials["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>" if "<s>" in specials else None)


def tiny_config(arch: str = "mixtral", **config_overrides):
    """The transformers config of a tiny model of `arch`, with overrides applied."""
    from transformers import AutoConfig

    known = {**TINY_DEFAULTS, **TINY_ENCODER_DECODER}
    if arch not in known:
        raise UnsupportedArchitectureError(f"make_tiny_checkpoint: arch {arch!r} unknown (have {sorted(known)})")
    settings = {**known[arch], **config_overrides}
    model_type = settings.pop("model_type", arch)
    if model_type in REMOTE_FAMILIES:  # offload_moe's own config class, named as the published one
        config = remote_config_class(model_type)(**settings)
        config.architectures = [REMOTE_FAMILIES[model_type].causal_lm_class]
        return config
    config = AutoConfig.for_model(model_type, **settings)
    config.architectures = [_causal_lm_class(config).__name__]
    return config


def published_config_json(arch: str, dtype: torch.dtype, **config_overrides) -> dict:
    """config.json of a tiny remote-code family checkpoint, as the published ones are written:
    their keys (rope_theta, torch_dtype), their architectures and auto_map."""
    settings = {**TINY_DEFAULTS[arch], **config_overrides}
    family = REMOTE_FAMILIES[settings["model_type"]]
    return {"architectures": [family.causal_lm_class], "auto_map": family.auto_map(), **settings,
            "torch_dtype": str(dtype).removeprefix("torch."), "transformers_version": "4.36.0"}


def _causal_lm_class(config) -> type:
    return causal_lm_class(config) or auto_model_class(config)._model_mapping[type(config)]


def _meta_model(config):
    native = causal_lm_class(config)
    with torch.device("meta"):
        if native is not None:
            model = native._from_config(config)
            model._weight_conversions = native.checkpoint_conversions()  # what revert_weight_conversion reverses
            return model
        return auto_model_class(config).from_config(config)


def random_model_tensors(config, seed: int, dtype: torch.dtype, meta=None) -> dict[str, torch.Tensor]:
    """Random weights for every tensor of the model, under the model's own names (fused experts).

    Norms near 1, routers scaled so routing is decisive, experts and other weights scaled by
    their fan-in so activations stay O(1) through the layers."""
    meta = meta if meta is not None else _meta_model(config)  # shapes and names only
    if getattr(config, "is_encoder_decoder", False):
        return _random_encoder_decoder_tensors(meta, seed, dtype)
    spec = describe_model(meta)
    gen = torch.Generator().manual_seed(seed)
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    routers = {f"{layer.router_path}.weight" for layer in spec.layers if layer.router_path}
    state = meta.state_dict()
    # Routers that are whole networks (LLaMA-MoE's gate MLP): every weight under them.
    router_prefixes = tuple(f"{layer.router_path}." for layer in spec.layers
                            if layer.router_path and f"{layer.router_path}.weight" not in state)
    experts_prefixes = tuple(layer.experts_path + "." for layer in spec.layers)

    def rand(shape, std):
        return (torch.randn(shape, generator=gen) * std).to(dtype)

    tensors: dict[str, torch.Tensor] = {}
    for name, param in state.items():
        if (name == "lm_head.weight" and tied) or name.startswith(experts_prefixes):
            continue
        if not param.dtype.is_floating_point:
            tensors[name] = torch.zeros(param.shape, dtype=param.dtype)
        elif "norm" in name:
            tensors[name] = (1.0 + 0.1 * torch.randn(param.shape, generator=gen)).to(dtype)
        elif name in routers:
            tensors[name] = rand(param.shape, 1.0 / spec.hidden**0.5)  # decisive routing
        elif name.startswith(router_prefixes):
            tensors[name] = rand(param.shape, 2.0 / param.shape[-1] ** 0.5)  # decisive through the gate's tanh
        else:
            tensors[name] = rand(param.shape, 0.5 / param.shape[-1] ** 0.5)
    h, f = spec.hidden, spec.intermediate
    for layer in spec.layers:
        per_expert: dict[str, list[torch.Tensor]] = {}
        for _ in range(spec.num_experts):
            if spec.kind is ExpertsKind.FUSED:
                gate, up, down = rand((f, h), h**-0.5), rand((f, h), h**-0.5), rand((h, f), f**-0.5)
                fields = {"gate_up_proj": torch.cat([gate, up]), "down_proj": down}
            elif spec.kind is ExpertsKind.TRANSPOSED:
                fields = {"gate_up_proj": rand((h, 2 * f), h**-0.5), "gate_up_proj_bias": rand((2 * f,), 0.1),
                          "down_proj": rand((f, h), f**-0.5), "down_proj_bias": rand((h,), 0.1)}
            else:  # DBRX: [E*F, H] each; w2 is used as x @ w2
                fields = {"mlp.w1": rand((f, h), h**-0.5), "mlp.v1": rand((f, h), h**-0.5),
                          "mlp.w2": rand((f, h), f**-0.5)}
            for name, t in fields.items():
                per_expert.setdefault(name, []).append(t)
        for name, ts in per_expert.items():
            merged = torch.cat(ts) if spec.kind is ExpertsKind.DBRX else torch.stack(ts)
            tensors[f"{layer.experts_path}.{name}"] = merged
    return tensors


def _random_encoder_decoder_tensors(meta, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """random_model_tensors for an encoder-decoder model, whose experts are ordinary per-expert
    linear layers (written without describe_model, so a refused family still gets a checkpoint):
    norms near 1, routers (`router.classifier`) decisive, everything else scaled by its fan-in.
    Tied keys (the stacks' embeddings, lm_head: `shared.weight`) are left out, as save_pretrained does."""
    gen = torch.Generator().manual_seed(seed)
    tied = tied_keys(meta)
    tensors: dict[str, torch.Tensor] = {}
    for name, param in meta.state_dict().items():
        if name in tied:
            continue
        if not param.dtype.is_floating_point:
            tensors[name] = torch.zeros(param.shape, dtype=param.dtype)
            continue
        noise = torch.randn(param.shape, generator=gen)
        if "norm" in name:
            tensors[name] = (1.0 + 0.1 * noise).to(dtype)
        elif "router.classifier" in name:
            tensors[name] = (noise * param.shape[-1] ** -0.5).to(dtype)
        else:
            tensors[name] = (noise * 0.5 * param.shape[-1] ** -0.5).to(dtype)
    return tensors


def random_disk_tensors(config, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """random_model_tensors under the names real checkpoints use on disk (per-expert tensors
    where the published checkpoints have them), by transformers' own reverse conversion."""
    from transformers.core_model_loading import revert_weight_conversion

    meta = _meta_model(config)
    tensors = random_model_tensors(config, seed, dtype, meta)
    if config.model_type == "llama_moe":
        return _llama_moe_disk_tensors(config, meta, tensors, seed, dtype)
    return {name: t.contiguous() for name, t in revert_weight_conversion(meta, tensors).items()}


def _llama_moe_disk_tensors(config, meta, tensors: dict[str, torch.Tensor], seed: int,
                            dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """LLaMA-MoE's published layout: one tensor per expert and matrix under the calculator's
    names (llama_moe.EXPERT_PATTERNS), and the gate's noise projection (used only in training)."""
    from offload_moe.model.llama_moe import EXPERT_PATTERNS

    gen = torch.Generator().manual_seed(seed + 1)
    for layer in describe_model(meta).layers:
        decoder = layer.block_path.rpartition(".")[0]  # model.layers.N
        gate_up = tensors.pop(f"{layer.experts_path}.gate_up_proj")
        down = tensors.pop(f"{layer.experts_path}.down_proj")
        for e in range(gate_up.shape[0]):
            gate, up = gate_up[e].chunk(2)
            for role, t in (("gate", gate), ("up", up), ("down", down[e])):
                tensors[f"{decoder}.{EXPERT_PATTERNS[role].replace('*', str(e))}"] = t
        if getattr(config, "gate_add_noise", False):
            shape = (config.num_experts, config.hidden_size)
            tensors[f"{layer.block_path}.gate.weight_noise.weight"] = torch.randn(shape, generator=gen).to(dtype)
    return {name: t.contiguous() for name, t in tensors.items()}


def write_safetensors_shards(tensors: dict[str, torch.Tensor], path: Path, num_shards: int) -> None:
    """Write `tensors` as one model.safetensors or as `num_shards` shards plus an index."""
    if num_shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(tensors)
    per_shard = -(-len(names) // num_shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(num_shards):
        shard_name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {n: tensors[n].contiguous() for n in names[i * per_shard : (i + 1) * per_shard]}
        save_file(chunk, str(path / shard_name), metadata={"format": "pt"})
        for n, t in chunk.items():
            weight_map[n] = shard_name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_tiny_checkpoint(
    path: str | Path,
    arch: str = "mixtral",
    seed: int = 0,
    num_shards: int = 1,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> Path:
    """Write a random-weight checkpoint of `arch` to `path` and return the path.

    The directory looks like a real Hugging Face checkpoint: config.json, safetensors
    (sharded with model.safetensors.index.json when num_shards > 1) under the per-expert
    names published checkpoints use, and a byte-level tokenizer that loads offline.

    >>> make_tiny_checkpoint("/tmp/tiny", num_hidden_layers=4)  # doctest: +SKIP
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch, **config_overrides)
    config.dtype = dtype
    tensors = random_disk_tensors(config, seed, dtype)
    write_safetensors_shards(tensors, path, num_shards)
    if config.model_type in REMOTE_FAMILIES:  # written as the published config.json, not by our class
        (path / "config.json").write_text(json.dumps(published_config_json(arch, dtype, **config_overrides), indent=2))
    else:
        config.save_pretrained(path)
    seq2seq = getattr(config, "is_encoder_decoder", False)
    (make_tiny_seq2seq_tokenizer(config) if seq2seq else make_tiny_tokenizer()).save_pretrained(path)
    return path
