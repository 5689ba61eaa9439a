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
from offload_moe.model.build import build_empty_model
from offload_moe.errors import ConfigError
from offload_moe.units import format_bytes
from offload_moe.checkpoint.published import PUBLISHED, published_config
from offload_moe.quant.matmul import expert_fields
from offload_moe.quant.formats import parse_format
from offload_moe.runtime.store import ExpertLayout

FORMATS = ("bf16", "hqq4", "hqq3", "hqq2", "hqq2g64")


def expert_bytes(spec, fmt_name: str) -> int:
    """Bytes of one expert in the converted (canonical) layout a store holds."""
    fmt = parse_format(fmt_name)
    if not fmt.quantized:
        return ExpertLayout(spec.dense_fields(fmt.dtype)).nbytes
    fields = expert_fields(fmt, spec.hidden, spec.intermediate, prepared=False) + spec.bias_fields(torch.bfloat16)
    return ExpertLayout(fields).nbytes


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    warnings.filterwarnings("ignore")
    print("| checkpoint | model_type | experts kind | MoE layers | experts (top-k) | non-expert (bf16) | "
          + " | ".join(f"expert {f}" for f in FORMATS) + " | experts per token, hqq4 |")
    print("|---" * (8 + len(FORMATS)) + "|")
    for name in PUBLISHED:
        config = published_config(name)
        model = build_empty_model(config, torch.bfloat16)
        spec = describe_model(model)
        non_expert = sum(torch.Size(shape).numel() for _, shape in expected_tensors(model, config, spec).values()) * 2
        sizes = {f: fitting_expert_bytes(spec, f) for f in FORMATS}
        per_token_format = "hqq4" if sizes["hqq4"] is not None else "hqq2"  # LLaMA-MoE's widths: no 64-groups
        per_token = spec.top_k * len(spec.layers) * sizes[per_token_format]
        print(f"| {name} | {spec.model_type} | {spec.kind.value} | {len(spec.layers)} | {spec.num_experts} "
              f"({spec.top_k}) | {format_bytes(non_expert)} | "
              + " | ".join("n/a" if sizes[f] is None else format_bytes(sizes[f]) for f in FORMATS)
              + f" | {format_bytes(per_token)}{'' if per_token_format == 'hqq4' else ' (hqq2)'} |")


def fitting_expert_bytes(spec, fmt_name: str) -> int | None:
    """expert_bytes, or None where the experts' widths do not divide into the format's groups."""
    try:
        return expert_bytes(spec, fmt_name)
    except ConfigError:
        return None


if __name__ == "__main__":
    main()
