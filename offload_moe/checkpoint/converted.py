"""Converted directories: what `offload-moe convert` writes and `load` reads back.

Layout:

    offload_moe.json               manifest: format_version, quant config, source identity
    config.json, tokenizer files   copied from the source
    model.safetensors              non-expert weights, as in the source (names unchanged)
    experts-LLLLL.safetensors      layer LLLLL: "E.gate_up.<field>", "E.down.<field>" per expert,
                                   the canonical packed fields of offload_moe.quant.quantize
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from offload_moe.checkpoint.names import CheckpointMap, read_expert_fields
from offload_moe.checkpoint.reader import Checkpoint, read_safetensors_header
from offload_moe.errors import CheckpointError
from offload_moe.model.arch import ArchSpec
from offload_moe.quant.quantize import pack, quantize
from offload_moe.quant.formats import QuantFormat


FORMAT_VERSION = 1



MANIFEST_NAME = "offload_moe.json"



SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "tokenizer.model", "special_tokens_map.json", "chat_template.jinja")



def expert_file_name(layer: int) -> str:
    return f"experts-{layer:05d}.safetensors"



def is_converted(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()



def read_manifest(path: str | Path) -> dict:
    """The manifest of a converted directory, checked for a format version this code reads."""
    manifest_path = Path(path) / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{manifest_path}: format_version {version!r}, this offload_moe reads {FORMAT_VERSION}; re-convert"
        )
    return manifest



def quantize_expert(matrices: dict[str, torch.Tensor], fmt: QuantFormat, optimize: bool) -> dict[str, torch.Tensor]:
    """Canonical packed fields of one expert's [out, in] matrices, named "<matrix>.<field>"."""
    fields = {}
    for matrix, weight in matrices.items():
        fields.update({f"{matrix}.{k}": v for k, v in pack(quantize(weight.float(), fmt, optimize=optimize)).items()})
    return fields



def converted_expert(
    ckpt: Checkpoint, cmap: CheckpointMap, spec: ArchSpec, layer: int, expert: int, fmt: QuantFormat, optimize: bool
) -> dict[str, torch.Tensor]:
    """One expert as a converted directory stores it: packed canonical matrices, biases as stored."""
    canonical = spec.canonical(read_expert_fields(ckpt, cmap, spec, layer, expert))
    fields = quantize_expert({m: canonical[m] for m in ("gate_up", "down")}, fmt, optimize)
    fields.update({name: t for name, t in canonical.items() if name.endswith("_bias")})
    return fields



def check_converted_experts(path: Path, layers: list[int]) -> None:
    """Every layer's expert file is present and complete (headers only)."""
    for layer in layers:
        read_safetensors_header(path / expert_file_name(layer))
