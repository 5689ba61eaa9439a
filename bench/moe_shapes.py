"""The random MoE models of published shapes that bench/side_by_side.py and bench/profile_decode.py run.

Every shape is written as the Mixtral architecture (HF MixtralForCausalLM, per-expert names on
disk) and, for llama.cpp, as arch "llama" with fused expert tensors, so that both engines
compute the same function. Only the shape is the published model's (it decides the speed):
gpt-oss's attention sinks, biases and clamped SwiGLU, and Qwen3's q/k norms are left out.

One folder per shape and layer count, `<dir>/<shape>-dims-l<layers>/`:

    hf/              the Hugging Face checkpoint (bf16 safetensors, per-expert names)
    hf-hqq4/         offload_moe.convert(hf, experts="hqq4"): round-to-nearest int4, group 64
    model-q4_0.gguf  the same weights for llama.cpp: Q4_0 experts, f16 attention, embeddings and
                     lm_head, f32 norms and router; a dummy vocabulary (token ids are fed directly)

Each file is written once under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import offload_moe
from offload_moe.testing import make_tiny_checkpoint


@dataclass(frozen=True)
class Shape:
    dims: dict  # MixtralConfig keyword arguments
    layers: int  # the default decoder layer count


_COMMON = dict(max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-5)

# Default layer counts keep every engine of side_by_side (transformers bf16, offload_moe hqq4,
# llama.cpp Q4_0) loaded at once within 24 GiB (side_by_side.engine_bytes is the estimate).
SHAPES: dict[str, Shape] = {
    "mixtral": Shape(dict(_COMMON, vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                          num_local_experts=8, num_experts_per_tok=2), layers=2),
    "qwen3-30b-a3b": Shape(dict(_COMMON, vocab_size=151936, hidden_size=2048, intermediate_size=768,
                                num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                num_local_experts=128, num_experts_per_tok=8), layers=6),
    "gpt-oss-20b": Shape(dict(_COMMON, vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                              num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                              num_local_experts=32, num_experts_per_tok=4), layers=4),
}


# offload_moe's non-expert dtype in the benchmarks: the GGUF's (f16), so both engines read the same bytes
OFFLOAD_DTYPE = "float16"


@dataclass(frozen=True)
class ModelFiles:
    root: Path
    hf: Path
    hqq4: Path
    gguf: Path


def add_model_args(parser: argparse.ArgumentParser, default_shape: str | None) -> None:
    """--shape, --layers, --dir: which model folder a benchmark uses."""
    parser.add_argument("--shape", choices=SHAPES, default=default_shape, help="the published model's shape")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's, see SHAPES)")
    parser.add_argument("--dir", default="bench/out/side_by_side", help="where the model folders are written")


def model_files(args: argparse.Namespace) -> ModelFiles:
    """The paths of the folder that --shape/--layers/--dir name (nothing is written)."""
    layers = args.layers or SHAPES[args.shape].layers
    root = Path(args.dir) / f"{args.shape}-dims-l{layers}"
    return ModelFiles(root, root / "hf", root / "hf-hqq4", root / "model-q4_0.gguf")


def build_all(args: argparse.Namespace) -> ModelFiles:
    """Write whatever of the folder is missing and return its paths."""
    files = model_files(args)
    files.root.mkdir(parents=True, exist_ok=True)
    build_checkpoint(files.hf, SHAPES[args.shape].dims, args.layers or SHAPES[args.shape].layers)
    build_gguf(files.hf, files.gguf)
    build_converted(files.hf, files.hqq4)
    return files


def build_checkpoint(path: Path, dims: dict, layers: int) -> Path:
    """The random bf16 Hugging Face Mixtral checkpoint of `dims` (a Shape's) with `layers` decoder layers."""
    if (path / "config.json").is_file():
        return path
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"writing {path} ({layers} layers, bf16) ...", flush=True)
    make_tiny_checkpoint(partial, seed=0, num_shards=layers + 1, dtype=torch.bfloat16,
                         num_hidden_layers=layers, **dims)
    partial.rename(path)
    return path


def build_converted(hf: Path, out: Path) -> Path:
    if not (out / "offload_moe.json").is_file():
        print(f"writing {out} (hqq4, round-to-nearest) ...", flush=True)
        offload_moe.convert(hf, out, experts="hqq4", progress=False)
    return out


# ---------------------------------------------------------------------------------------------
# the GGUF


class CheckpointReader:
    """Tensors of a safetensors checkpoint by name, as float32 numpy arrays."""

    def __init__(self, hf: Path):
        from safetensors import safe_open

        handles = [safe_open(str(f), framework="pt") for f in sorted(hf.glob("*.safetensors"))]
        self._where = {name: h for h in handles for name in h.keys()}

    def __call__(self, name: str) -> np.ndarray:
        return self._where[name].get_tensor(name).float().numpy()


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


# llama.cpp's expert roles -> Mixtral's per-expert names: gate [F, H], up [F, H], down [H, F]
EXPERT_NAMES = {"gate": "w1", "down": "w2", "up": "w3"}


def expert_weight(get: CheckpointReader, layer: int, expert: int, role: str) -> np.ndarray:
    return get(f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{EXPERT_NAMES[role]}.weight")


def build_gguf(hf: Path, out: Path) -> Path:
    """The same weights as a llama.cpp GGUF: Q4_0 experts, f16 attention/embeddings/lm_head."""
    if out.is_file():
        return out
    import gguf
    from transformers import AutoConfig

    print(f"writing {out} ...", flush=True)
    cfg = AutoConfig.from_pretrained(hf)
    partial = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(str(partial), "llama")
    _gguf_metadata(w, cfg)
    _gguf_vocabulary(w, cfg.vocab_size)
    _gguf_tensors(w, cfg, CheckpointReader(hf))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    partial.rename(out)
    return out


def _gguf_metadata(w, cfg) -> None:
    import gguf

    w.add_name("random-moe-dims")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim(cfg))  # llama.cpp's default is hidden / heads, not every shape's
    w.add_value_length(head_dim(cfg))
    w.add_rope_dimension_count(head_dim(cfg))
    rope = getattr(cfg, "rope_parameters", None)
    w.add_rope_freq_base(float(rope["rope_theta"]) if rope else float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.num_local_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)


def _gguf_vocabulary(w, vocab_size: int) -> None:
    """A dummy SentencePiece-style vocabulary: <unk>, <s>, </s>, 256 byte tokens, then fillers."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(len(tokens), vocab_size)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (vocab_size - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab_size)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)


def _permute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved RoPE rows (as convert_hf_to_gguf)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(w, cfg, get: CheckpointReader) -> None:
    import gguf

    f16 = lambda a: a.astype(np.float16)  # noqa: E731
    w.add_tensor("token_embd.weight", f16(get("model.embed_tokens.weight")))
    w.add_tensor("output_norm.weight", get("model.norm.weight"))
    w.add_tensor("output.weight", f16(get("lm_head.weight")))
    q4 = gguf.GGMLQuantizationType.Q4_0
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        attn = {role: get(f"{p}.self_attn.{role}_proj.weight") for role in "qkvo"}
        w.add_tensor(f"blk.{i}.attn_norm.weight", get(f"{p}.input_layernorm.weight"))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", get(f"{p}.post_attention_layernorm.weight"))
        w.add_tensor(f"blk.{i}.attn_q.weight", f16(_permute_rope(attn["q"], cfg.num_attention_heads)))
        w.add_tensor(f"blk.{i}.attn_k.weight", f16(_permute_rope(attn["k"], cfg.num_key_value_heads)))
        w.add_tensor(f"blk.{i}.attn_v.weight", f16(attn["v"]))
        w.add_tensor(f"blk.{i}.attn_output.weight", f16(attn["o"]))
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", get(f"{p}.block_sparse_moe.gate.weight"))
        for role in EXPERT_NAMES:  # one role's stack at a time: [E, rows, cols] float32
            stacked = np.stack([expert_weight(get, i, e, role) for e in range(cfg.num_local_experts)])
            w.add_tensor(f"blk.{i}.ffn_{role}_exps.weight", gguf.quants.quantize(stacked, q4), raw_dtype=q4)
            del stacked
