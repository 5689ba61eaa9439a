"""Count the torch ops a piece of code launches and the host syncs it would cause on a GPU.

For tests and benchmarks (tests/test_fused_torch.py, bench/gpu_check.py): the number of kernel
launches and of host-device synchronisations per MoE layer decides whether a GPU decode step is
launch- or sync-bound, and both can be counted on the CPU, where no GPU exists, by name:

* a launch is every aten op dispatched that is neither a view nor a bare allocation (under a
  TorchDispatchMode, so composite ops count as the kernels they decompose into);
* a sync is an op whose CUDA implementation makes the host wait for the device: reading a value
  back (`item`, `tolist`, `.cpu()`, `.numpy()`, `bool(t)`, `int(t)`, seen as Tensor methods by a
  TorchFunctionMode), ops with data-dependent output sizes (`nonzero`, `masked_select`, `unique*`,
  boolean-mask indexing, `repeat_interleave` without `output_size`), `bincount`,
  `index_put_(accumulate=True)` (a sort), and, where tensors really live on a GPU, copies to the
  host and copies from non-pinned host memory.

On CPU tensors a device-to-host copy cannot be told from a host one, so code under count must
not call the read-back methods at all on its hot path (building a small index from host lists
is fine). Use: ``with count_ops() as counts: f(); counts.launches, counts.syncs``.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# Ops that only allocate or describe memory: no kernel runs.
NO_KERNEL = frozenset({
    _aten.empty.memory_format, _aten.empty_strided.default, _aten.empty_like.default, _aten.new_empty.default,
    _aten.new_empty_strided.default, _aten.lift_fresh.default, _aten._pin_memory.default, _aten.is_pinned.default,
})
# Ops whose CUDA implementation waits for the device (data-dependent sizes or a read-back).
SYNC_OPS = frozenset({
    "_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "unique_dim_consecutive", "bincount", "equal", "is_nonzero",
})
# Tensor methods that read device memory back to the host.
SYNC_METHODS = frozenset({"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"})


@dataclass
class OpCounts:
    """What ran under one `count_ops()`: launches and syncs by op name."""

    launched: Counter = field(default_factory=Counter)
    synced: Counter = field(default_factory=Counter)
    _reading_back: int = 0  # inside a sync method: its own copy op is not a second sync

    @property
    def launches(self) -> int:
        return sum(self.launched.values())

    @property
    def syncs(self) -> int:
        return sum(self.synced.values())


def op_syncs(func, args: tuple, kwargs: dict) -> bool:
    """True if this aten call makes the host wait for the device on CUDA."""
    name = func._schema.name.removeprefix("aten::")
    if name in SYNC_OPS:
        return True
    if name == "repeat_interleave":
        return kwargs.get("output_size", args[3] if len(args) > 3 else None) is None
    if name in ("index_put", "index_put_", "_index_put_impl_"):
        return bool(kwargs.get("accumulate", args[3] if len(args) > 3 else False))
    if name == "index" and len(args) > 1:
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
    if name in ("_to_copy", "copy_"):
        return _copy_syncs(func, args, kwargs)
    return False


def _copy_syncs(func, args: tuple, kwargs: dict) -> bool:
    """Device -> host copies, and host -> device copies that are blocking or from pageable memory."""
    src = args[1] if func._schema.name.endswith("copy_") else args[0]
    dst_device = args[0].device if func._schema.name.endswith("copy_") else kwargs.get("device") or src.device
    dst_device = torch.device(dst_device)
    if src.device.type != "cpu" and dst_device.type == "cpu":
        return True
    if src.device.type == "cpu" and dst_device.type != "cpu":
        blocking = not kwargs.get("non_blocking", args[2] if func._schema.name.endswith("copy_") and len(args) > 2 else False)
        return blocking or not src.is_pinned()
    return False


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, counts: OpCounts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket.__name__)
        if not func.is_view and func not in NO_KERNEL:
            self.counts.launched[name] += 1
        if not self.counts._reading_back and op_syncs(func, args, kwargs):
            self.counts.synced[name] += 1
        return func(*args, **kwargs)


class _MethodCounter(TorchFunctionMode):
    def __init__(self, counts: OpCounts):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        is_read_back = name in SYNC_METHODS or (name == "to" and _to_host(args, kwargs))
        if not is_read_back:
            return func(*args, **kwargs)
        if not self.counts._reading_back:
            self.counts.synced[name] += 1
        self.counts._reading_back += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.counts._reading_back -= 1


def _to_host(args: tuple, kwargs: dict) -> bool:
    """Tensor.to(...) naming the CPU as its destination."""
    for value in (*args[1:], kwargs.get("device")):
        if isinstance(value, (str, torch.device)):
            return torch.device(value).type == "cpu"
    return False


@contextlib.contextmanager
def count_ops() -> Iterator[OpCounts]:
    """Count launches and syncs of the torch calls made inside the block (see the module doc)."""
    counts = OpCounts()
    with _MethodCounter(counts), _DispatchCounter(counts):
        yield counts


def count_per_call(modules: list[torch.nn.Module], run: Callable[[], object]) -> list[OpCounts]:
    """The counts of every forward call of `modules` (e.g. each MoE layer's experts) while
    `run()` runs, one OpCounts per call, in call order."""
    found: list[OpCounts] = []
    stack = contextlib.ExitStack()
    handles = [h for m in modules for h in (
        m.register_forward_pre_hook(lambda *_: found.append(stack.enter_context(count_ops()))),
        m.register_forward_hook(lambda *_: stack.close()))]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return found
