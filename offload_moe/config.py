"""Settings of an offloaded model: where it runs, how many expert slots each layer gets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offload_moe.errors import ConfigError
from offload_moe.options import DEFAULT_DENSE_KERNELS, DEFAULT_MAX_NEW_TOKENS, check_keyword
from offload_moe.quant.formats import FormatKind, parse_attention_format, parse_format
from offload_moe.planning.budget import DEFAULT_CONTEXT
from offload_moe.runtime.policies import DEFAULT_POLICY

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "OffloadConfig", "resolve_device", "resolve_dtype"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` means CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device={device!r} is not a device torch knows (try 'cpu' or 'cuda')") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} was asked for but CUDA is not available on this machine")
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r}: only 'cpu' and 'cuda' are supported")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype) -> torch.dtype:
    """Accept a torch dtype or its name ('bf16', 'float32', ...); `None` gives `default`."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ConfigError(f"dtype={dtype} is not supported; use one of float32, bfloat16, float16")
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"dtype={dtype!r} is not supported; use one of {sorted(_DTYPES)}") from None


@dataclass(frozen=True)
class OffloadConfig:
    """How a model is offloaded.

    device: where attention, norms, router, lm_head and the expert slots live.
    dtype: compute dtype of the non-expert weights and of unquantized experts.
    slots_per_layer: expert slots on the device per MoE layer (None: every expert fits).
    gpu_memory: device budget in bytes; when set, slots_per_layer is planned from it.
    context: tokens of KV cache the budget keeps room for.
    prefetch_top_n: experts of the next layer to prefetch per call (None: the model's top-k on
        CUDA, off on the CPU, where copies compete with compute for the same cores; 0: off).
    experts: expert format ("hqq4", "hqq3", "hqq2", "hqq2g64", "nf4"; None: unquantized in
        `dtype`); attention: quantize the attention projections too (same formats; None: 16-bit);
        optimize: quantize with the hqq optimiser instead of round-to-nearest. attention="q8"
        (int8, offload_moe.quant.q8) runs on the CPU only.
    dense_kernels: "auto", "fast" or "torch": the CPU's kernels for 16-bit non-expert layers and
        attention math (offload_moe.options.DENSE_KERNELS; `fast_dense` decides).
    hybrid: compute a missing expert on the CPU from the host store when that beats copying it
        (None: on for CUDA devices, off for the CPU, where it would mean never using the slots).
    policy: eviction policy name (see offload_moe.runtime.policies; default DEFAULT_POLICY).
    pin_memory: pin the host expert store (only meaningful for CUDA devices).
    cpu_memory: host-RAM budget in bytes for the expert store (None: no limit); a store that
        does not fit is memory-mapped from disk (offload_moe.runtime.disk_store).
    """

    device: torch.device
    dtype: torch.dtype
    slots_per_layer: int | None = None
    policy: str = DEFAULT_POLICY
    pin_memory: bool = True
    gpu_memory: int | None = None
    context: int = DEFAULT_CONTEXT
    prefetch_top_n: int | None = None
    hybrid: bool | None = None
    experts: str | None = None
    attention: str | None = None
    optimize: bool = False
    cpu_memory: int | None = None
    dense_kernels: str = DEFAULT_DENSE_KERNELS

    def __post_init__(self) -> None:
        # The load() keywords the option table defines are checked by it, so load(), the CLI and
        # OFFLOAD_MOE_* refuse a value alike; gpu_memory and cpu_memory arrive here as bytes.
        for name in ("slots_per_layer", "gpu_memory", "cpu_memory", "context", "prefetch_top_n", "policy",
                     "dense_kernels"):
            check_keyword(name, getattr(self, name))
        for name in ("hybrid", "optimize", "pin_memory"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"{name}={value!r} must be True or False" + (" (or None)" if name == "hybrid" else ""))
        for name in ("gpu_memory", "cpu_memory"):  # load() parses '8GiB'; the config holds bytes
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{name}={value!r} must be a number of bytes (load() also takes sizes such as '8GiB')")
        if self.slots_per_layer is not None and self.gpu_memory is not None:
            raise ConfigError("give either slots_per_layer or gpu_memory, not both")
        self._check_formats()

    def _check_formats(self) -> None:
        if self.experts is not None and self.experts != "gptq":
            fmt = parse_format(self.experts)
            if fmt.quantized and self.device.type not in ("cpu", "cuda"):
                raise ConfigError(
                    f"experts={self.experts!r} on {self.device.type}: quantized experts run on the CPU or CUDA; "
                    "use one of those or unquantized experts"
                )
            if not fmt.quantized and fmt.dtype != self.dtype:
                raise ConfigError(f"experts={self.experts!r} needs dtype={fmt.dtype} (unquantized experts use the compute dtype)")
        if self.attention is not None:
            fmt = parse_attention_format(self.attention)
            if fmt.kind is FormatKind.INT8 and self.device.type != "cpu":
                raise ConfigError(f"attention={self.attention!r} on {self.device.type}: q8 attention runs on the CPU only; "
                                  "use attention='hqq4' or 16-bit attention there")
            if self.device.type not in ("cpu", "cuda"):
                raise ConfigError(f"attention={self.attention!r} on {self.device.type}: quantized attention runs on the CPU or CUDA")

    def fast_dense(self, experts_quantized: bool) -> bool:
        """Whether the 16-bit non-expert layers and attention run offload_moe's CPU kernels: only on
        the CPU with a 16-bit dtype, "auto" only where the answer is approximate anyway."""
        if self.device.type != "cpu" or self.dtype not in (torch.float16, torch.bfloat16):
            return False
        if self.dense_kernels == "auto":
            return experts_quantized or self.attention is not None
        return self.dense_kernels == "fast"

    @property
    def use_hybrid(self) -> bool:
        return self.device.type == "cuda" if self.hybrid is None else bool(self.hybrid)

    def prefetch_n(self, top_k: int) -> int:
        """Next-layer experts prefetched per call: a copy overlaps compute on a GPU; on the CPU it
        competes for the same cores, so the default is the model's top-k on CUDA, 0 on the CPU."""
        if self.prefetch_top_n is not None:
            return self.prefetch_top_n
        return top_k if self.device.type == "cuda" else 0

    def slots_for(self, num_experts: int) -> int:
        """Slots a layer with `num_experts` experts gets."""
        if self.slots_per_layer is None:
            return num_experts
        return min(self.slots_per_layer, num_experts)
