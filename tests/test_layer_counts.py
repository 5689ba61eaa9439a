"""The GPU's decode path, counted on the CPU: one host sync per MoE layer call (the routing
read-back the cache needs) and a launch count that does not grow with the experts routed.

The layers are loaded on the CPU and given a dequantization tile, so their resident experts take
the fused device path (runtime.fused_torch) with the very ops a GPU would run; the op counter
(offload_moe.op_counter) counts what each OffloadedExperts.forward dispatches."""

from __future__ import annotations

import pytest
import torch

import offload_moe
from offload_moe.op_counter import OpCounts, count_per_call
from offload_moe.quant.formats import parse_format
from offload_moe.runtime.fused_torch import DequantTile
from offload_moe.runtime.offloaded_experts import OffloadedExperts
from offload_moe.testing import make_tiny_checkpoint
from logits_util import assert_quantized_logits_close

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("counts")
    return {k: make_tiny_checkpoint(root / f"top{k}", seed=0, num_experts_per_tok=k) for k in (2, 4)}


def device_path_model(path, slots: int, top_k: int):
    """The model on the CPU with every MoE layer on the fused device path."""
    llm = offload_moe.load(path, device="cpu", experts="hqq4", slots_per_layer=slots, hybrid=False,
                           progress=False)
    spec = llm.runtime.spec
    tile = DequantTile.allocate(parse_format("hqq4"), spec.hidden, spec.intermediate, spec.gated, top_k,
                                torch.float32, torch.device("cpu"))
    layers = [m for m in llm.model.modules() if isinstance(m, OffloadedExperts)]
    for layer in layers:
        layer.tile = tile
    return llm, layers


def counts_per_layer(llm, layers, ids: torch.Tensor) -> list[OpCounts]:
    with torch.no_grad():
        return count_per_call(layers, lambda: llm.model(ids))


def test_a_decode_call_syncs_once_and_launches_the_same_for_two_or_four_experts(checkpoints):
    launches = {}
    for k, path in checkpoints.items():
        llm, layers = device_path_model(path, slots=8, top_k=k)
        counts_per_layer(llm, layers, torch.tensor([[1, 2, 3]]))  # warm-up
        step = counts_per_layer(llm, layers, torch.tensor([[5]]))
        assert [c.syncs for c in step] == [1] * len(layers), [dict(c.synced) for c in step]
        assert all(c.synced == {"tolist": 1} for c in step)  # route_rows' one read-back
        launches[k] = {c.launches for c in step}
        llm.close()
    assert launches[2] == launches[4] and len(launches[2]) == 1, launches


def test_misses_copied_in_still_sync_once(checkpoints):
    llm, layers = device_path_model(checkpoints[2], slots=2, top_k=2)
    for ids in ([[1, 2, 3, 4, 5, 6]], [[7]], [[9]]):
        for c in counts_per_layer(llm, layers, torch.tensor(ids)):
            assert c.syncs == 1, dict(c.synced)
    assert sum(layer.cache.stats.misses for layer in layers) > 0
    llm.close()


def test_the_device_path_computes_what_the_cpu_kernels_compute(checkpoints):
    ids = torch.arange(1, 25)[None]
    cpu = offload_moe.load(checkpoints[2], device="cpu", experts="hqq4", progress=False)
    device_path, _ = device_path_model(checkpoints[2], slots=3, top_k=2)
    with torch.no_grad():
        assert_quantized_logits_close(cpu.model(ids).logits, device_path.model(ids).logits, "fused device path")
    cpu.close()
    device_path.close()
