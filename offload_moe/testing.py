"""Tiny random checkpoints, written exactly as real ones look on disk, for tests and benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .arch import ARCHITECTURES
from .errors import UnsupportedArchitectureError

# Small enough that a forward pass takes milliseconds on 2 CPU cores.
TINY_DEFAULTS: dict[str, dict] = {
    "mixtral": dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    ),
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


def tiny_config(arch: str = "mixtral", **config_overrides):
    """The transformers config of a tiny model of `arch`, with overrides applied."""
    from transformers import AutoConfig

    if arch not in TINY_DEFAULTS:
        raise UnsupportedArchitectureError(f"make_tiny_checkpoint: arch {arch!r} unknown (have {sorted(TINY_DEFAULTS)})")
    settings = {**TINY_DEFAULTS[arch], **config_overrides}
    config = AutoConfig.for_model(arch, **settings)
    config.architectures = [f"{type(config).__name__.removesuffix('Config')}ForCausalLM"]
    return config


def random_disk_tensors(config, arch: str, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random weights for every tensor of the model, under the names real checkpoints use."""
    from transformers import AutoModelForCausalLM

    spec = ARCHITECTURES[arch]
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    hidden = config.hidden_size
    tensors: dict[str, torch.Tensor] = {}

    def rand(shape, std):
        return (torch.randn(shape, generator=gen) * std).to(dtype)

    for name, param in meta.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if ".experts." in name:
            continue
        if "norm" in name:
            tensors[spec.disk_name(name)] = (1.0 + 0.1 * torch.randn(param.shape, generator=gen)).to(dtype)
        elif name.endswith(".gate.weight"):
            tensors[spec.disk_name(name)] = rand(param.shape, 1.0 / hidden**0.5)  # decisive routing
        else:
            tensors[spec.disk_name(name)] = rand(param.shape, 0.5 / param.shape[-1] ** 0.5)
    ffn, num_experts = spec.intermediate_size(config), spec.num_experts(config)
    for layer in spec.moe_layers(config):
        for expert in range(num_experts):
            for role, shape in (("gate", (ffn, hidden)), ("up", (ffn, hidden)), ("down", (hidden, ffn))):
                tensors[spec.disk_expert_name(layer, expert, role)] = rand(shape, 1.0 / shape[1] ** 0.5)
    return tensors


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
    tensors = random_disk_tensors(config, arch, seed, dtype)
    write_safetensors_shards(tensors, path, num_shards)
    config.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path
