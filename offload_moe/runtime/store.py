"""ExpertStore: every expert of every MoE layer, one contiguous byte buffer each, in host memory.

The store is the read-only source of truth the device cache copies from. A layer's experts are
one [num_experts, nbytes] uint8 tensor, pinned when the device is CUDA (so one transfer is one
DMA copy), pageable otherwise, or memory-mapped from a file when host RAM is short
(offload_moe.runtime.disk_store builds those buffers and passes them in). An ExpertLayout says how an expert's bytes split into tensors, so
the same store holds unquantized or packed quantized experts.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from offload_moe.model.arch import ArchSpec, expert_matrices
from offload_moe.quant.formats import QuantFormat
from offload_moe.quant.matmul import expert_fields

ALIGN = 64  # bytes; every field starts on a cache line


@dataclass(frozen=True)
class Field:
    """One tensor inside an expert's buffer."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class ExpertLayout:
    """The byte layout shared by all experts of a model: named fields at aligned offsets."""

    def __init__(self, fields: list[tuple[str, tuple[int, ...], torch.dtype]]):
        placed: list[Field] = []
        offset = 0
        for name, shape, dtype in fields:
            placed.append(Field(name, tuple(shape), dtype, offset))
            offset += -(-placed[-1].nbytes // ALIGN) * ALIGN
        self.fields = tuple(placed)
        self.nbytes = offset

    @classmethod
    def dense(cls, hidden: int, intermediate: int, dtype: torch.dtype) -> "ExpertLayout":
        """Unquantized gated expert: gate_up [2F, H] (rows [:F] gate, [F:] up), down [H, F]."""
        return cls([(m.name, m.shape, dtype) for m in expert_matrices(hidden, intermediate)])


    @classmethod
    def for_experts(cls, spec: ArchSpec, fmt: QuantFormat, dtype: torch.dtype, prepared: bool = True) -> "ExpertLayout":
        """One expert of `spec` stored in `fmt`: the kind's dense fields, or the packed matrices
        (`prepared`: in the CPU kernel's layout, as the store holds them; else canonical, as a
        converted directory does) plus the biases in `dtype`."""
        if not fmt.quantized:
            return cls(spec.dense_fields(fmt.dtype))
        return cls(expert_fields(fmt, spec.hidden, spec.intermediate, prepared=prepared, gated=spec.gated) + spec.bias_fields(dtype))

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views of one expert's 1-D uint8 buffer (no copy)."""
        return {
            f.name: buffer[f.offset : f.offset + f.nbytes].view(f.dtype).view(f.shape) for f in self.fields
        }


def allocate_host(shape: tuple[int, ...], pin: bool) -> torch.Tensor:
    """A uint8 host tensor, pinned if asked and possible (else pageable, with a warning)."""
    if pin:
        try:
            return torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        except RuntimeError as exc:
            warnings.warn(
                f"could not pin {math.prod(shape) / 2**20:.0f} MiB of host memory ({exc}); "
                "using pageable memory, so expert copies to the GPU will be slower",
                stacklevel=2,
            )
    return torch.empty(shape, dtype=torch.uint8)


class ExpertStore:
    """Host-side buffers of all experts: `buffer(layer, expert)` is one contiguous uint8 tensor."""

    def __init__(
        self, layout: ExpertLayout, layers: list[int], num_experts: int, pin: bool = False,
        buffers: dict[int, torch.Tensor] | None = None, backing_dir: Path | None = None,
    ):
        """`buffers` (layer -> flat uint8 tensor of num_experts * layout.nbytes) replaces the
        allocation, e.g. memory-mapped files; `backing_dir` is then the folder holding them."""
        self.layout = layout
        self.num_experts = num_experts
        if buffers is None:
            self._layers = {layer: allocate_host((num_experts, layout.nbytes), pin) for layer in layers}
        else:
            self._layers = {layer: buffers[layer].view(num_experts, layout.nbytes) for layer in layers}
        self.pinned = all(t.is_pinned() for t in self._layers.values()) if pin and buffers is None else False
        self.backing_dir = backing_dir

    @property
    def mapped(self) -> bool:
        """True when the buffers are memory-mapped files (under `backing_dir`), not RAM."""
        return self.backing_dir is not None

    @property
    def layers(self) -> list[int]:
        return list(self._layers)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self._layers.values())

    def release(self) -> None:
        """Drop the buffers (pinned or mapped memory goes back once no view of them is left)."""
        self._layers = {}

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        return self._layers[layer][expert]

    def views(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        return self.layout.views(self.buffer(layer, expert))
