"""Where a model's experts come from and how they reach the host store: one strategy per source.

`resolve_expert_source` decides once, before any weight is read, what kind of source the
checkpoint is (a GPTQ checkpoint, a converted directory, or plain 16/32-bit weights) and which
format its experts are stored in (asked for, the converted one, GPTQ's exact affine form, or the
automatic choice). `ExpertSource.fill` then writes every expert into the destination views
(the store's buffers) in that format, with a progress bar.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psutil
import torch
from tqdm.auto import tqdm

from offload_moe.checkpoint.converted import (
    expert_file_name, is_converted, quantize_expert, read_manifest, verify_converted,
)
from offload_moe.checkpoint.gptq import GptqConfig, gptq_to_affine, read_gptq_expert
from offload_moe.checkpoint.names import CheckpointMap, read_expert_fields
from offload_moe.checkpoint.reader import Checkpoint, read_safetensors_header, read_tensor
from offload_moe.checkpoint.validate import read_weight
from offload_moe.errors import CheckpointError, ConfigError
from offload_moe.model.arch import ArchSpec, ExpertsKind, role_shapes
from offload_moe.quant.formats import FormatKind, QuantFormat, check_shape, dense_format, parse_format
from offload_moe.quant.matmul import cpu_int4_block_n, prepare_expert_for_cpu
from offload_moe.quant.quantize import QTensor, pack, packed_fields

AUTO_FORMAT = "hqq4"
RAM_HEADROOM = 0.8  # of the free host RAM, for 16-bit experts before they are quantized by default
ExpertViews = Callable[[int, int], dict[str, torch.Tensor]]  # (layer, expert) -> its store views


class SourceKind(enum.Enum):
    CHECKPOINT = "checkpoint"  # the checkpoint's own 16/32-bit experts, quantized while loading if asked
    GPTQ = "gptq"  # auto-gptq tensors: mapped exactly onto our affine format, or dequantized
    CONVERTED = "converted"  # an `offload-moe convert` directory: packed experts, read as they are


@dataclass(frozen=True)
class ExpertSource:
    """The experts' source kind and the format the store holds them in."""

    kind: SourceKind
    fmt: QuantFormat
    gptq: GptqConfig | None = None
    optimize: bool = False  # quantize with HQQ's optimiser (CHECKPOINT only)

    def fill(self, ckpt: Checkpoint, cmap: CheckpointMap, spec: ArchSpec, views: ExpertViews, progress: bool) -> None:
        """Every expert of every MoE layer into `views(layer, expert)`."""
        if self.kind is SourceKind.CONVERTED:
            _fill_from_converted(ckpt, spec, views, self.fmt, progress)
        elif self.kind is SourceKind.GPTQ:
            _fill_from_gptq(ckpt, cmap, spec, views, self.fmt, self.gptq, progress)
        else:
            _fill_from_checkpoint(ckpt, cmap, spec, views, self.fmt, self.optimize, progress)


def resolve_expert_source(
    ckpt: Checkpoint, cmap: CheckpointMap, spec: ArchSpec, gptq: GptqConfig | None, experts: str | None,
    dtype: torch.dtype, optimize: bool, cpu_memory: int | None,
) -> ExpertSource:
    """The one decision of where the experts come from and in which format (headers only).

    gptq: the checkpoint's GPTQ config (checkpoint.validate.gptq_config_of), None if it has none;
    experts: the format asked for (a FORMATS name, "gptq", or None for automatic)."""
    if gptq is not None:
        return _gptq_source(ckpt, cmap, spec, gptq, experts, dtype)
    if experts is not None and experts.strip().lower() == "gptq":
        raise ConfigError(f"{ckpt.path}: experts='gptq' needs a GPTQ checkpoint (quantize_config.json or a "
                          "quantization_config with quant_method 'gptq'); this one has none")
    if is_converted(ckpt.path):
        stored = parse_format(read_manifest(ckpt.path)["experts"]["format"])
        if experts is not None and parse_format(experts) != stored:
            raise ConfigError(f"{ckpt.path}: converted with experts={stored.name!r}, not {parse_format(experts).name!r}")
        verify_converted(ckpt.path, spec, stored)  # headers and checksums, before long work
        return ExpertSource(SourceKind.CONVERTED, stored)
    if experts is not None:
        fmt = parse_format(experts)
    else:
        fmt = auto_expert_format(spec, dtype, cpu_memory, str(ckpt.path))
    for m in spec.matrices:
        check_shape(fmt, m.out_features, m.in_features)  # ConfigError naming format and shape, before long work
    return ExpertSource(SourceKind.CHECKPOINT, fmt, optimize=optimize and fmt.quantized)


def _gptq_source(ckpt: Checkpoint, cmap: CheckpointMap, spec: ArchSpec, gptq: GptqConfig, experts: str | None,
                 dtype: torch.dtype) -> ExpertSource:
    """GPTQ experts in our affine format when their layout maps exactly onto the int4 kernel,
    else dequantized to `dtype` (with a warning)."""
    if experts is not None and experts.strip().lower() != "gptq":
        raise ConfigError(f"{ckpt.path}: a GPTQ checkpoint is served as is; pass experts='gptq' or nothing, "
                          f"not experts={experts!r}")
    fmt = None
    if not gptq.desc_act and gptq.bits in (2, 3, 4):
        first = gptq_expert(ckpt, cmap, spec, spec.moe_layers[0], 0, gptq)
        fmt = None if first is None else first["down"].fmt
    if fmt is None:
        warnings.warn(f"{ckpt.path}: GPTQ {gptq.bits}-bit with desc_act={gptq.desc_act} has no exact int4-kernel "
                      f"form here; its experts are dequantized to {dtype}", stacklevel=4)
        fmt = dense_format(dtype)
    return ExpertSource(SourceKind.GPTQ, fmt, gptq=gptq)


def auto_expert_format(spec: ArchSpec, dtype: torch.dtype, cpu_memory: int | None, where: str) -> QuantFormat:
    """The expert format when none was asked for: the checkpoint's own (exact) when its experts fit
    the free host RAM, else hqq4, quantized while loading, with a warning that says so. With an
    explicit `cpu_memory` budget nothing is quantized unasked: what does not fit is served from disk."""
    exact = dense_format(dtype)
    if cpu_memory is not None:
        return exact
    field_bytes = sum(torch.Size(shape).numel() * dt.itemsize for _, shape, dt in spec.dense_fields(dtype))
    dense = len(spec.layers) * spec.num_experts * field_bytes
    free = psutil.virtual_memory().available
    if dense <= RAM_HEADROOM * free:
        return exact
    fmt = parse_format(AUTO_FORMAT)
    try:
        for m in spec.matrices:
            check_shape(fmt, m.out_features, m.in_features)
    except ConfigError:
        return exact  # shapes hqq4's groups do not divide: keep 16-bit (and the disk spill, if set)
    warnings.warn(
        f"{where}: the experts take {dense / 2**30:.1f} GiB at 16 bits, more than the free host RAM "
        f"({free / 2**30:.1f} GiB) allows; quantizing them to {AUTO_FORMAT} while loading (exact logits need "
        f"experts='{str(dtype).removeprefix('torch.')}' with enough RAM, or cpu_memory= to serve them from disk)",
        stacklevel=5,
    )
    return fmt


def gptq_expert(ckpt: Checkpoint, cmap: CheckpointMap, spec: ArchSpec, layer: int, expert: int,
                gptq: GptqConfig) -> dict[str, QTensor] | None:
    """One GPTQ expert as our affine QTensors ("gate_up" fused, "down"), or None when its
    layout has no exact affine form (act-order, 8-bit)."""
    qts = {}
    for role, shape in role_shapes(spec.hidden, spec.intermediate).items():
        t = read_gptq_expert(ckpt, cmap, layer, expert, role, config=gptq, shape=shape)
        qts[role] = gptq_to_affine(t.qweight, t.qzeros, t.scales, t.g_idx, gptq.bits, gptq.group_size,
                                   zero_offset=gptq.zero_offset, name=t.prefix)
        if qts[role] is None:
            return None
    gate, up = qts["gate"], qts["up"]
    gate_up = QTensor(gate.fmt, (gate.shape[0] + up.shape[0], gate.shape[1]), torch.cat([gate.codes, up.codes]),
                      torch.cat([gate.scale, up.scale]), torch.cat([gate.zero, up.zero]))
    return {"gate_up": gate_up, "down": qts["down"]}


def _layers_bar(spec: ArchSpec, desc: str, progress: bool) -> Iterable[int]:
    return tqdm(spec.moe_layers, desc=desc, unit="layer") if progress else spec.moe_layers


def _block_n(fmt: QuantFormat) -> int | None:
    return cpu_int4_block_n() if fmt.kind is FormatKind.AFFINE else None


def _fill_from_gptq(ckpt: Checkpoint, cmap: CheckpointMap, spec: ArchSpec, views: ExpertViews, fmt: QuantFormat,
                    gptq: GptqConfig, progress: bool) -> None:
    """GPTQ experts: converted exactly to our affine format, or dequantized (a dense `fmt`)."""
    if spec.kind is not ExpertsKind.FUSED:
        raise CheckpointError(f"{ckpt.path}: GPTQ experts are read for the fused (Mixtral-style) layout only")
    block_n = _block_n(fmt)
    for layer in _layers_bar(spec, f"experts -> host store (gptq {gptq.bits}-bit)", progress):
        for expert in range(spec.num_experts):
            dest = views(layer, expert)
            if not fmt.quantized:
                for m in spec.matrices:
                    dest[m.name].copy_(torch.cat([
                        read_weight(ckpt, cmap.disk_expert_name(layer, expert, r), gptq) for r in m.roles]))
                continue
            qts = gptq_expert(ckpt, cmap, spec, layer, expert, gptq)
            if qts is None or qts["down"].fmt != fmt or qts["gate_up"].fmt != fmt:
                raise CheckpointError(f"{ckpt.path}: layer {layer} expert {expert} is not in the GPTQ layout of the others")
            packed = {f"{m}.{k}": v for m, qt in qts.items() for k, v in pack(qt).items()}
            prepare_expert_for_cpu(packed, fmt, spec.hidden, spec.intermediate, dest=dest, block_n=block_n)


def _store_expert(dest: dict[str, torch.Tensor], fields: dict[str, torch.Tensor], spec: ArchSpec,
                  fmt: QuantFormat, optimize: bool, block_n: int | None) -> None:
    """One expert's fields (model orientation, from disk) into its store buffer, quantized if asked."""
    if not fmt.quantized:
        for name, tensor in fields.items():
            dest[name].copy_(tensor)
        return
    canonical = spec.canonical(fields)
    packed = quantize_expert({m.name: canonical[m.name] for m in spec.matrices}, fmt, optimize)
    prepare_expert_for_cpu(packed, fmt, spec.hidden, spec.intermediate, dest=dest, block_n=block_n,
                           gated=spec.gated)
    for name in canonical:
        if name.endswith("_bias"):
            dest[name].copy_(canonical[name])


def _fill_from_checkpoint(ckpt: Checkpoint, cmap: CheckpointMap, spec: ArchSpec, views: ExpertViews,
                          fmt: QuantFormat, optimize: bool, progress: bool) -> None:
    """Read every expert into its store buffer, quantizing on the fly to a quantized `fmt`."""
    block_n = _block_n(fmt)
    desc = "experts -> host store" + (f" ({fmt.name})" if fmt.quantized else "")
    for layer in _layers_bar(spec, desc, progress):
        for expert in range(spec.num_experts):
            fields = read_expert_fields(ckpt, cmap, spec, layer, expert)
            _store_expert(views(layer, expert), fields, spec, fmt, optimize, block_n)


def _fill_from_converted(ckpt: Checkpoint, spec: ArchSpec, views: ExpertViews, fmt: QuantFormat, progress: bool) -> None:
    """Packed experts from a converted directory (no re-quantization; only the CPU kernel's
    re-layout runs)."""
    block_n = _block_n(fmt)
    names = [f"{m.name}.{n}" for m in spec.matrices for n, _, _ in packed_fields(fmt, m.out_features, m.in_features)]
    biases = [name for name, _, _ in spec.bias_fields(torch.float32)]
    for layer in _layers_bar(spec, f"experts -> host store ({fmt.name}, converted)", progress):
        file = ckpt.path / expert_file_name(layer)
        header = read_safetensors_header(file)  # the validated reader: NaN/Inf refused as read
        for expert in range(spec.num_experts):
            fields = {}
            for n in names + biases:
                key = f"{expert}.{n}"
                if key not in header:
                    raise CheckpointError(f"{file}: expert {expert} is incomplete (tensor {key!r} is missing)")
                fields[n] = read_tensor(header[key], key)
            dest = views(layer, expert)
            prepare_expert_for_cpu({n: fields[n] for n in names}, fmt, spec.hidden, spec.intermediate,
                                   dest=dest, block_n=block_n, gated=spec.gated)
            for name in biases:
                dest[name].copy_(fields[name])
