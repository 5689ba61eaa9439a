"""Converted directories: what `offload-moe convert` writes and `load` reads back.

Layout:

    offload_moe.json               manifest: format_version, quant config, source identity
    config.json, tokenizer files   copied from the source
    model.safetensors              non-expert weights, as in the source (names unchanged)
    experts-LLLLL.safetensors      layer LLLLL: "E.gate_up.<field>", "E.down.<field>" per expert,
                                   the canonical packed fields of offload_moe.quant.quantize

The manifest records the model it was converted from (model_type, moe_layers, num_experts) and a
checksum of every expert file ("checksums": file name -> "blake2b:<hex>"). A load checks the
manifest against config.json and the model, and every expert file's tensor names, shapes and
dtypes against the manifest's format (headers only), before any long work; it then verifies
the checksums while reading the experts. Setting OFFLOAD_MOE_VERIFY=0 skips the checksums
(one extra read of every expert file), never the header checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from offload_moe.checkpoint.names import CheckpointMap, read_expert_fields
from offload_moe.checkpoint.reader import Checkpoint, TensorInfo, read_safetensors_header
from offload_moe.errors import CheckpointError, ConfigError
from offload_moe.model.arch import ArchSpec
from offload_moe.quant.quantize import pack, packed_fields, quantize
from offload_moe.quant.formats import FORMATS, QuantFormat, parse_format


FORMAT_VERSION = 1



MANIFEST_NAME = "offload_moe.json"

VERIFY_ENV = "OFFLOAD_MOE_VERIFY"
CHECKSUM_ALGORITHM = "blake2b"  # in the stdlib, and faster than sha256 on CPUs without SHA instructions
_SAFETENSORS_DTYPES = {torch.uint8: "U8", torch.int8: "I8", torch.int32: "I32", torch.float16: "F16",
                       torch.bfloat16: "BF16", torch.float32: "F32"}



SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "tokenizer.model", "special_tokens_map.json", "chat_template.jinja")



def expert_file_name(layer: int) -> str:
    return f"experts-{layer:05d}.safetensors"



def is_converted(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()



def read_manifest(path: str | Path) -> dict:
    """The manifest of a converted directory, checked for a format version this code reads and
    for well-formed fields (format, bits, group size, layers, expert count, checksums)."""
    manifest_path = Path(path) / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{manifest_path}: not a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{manifest_path}: format_version {version!r}, this offload_moe reads {FORMAT_VERSION}; re-convert"
        )
    _check_manifest_experts(manifest_path, manifest.get("experts"))
    _check_manifest_model(manifest_path, manifest)
    return manifest


def _check_manifest_experts(where: Path, experts) -> None:
    """"experts": a quantized format whose bits and group size are the format's own."""
    if not isinstance(experts, dict):
        raise CheckpointError(f"{where}: key 'experts' is {experts!r}, not an object with format, bits, group_size")
    name, fmt = experts.get("format"), None
    if isinstance(name, str) and name.strip().lower() in FORMATS:
        fmt = parse_format(name)
    if fmt is None or not fmt.quantized:
        allowed = ", ".join(n for n, f in FORMATS.items() if f.quantized)
        raise CheckpointError(f"{where}: experts.format is {name!r}, not a quantized format ({allowed})")
    for key, want in (("bits", fmt.bits), ("group_size", fmt.group_size)):
        if experts.get(key) != want:
            raise CheckpointError(f"{where}: experts.{key} is {experts.get(key)!r}, but format {fmt.name!r} has {want!r}")


def _is_count(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_manifest_model(where: Path, manifest: dict) -> None:
    """model_type, moe_layers, num_experts and checksums are of the types convert writes."""
    layers = manifest.get("moe_layers")
    if not (isinstance(layers, list) and layers and all(_is_count(i, 0) for i in layers)):
        raise CheckpointError(f"{where}: key 'moe_layers' is {layers!r}, not a list of layer indices")
    if not _is_count(manifest.get("num_experts"), 1):
        raise CheckpointError(f"{where}: key 'num_experts' is {manifest.get('num_experts')!r}, not a positive count")
    if not isinstance(manifest.get("model_type"), str):
        raise CheckpointError(f"{where}: key 'model_type' is {manifest.get('model_type')!r}, not a model type name")
    checksums = manifest.get("checksums")
    if checksums is not None and not (isinstance(checksums, dict) and all(
            isinstance(v, str) and v.startswith(f"{CHECKSUM_ALGORITHM}:") for v in checksums.values())):
        raise CheckpointError(f"{where}: key 'checksums' is not a map of file name -> '{CHECKSUM_ALGORITHM}:<hex>'")


def verify_enabled() -> bool:
    """Whether stored bytes are checked against their recorded checksums: $OFFLOAD_MOE_VERIFY,
    on unless set to 0 (skipping saves one read of every expert file per load)."""
    value = os.environ.get(VERIFY_ENV, "1").strip().lower()
    if value in ("", "1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{VERIFY_ENV}={value!r}: use 1 (verify checksums, the default) or 0 (skip them)")


def bytes_checksum(data) -> str:
    """Checksum of a bytes-like object (bytes, a memory map), as recorded in manifests and stores."""
    return f"{CHECKSUM_ALGORITHM}:{hashlib.new(CHECKSUM_ALGORITHM, data).hexdigest()}"


def file_checksum(file: Path) -> str:
    """Checksum of a file's bytes, streamed (OSError when it cannot be read)."""
    with open(file, "rb") as f:
        return f"{CHECKSUM_ALGORITHM}:{hashlib.file_digest(f, CHECKSUM_ALGORITHM).hexdigest()}"


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
    """The manifest agrees with config.json and the model's MoE `layers`, and every layer's expert
    file is present, complete and holds experts 0..num_experts-1 of the manifest (headers only)."""
    manifest = read_manifest(path)
    where = path / MANIFEST_NAME
    _check_model_type(path, manifest)
    if manifest["moe_layers"] != list(layers):
        raise CheckpointError(f"{where}: moe_layers is {manifest['moe_layers']}, but the model of "
                              f"{path / 'config.json'} has MoE layers {list(layers)}")
    want = set(range(manifest["num_experts"]))
    for layer in layers:
        file = path / expert_file_name(layer)
        found = {name.partition(".")[0] for name in read_safetensors_header(file)}
        if found != {str(e) for e in want}:
            raise CheckpointError(f"{file}: holds experts {sorted(found, key=_expert_order)[:8]}, but {where} "
                                  f"says num_experts {manifest['num_experts']}")


def _expert_order(name: str) -> tuple[int, str]:
    return (int(name), "") if name.isdigit() else (-1, name)


def _check_model_type(path: Path, manifest: dict) -> None:
    config_path = path / "config.json"
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{config_path}: unreadable ({exc})") from None
    if manifest["model_type"] != model_type:
        raise CheckpointError(f"{path / MANIFEST_NAME}: model_type is {manifest['model_type']!r}, but "
                              f"{config_path} says {model_type!r}")


def expert_file_tensors(spec: ArchSpec, fmt: QuantFormat, num_experts: int) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """Tensor name -> (shape, safetensors dtype; None: any float, the biases as stored) of one
    layer's expert file of `spec` in `fmt`."""
    fields = {f"{m.name}.{n}": (tuple(shape), _SAFETENSORS_DTYPES.get(dtype, str(dtype)))
              for m in spec.matrices for n, shape, dtype in packed_fields(fmt, m.out_features, m.in_features)}
    fields.update({name: (tuple(shape), None) for name, shape, _ in spec.bias_fields(torch.float32)})
    return {f"{e}.{name}": want for e in range(num_experts) for name, want in fields.items()}


def check_converted(path: Path, spec: ArchSpec, fmt: QuantFormat) -> None:
    """check_converted_experts, plus the manifest's format and expert count against the model and
    `fmt`, and every expert tensor's name, shape and dtype (headers only, before long work)."""
    check_converted_experts(path, spec.moe_layers)
    manifest, where = read_manifest(path), path / MANIFEST_NAME
    if manifest["num_experts"] != spec.num_experts:
        raise CheckpointError(f"{where}: num_experts is {manifest['num_experts']}, but the model of "
                              f"{path / 'config.json'} has {spec.num_experts} experts per layer")
    if parse_format(manifest["experts"]["format"]) != fmt:
        raise CheckpointError(f"{where}: experts.format is {manifest['experts']['format']!r}, not {fmt.name!r}")
    want = expert_file_tensors(spec, fmt, spec.num_experts)
    for layer in spec.moe_layers:
        file = path / expert_file_name(layer)
        _check_expert_header(file, read_safetensors_header(file), want, f"{fmt.name} experts ({where} experts.format)")


def _check_expert_header(file: Path, header: dict[str, TensorInfo], want: dict, what: str) -> None:
    missing, extra = sorted(set(want) - set(header)), sorted(set(header) - set(want))
    if missing or extra:
        raise CheckpointError(f"{file}: not the tensors of {what} of this model "
                              f"(missing {missing[:4]}, unexpected {extra[:4]})")
    for name, (shape, dtype) in want.items():
        info = header[name]
        if info.shape != shape or (dtype is not None and info.dtype != dtype) or (
                dtype is None and info.dtype not in ("F32", "F16", "BF16")):
            raise CheckpointError(f"{file}: tensor {name!r} is {info.dtype} {list(info.shape)}, "
                                  f"{what} of this model need {dtype or 'a float'} {list(shape)}")


def verify_checksums(path: Path, layers: list[int]) -> None:
    """Every expert file's bytes against the checksum convert recorded, unless OFFLOAD_MOE_VERIFY=0."""
    if not verify_enabled():
        return
    manifest, where = read_manifest(path), path / MANIFEST_NAME
    recorded = manifest.get("checksums")
    if recorded is None:
        warnings.warn(f"{where}: no checksums recorded (converted by an older offload_moe): the expert files "
                      "are not verified; re-convert to have them checked", stacklevel=4)
        return
    for layer in layers:
        file = path / expert_file_name(layer)
        if file.name not in recorded:
            raise CheckpointError(f"{where}: key 'checksums' has no entry for {file.name}")
        try:
            actual = file_checksum(file)
        except OSError as exc:
            raise CheckpointError(f"{file}: unreadable ({exc.strerror})") from None
        if actual != recorded[file.name]:
            raise CheckpointError(f"{file}: checksum mismatch: its bytes changed since convert wrote it "
                                  f"(recorded {recorded[file.name][:24]}..., now {actual[:24]}...); re-convert it")


def verify_converted(path: Path, spec: ArchSpec, fmt: QuantFormat) -> None:
    """All checks of a converted directory before its experts are read: headers, then checksums."""
    check_converted(path, spec, fmt)
    verify_checksums(path, spec.moe_layers)
