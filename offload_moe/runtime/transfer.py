"""Asynchronous copies from the host store into device slots: the one place with CUDA code.

One interface, two back ends:
- CudaTransferEngine: a dedicated copy stream; each copy records an event, and compute waits on
  exactly the event of the copy it needs. A copy into a slot first waits for the compute that last
  read that slot (a fence recorded on the compute stream), so a slot is never overwritten in use.
- CpuTransferEngine: a worker thread does the copy (torch releases the GIL inside copy_), so the
  next expert's copy overlaps the current expert's compute.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import torch


class Fence(Protocol):
    def wait(self) -> None:
        """Make the caller's compute wait until the operation behind this fence is done."""


class _DoneFence:
    def wait(self) -> None:
        return None


DONE = _DoneFence()
# (src, dst, after): dst waits for the fence `after` (the compute that last read it), then is copied
Copy = tuple[torch.Tensor, torch.Tensor, "Fence | None"]
BATCH_BYTES = 8 << 20  # copies smaller than this are grouped into one submission (per-copy overhead amortised)


class TransferEngine(Protocol):
    def copy_many(self, copies: list[Copy]) -> Fence:
        """Start the copies (src, dst, after) as one submission; one fence for all of them.
        Each copy waits for `after` (a compute fence) first. Batching small experts keeps per-copy
        overhead (a thread hand-off, a CUDA launch and event) from dominating when experts are
        small and many (Qwen3-30B-A3B: ~2.6 MB each)."""

    def copy(self, src: torch.Tensor, dst: torch.Tensor, after: Fence | None = None) -> Fence:
        """copy_many of one copy."""

    def compute_fence(self) -> Fence:
        """A fence that passes when the compute issued so far is done (guards slot reuse)."""

    def synchronize(self) -> None:
        """Block the host until all copies and device compute issued so far are done."""

    def to_host(self, tensor: torch.Tensor) -> "HostCopy":
        """Start copying a device tensor to (pinned) host memory; the copy waits only for the
        compute queued before this call, so compute queued after it overlaps host work."""

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the engine's device, copied without blocking the host."""

    def close(self) -> None: ...


class HostCopy:
    """A host copy of a device tensor that may still be in flight: `get` waits for it."""

    def __init__(self, tensor: torch.Tensor, event: "torch.cuda.Event | None" = None):
        self._tensor = tensor
        self._event = event

    def get(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()  # this copy only, not the compute queued after it
            self._event = None
        return self._tensor


class _FutureFence:
    def __init__(self, future: Future):
        self._future = future

    def wait(self) -> None:
        self._future.result()


class CpuTransferEngine:
    """Copies on a worker thread; compute on the CPU is synchronous, so compute fences are no-ops."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload_moe-copy")

    def copy(self, src: torch.Tensor, dst: torch.Tensor, after: Fence | None = None) -> Fence:
        return self.copy_many([(src, dst, after)])

    def copy_many(self, copies: list[Copy]) -> Fence:
        """Several copies as one task on the worker: one hand-off and one fence for all."""

        def run() -> None:
            for src, dst, _ in copies:
                dst.copy_(src)

        return _FutureFence(self._pool.submit(run))

    def compute_fence(self) -> Fence:
        return DONE

    def synchronize(self) -> None:
        self._pool.submit(lambda: None).result()  # the worker runs copies in order

    def to_host(self, tensor: torch.Tensor) -> HostCopy:
        return HostCopy(tensor)  # already there

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class _CudaEventFence:
    """An event the compute stream of `device` waits on. The device is named: the current
    device's stream is another GPU's when the model lives on cuda:N and the caller's current
    device is not N."""

    def __init__(self, event: "torch.cuda.Event", device: torch.device):
        self.event = event
        self.device = device

    def wait(self) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.event)


class CudaTransferEngine:
    """Copies on a dedicated CUDA stream from pinned host memory; events order copy and compute."""

    def __init__(self, device: torch.device):
        self.device = device
        self._stream = torch.cuda.Stream(device=device)

    def copy(self, src: torch.Tensor, dst: torch.Tensor, after: Fence | None = None) -> Fence:
        return self.copy_many([(src, dst, after)])

    def copy_many(self, copies: list[Copy]) -> Fence:
        """Several copies queued back to back on the copy stream, one event for all."""
        with torch.cuda.stream(self._stream):
            for _, _, after in copies:
                if isinstance(after, _CudaEventFence):
                    self._stream.wait_event(after.event)
            for src, dst, _ in copies:
                dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        return _CudaEventFence(event, self.device)

    def compute_fence(self) -> Fence:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return _CudaEventFence(event, self.device)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def to_host(self, tensor: torch.Tensor) -> HostCopy:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return HostCopy(host, event)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        # pinned, so the copy is asynchronous; torch's pinned allocator keeps the staging block
        # alive until the copy has run
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def close(self) -> None:
        self._stream.synchronize()


def make_transfer_engine(device: torch.device) -> TransferEngine:
    """The transfer engine for `device`."""
    if device.type == "cuda":
        return CudaTransferEngine(device)
    return CpuTransferEngine()
