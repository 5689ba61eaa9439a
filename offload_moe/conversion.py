"""Convert a Hugging Face checkpoint into a quantized, versioned offload_moe directory.

Streaming: one expert matrix is quantized at a time and one layer's packed experts are written
per file, so peak memory is about one layer's packed experts plus one expert in fp32, however
big the model. The output goes to `DST.partial-<pid>` and is renamed to DST only when complete,
so an interrupted run never leaves a directory that looks finished.

The layout of a converted directory is described in offload_moe.checkpoint.converted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from offload_moe.checkpoint.names import build_checkpoint_map
from offload_moe.checkpoint.reader import Checkpoint
from offload_moe.checkpoint.validate import describe_checkpoint_model, expected_tensors, validate_checkpoint
from offload_moe.errors import ConfigError
from offload_moe.quant.formats import check_shape, parse_format
from offload_moe.checkpoint.converted import FORMAT_VERSION, MANIFEST_NAME, SMALL_FILES, converted_expert, expert_file_name, is_converted
from offload_moe.checkpoint.names import CheckpointMap
from offload_moe.model.arch import ArchSpec
from offload_moe.quant.formats import QuantFormat


def _source_identity(ckpt: Checkpoint) -> dict:
    config_bytes = ckpt.config_path.read_bytes()
    shards = sorted({info.file for info in ckpt.tensors.values()})
    return {
        "path": str(ckpt.path.resolve()),
        "config_sha256": hashlib.sha256(config_bytes).hexdigest(),
        "shards": {f.name: f.stat().st_size for f in shards},
    }


def convert(
    src: str | Path, dst: str | Path, *, experts: str = "hqq4", optimize: bool = False, progress: bool = True
) -> Path:
    """Quantize the experts of the checkpoint at `src` into a converted directory `dst`.

    >>> convert("Mixtral-8x7B-Instruct-v0.1", "mixtral-hqq4", experts="hqq4")  # doctest: +SKIP
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    fmt = parse_format(experts)
    if not fmt.quantized:
        raise ConfigError(f"experts={experts!r}: convert writes quantized experts; choose a quantized format")
    if dst.exists():
        raise ConfigError(f"{dst}: already exists; remove it or choose another destination")
    ckpt = Checkpoint(src)
    if is_converted(src):
        raise ConfigError(f"{src}: is already a converted directory")
    config = ckpt.load_config()
    model, spec = describe_checkpoint_model(ckpt, config, torch.float32)
    cmap = build_checkpoint_map(ckpt, model, spec)
    expected = expected_tensors(model, config, spec, cmap, ckpt)
    validate_checkpoint(ckpt, expected, cmap, spec)  # before any long work
    for m in spec.matrices:
        check_shape(fmt, m.out_features, m.in_features)  # ConfigError if the format's groups do not fit

    tmp = dst.with_name(f"{dst.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    try:
        for name in SMALL_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        save_file({disk: ckpt.read(disk).contiguous() for disk, _ in expected.values()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_expert_files(ckpt, cmap, spec, fmt, optimize, tmp, progress)
        manifest = _manifest(ckpt, config, spec, fmt, optimize, seconds=time.perf_counter() - start)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        ckpt.close()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _write_expert_files(ckpt: Checkpoint, cmap: CheckpointMap, spec: ArchSpec, fmt: QuantFormat, optimize: bool,
                        out: Path, progress: bool) -> None:
    """One safetensors file of packed experts per MoE layer, one layer in memory at a time."""
    bar = tqdm(spec.moe_layers, desc=f"quantizing experts ({fmt.name})", unit="layer", disable=not progress)
    for layer in bar:
        tensors = {}
        for expert in range(spec.num_experts):
            fields = converted_expert(ckpt, cmap, spec, layer, expert, fmt, optimize)
            tensors.update({f"{expert}.{k}": v.contiguous() for k, v in fields.items()})
        save_file(tensors, str(out / expert_file_name(layer)), metadata={"format": "pt"})
        del tensors


def _manifest(ckpt: Checkpoint, config, spec: ArchSpec, fmt: QuantFormat, optimize: bool, seconds: float) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "experts": {"format": fmt.name, "bits": fmt.bits, "group_size": fmt.group_size,
                    "method": "hqq" if optimize else "rtn"},
        "attention": None,
        "model_type": config.model_type,
        "moe_layers": spec.moe_layers,
        "num_experts": spec.num_experts,
        "source": _source_identity(ckpt),
        "seconds": round(seconds, 1),
    }


