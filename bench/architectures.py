"""Supported architectures: for each published checkpoint, the experts offload_moe serves and the
bytes one expert and one token's experts take in each expert format (from the store's real
byte layout, built on the meta device from the config alone; no weights are read).

    python bench/architectures.py            # markdown table for the README
"""

from __future__ import annotations

import argparse
import warnings

import torch

from offload_moe.model.arch import describe_model
from offload_moe.loader import expected_tensors
from offload_moe.model.build import build_shape_model
from offload_moe.errors import ConfigError, UnsupportedArchitectureError
from offload_moe.quant.formats import check_shape
from offload_moe.units import format_bytes
from offload_moe.checkpoint.published import PUBLISHED, published_config
from offload_moe.quant.matmul import expert_fields
from offload_moe.quant.formats import parse_format
from offload_moe.runtime.store import ExpertLayout

FORMATS = ("bf16", "hqq4", "hqq3", "hqq2", "hqq2g64")


def expert_bytes(spec, fmt_name: str) -> int | None:
    """Bytes of one expert in the converted (canonical) layout a store holds; None when the
    format's groups do not divide the expert's input dimensions (switch-c-2048's 2080)."""
    fmt = parse_format(fmt_name)
    if not fmt.quantized:
        return ExpertLayout(spec.dense_fields(fmt.dtype)).nbytes
    try:
        for m in spec.matrices:
            check_shape(fmt, m.out_features, m.in_features)
    except ConfigError:
        return None
    fields = (expert_fields(fmt, spec.hidden, spec.intermediate, prepared=False, gated=spec.gated)
              + spec.bias_fields(torch.bfloat16))
    return ExpertLayout(fields).nbytes


def _size(n: int | None) -> str:
    return "n/a" if n is None else format_bytes(n)


def row(name: str) -> str:
    """The README row of one published checkpoint. Encoder-decoder models: "E+D" MoE layers, and
    a generated token's experts are the decoder's (the encoder runs once per prompt)."""
    config = published_config(name)
    model = build_shape_model(config, torch.bfloat16)
    try:
        spec = describe_model(model)
    except UnsupportedArchitectureError as exc:
        return f"| {name} | {config.model_type} | refused: {str(exc).split(': ', 2)[-1][:90]}... |"
    non_expert = sum(torch.Size(shape).numel() for _, shape in expected_tensors(model, config, spec).values()) * 2
    sizes = {f: expert_bytes(spec, f) for f in FORMATS}
    stacks = {k: len(v) for k, v in spec.stack_layers().items()}
    seq2seq = getattr(config, "is_encoder_decoder", False)
    layers = f"{stacks.get('encoder', 0)}+{stacks.get('decoder', 0)}" if seq2seq else str(len(spec.layers))
    token_format = "hqq4" if sizes["hqq4"] is not None else "bf16"
    per_token = spec.top_k * (stacks.get("decoder", 0) if seq2seq else len(spec.layers)) * sizes[token_format]
    return (f"| {name} | {spec.model_type} | {spec.kind.value} | {layers} | {spec.num_experts} ({spec.top_k}) | "
            f"{format_bytes(non_expert)} | " + " | ".join(_size(sizes[f]) for f in FORMATS)
            + f" | {format_bytes(per_token)}" + ("" if token_format == "hqq4" else " (bf16)") + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help="only these checkpoints (default: every one offload_moe knows)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print("| checkpoint | model_type | experts kind | MoE layers | experts (top-k) | non-expert (bf16) | "
          + " | ".join(f"expert {f}" for f in FORMATS) + " | experts per token, hqq4 |")
    print("|---" * (8 + len(FORMATS)) + "|")
    for name in args.names or PUBLISHED:
        print(row(name))


if __name__ == "__main__":
    main()
