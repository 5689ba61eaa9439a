"""Convert a Hugging Face checkpoint into a quantized, versioned offload_moe directory.

Streaming: one expert matrix is quantized at a time and one layer's packed experts are written
per file, so peak memory is about one layer's packed experts (twice: the tensors and their
serialised bytes) plus one expert in fp32, however big the model. The output goes to
`DST.partial-<pid>` and is renamed to DST only when complete, so an interrupted run never leaves
a directory that looks finished; SIGTERM removes the partial folder, and a later convert to the
same DST removes those of killed runs. A lock next to DST (`DST.lock`) makes a second convert to
the same DST fail at once, naming the first. Free space is checked before anything is written.
Each expert file's checksum goes into the manifest; loads verify them.

The layout of a converted directory is described in offload_moe.checkpoint.converted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save, save_file
from tqdm.auto import tqdm

from offload_moe.checkpoint.names import build_checkpoint_map
from offload_moe.checkpoint.reader import Checkpoint
from offload_moe.checkpoint.validate import describe_checkpoint_model, expected_tensors, validate_checkpoint
from offload_moe.errors import ConfigError
from offload_moe.quant.formats import check_shape, parse_format
from offload_moe.checkpoint.converted import (
    FORMAT_VERSION, MANIFEST_NAME, SMALL_FILES, bytes_checksum, converted_expert, expert_file_name,
    expert_file_tensors, is_converted,
)
from offload_moe.checkpoint.names import CheckpointMap
from offload_moe.model.arch import ArchSpec
from offload_moe.quant.formats import QuantFormat
from offload_moe.runtime.disk_store import exclusive_lock, staged_directory, write_file

_DTYPE_BYTES = {"U8": 1, "I8": 1, "I32": 4, "F16": 2, "BF16": 2, "F32": 4}
_HEADER_SLACK = 1 << 20  # bytes: safetensors headers and the manifest, generously


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
    _refuse_existing(dst)
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
    _make_parent(dst)
    try:
        with exclusive_lock(dst, wait=False):
            _refuse_existing(dst)  # finished by another convert before this one took the lock
            with staged_directory(dst, _output_bytes(ckpt, expected, spec, fmt), "the converted directory") as tmp:
                _write_output(ckpt, config, cmap, spec, expected, fmt, optimize, tmp, progress)
    finally:
        ckpt.close()
    return dst


def _refuse_existing(dst: Path) -> None:
    if dst.exists():
        raise ConfigError(f"{dst}: already exists; remove it or choose another destination")


def _make_parent(dst: Path) -> None:
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{dst.parent}: cannot create the destination's folder ({exc.strerror})") from None


def _output_bytes(ckpt: Checkpoint, expected: dict, spec: ArchSpec, fmt: QuantFormat) -> int:
    """What the converted directory will take on disk, from headers and the format (no weights)."""
    non_experts = sum(ckpt.info(disk).end - ckpt.info(disk).begin for disk, _ in expected.values())
    per_layer = sum(torch.Size(shape).numel() * _DTYPE_BYTES.get(dtype or "F32", 4)
                    for shape, dtype in expert_file_tensors(spec, fmt, spec.num_experts).values())
    small = sum((ckpt.path / name).stat().st_size for name in SMALL_FILES if (ckpt.path / name).is_file())
    return non_experts + per_layer * len(spec.moe_layers) + small + _HEADER_SLACK


def _write_output(ckpt: Checkpoint, config, cmap: CheckpointMap, spec: ArchSpec, expected: dict, fmt: QuantFormat,
                  optimize: bool, out: Path, progress: bool) -> None:
    """Everything of the converted directory into `out`; OSError becomes a ConfigError naming the file."""
    start = time.perf_counter()
    for name in SMALL_FILES:
        if (ckpt.path / name).is_file():
            try:
                shutil.copy2(ckpt.path / name, out / name)
            except OSError as exc:
                raise ConfigError(f"{out}: cannot write {name} ({exc.strerror})") from None
    try:
        save_file({disk: ckpt.read(disk).contiguous() for disk, _ in expected.values()},
                  str(out / "model.safetensors"), metadata={"format": "pt"})
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"{out}: cannot write model.safetensors ({exc})") from None
    checksums = _write_expert_files(ckpt, cmap, spec, fmt, optimize, out, progress)
    manifest = _manifest(ckpt, config, spec, fmt, optimize, seconds=time.perf_counter() - start)
    manifest["checksums"] = checksums
    write_file(out / MANIFEST_NAME, json.dumps(manifest, indent=2).encode())


def _write_expert_files(ckpt: Checkpoint, cmap: CheckpointMap, spec: ArchSpec, fmt: QuantFormat, optimize: bool,
                        out: Path, progress: bool) -> dict[str, str]:
    """One safetensors file of packed experts per MoE layer, one layer in memory at a time;
    returns file name -> checksum of the bytes written."""
    checksums = {}
    bar = tqdm(spec.moe_layers, desc=f"quantizing experts ({fmt.name})", unit="layer", disable=not progress)
    for layer in bar:
        tensors = {}
        for expert in range(spec.num_experts):
            fields = converted_expert(ckpt, cmap, spec, layer, expert, fmt, optimize)
            tensors.update({f"{expert}.{k}": v.contiguous() for k, v in fields.items()})
        data = save(tensors, metadata={"format": "pt"})
        del tensors
        write_file(out / expert_file_name(layer), data)
        checksums[expert_file_name(layer)] = bytes_checksum(data)
    return checksums


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


