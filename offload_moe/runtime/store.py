"""ExpertStore: every expert of every MoE layer, one contiguous byte buffer each, in host memory.

The store is the read-only source of truth the device cache copies from. A layer's experts are
one [num_experts, nbytes] uint8 tensor, a view of one host arena per store that is pinned in
place at its exact size when the device is CUDA (so one transfer is one DMA copy), pageable otherwise, or memory-mapped from a file when host RAM is short
(offload_moe.runtime.disk_store builds those buffers and passes them in). An ExpertLayout says how an expert's bytes split into tensors, so
the same store holds unquantized or packed quantized experts.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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


class HostPinner(Protocol):
    """Page-locks existing host memory in place (so copies from it are DMA, asynchronous)."""

    def register(self, buffer: torch.Tensor) -> None:
        """Pin `buffer`'s bytes; RuntimeError if they cannot be."""

    def unregister(self, buffer: torch.Tensor) -> None: ...


class CudaHostRegister:
    """`cudaHostRegister` on an ordinary allocation: exactly its size is pinned. (torch's pinned
    allocator, `pin_memory=True`, rounds every block up to a power of two in torch 2.13 (ATen's
    CachingHostAllocator, `pinned_max_round_threshold` unset): a 0.79 GB layer would pin 1 GiB.)"""

    PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context (a model on cuda:N)

    def register(self, buffer: torch.Tensor) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
        error = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel() * buffer.element_size(),
                                                     self.PORTABLE)
        if int(error) != 0:
            raise RuntimeError(f"cudaHostRegister failed with CUDA error {int(error)}")

    def unregister(self, buffer: torch.Tensor) -> None:
        torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


class HostArena:
    """One host allocation for a whole store, pinned in place at its exact size when asked (else,
    or when pinning fails, pageable with a warning), cut into one view per part."""

    def __init__(self, sizes: list[int], pin: bool, pinner: HostPinner | None = None):
        self.buffer = torch.empty(sum(sizes), dtype=torch.uint8)
        self.pinner = pinner if pinner is not None else CudaHostRegister()
        self.pinned = False
        if pin:
            try:
                self.pinner.register(self.buffer)
                self.pinned = True
            except RuntimeError as exc:
                warnings.warn(
                    f"could not pin {self.buffer.numel() / 2**20:.0f} MiB of host memory ({exc}); "
                    "using pageable memory, so expert copies to the GPU will be slower",
                    stacklevel=2,
                )
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + size)
        self.parts = [self.buffer[a:b] for a, b in zip(bounds, bounds[1:])]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def release(self) -> None:
        """Unpin (the caller has finished every copy from it) and drop the memory."""
        if self.pinned:
            self.pinner.unregister(self.buffer)
            self.pinned = False
        self.parts = []
        self.buffer = torch.empty(0, dtype=torch.uint8)


class ExpertStore:
    """Host-side buffers of all experts: `buffer(layer, expert)` is one contiguous uint8 tensor."""

    def __init__(
        self, layout: ExpertLayout, layers: list[int], num_experts: int, pin: bool = False,
        buffers: dict[int, torch.Tensor] | None = None, backing_dir: Path | None = None,
        pinner: HostPinner | None = None,
    ):
        """`buffers` (layer -> flat uint8 tensor of num_experts * layout.nbytes) replaces the
        allocation, e.g. memory-mapped files; `backing_dir` is then the folder holding them.
        Otherwise one HostArena holds every layer, pinned by `pinner` (default cudaHostRegister)
        when `pin`."""
        self.layout = layout
        self.num_experts = num_experts
        self._arena: HostArena | None = None
        if buffers is None:
            self._arena = HostArena([num_experts * layout.nbytes] * len(layers), pin, pinner)
            buffers = dict(zip(layers, self._arena.parts))
        self._layers = {layer: buffers[layer].view(num_experts, layout.nbytes) for layer in layers}
        self.pinned = self._arena is not None and self._arena.pinned
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
        """Drop the buffers (pinned memory is unpinned; mapped memory goes back once no view of
        them is left). The caller has finished every copy from the store."""
        self._layers = {}
        if self._arena is not None:
            self._arena.release()
            self.pinned = False

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        return self._layers[layer][expert]

    def views(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        return self.layout.views(self.buffer(layer, expert))
