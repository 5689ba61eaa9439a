"""CUDA path: pinned store, copy stream and events. Skipped on machines without CUDA."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import offload_moe
from offload_moe.runtime.hybrid import HybridCostModel, LinearTime

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots", [1, 2, 8])
def test_cuda_offloaded_equals_cuda_reference(tiny_fp32, dtype, slots):
    ref = AutoModelForCausalLM.from_pretrained(tiny_fp32, dtype=dtype, experts_implementation="eager").cuda().eval()
    llm = offload_moe.load(tiny_fp32, device="cuda", dtype=dtype, slots_per_layer=slots, progress=False)
    assert llm.runtime.store.pinned
    ids = torch.arange(1, 40, device="cuda")[None]
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, llm.model(ids).logits)
    assert torch.equal(
        ref.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False),
        llm.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False),
    )


def test_cuda_device_memory_is_slots_only(tiny_fp32):
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    llm = offload_moe.load(tiny_fp32, device="cuda", slots_per_layer=2, progress=False)
    used = torch.cuda.memory_allocated() - before
    non_expert = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in llm.model.buffers())
    assert used <= non_expert + buffers + llm.stats()["device_expert_bytes"] + 2**20


# ---------------------------------------------------------------------------------------------
# quantized experts and attention on CUDA: the store keeps the CPU kernel's layout, each slot is
# converted on the GPU after its copy (offload_moe.quant.cuda_int4)


@pytest.mark.parametrize("fmt", ["hqq4", "hqq3", "hqq2", "hqq2g64", "nf4"])
@pytest.mark.parametrize("slots", [2, 8])
def test_cuda_quantized_experts_match_cpu(tiny_fp32, fmt, slots):
    cpu = offload_moe.load(tiny_fp32, device="cpu", dtype=torch.bfloat16, experts=fmt, slots_per_layer=8, progress=False)
    gpu = offload_moe.load(tiny_fp32, device="cuda", dtype=torch.bfloat16, experts=fmt, slots_per_layer=slots,
                           hybrid=False, progress=False)
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        want = cpu.model(ids).logits.float()
        got = gpu.model(ids.cuda()).logits.float().cpu()
    rel = ((want - got).norm(dim=-1) / want.norm(dim=-1))[0]
    assert rel.median() < 0.02, f"{fmt}: median relative logit error {rel.median():.4f}"
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() > 0.9
    if slots < 8:
        assert gpu.stats()["total"]["misses"] > 0  # slots refilled (and re-laid) during the call


def test_cuda_quantized_hybrid_reads_the_host_store_with_the_cpu_kernel(tiny_fp32):
    copy = offload_moe.load(tiny_fp32, device="cuda", dtype=torch.bfloat16, experts="hqq4", slots_per_layer=2,
                            hybrid=False, progress=False)
    hybrid = offload_moe.load(tiny_fp32, device="cuda", dtype=torch.bfloat16, experts="hqq4", slots_per_layer=2,
                              hybrid=True, progress=False)
    always_cpu = HybridCostModel(copy_seconds=1.0, cpu=LinearTime(0.0, 0.0), device=LinearTime(0.0, 0.0))
    for module in hybrid.runtime.experts.values():
        module.hybrid = always_cpu  # every miss computed on the CPU from the (CPU-layout) host store
    ids = torch.arange(1, 30, device="cuda")[None]
    with torch.no_grad():
        a, b = copy.model(ids).logits.float(), hybrid.model(ids).logits.float()
    rel = ((a - b).norm(dim=-1) / a.norm(dim=-1))[0]
    assert rel.median() < 0.02
    assert hybrid.stats()["total"]["cpu_computed"] > 0


def test_cuda_quantized_attention(tiny_fp32):
    cpu = offload_moe.load(tiny_fp32, device="cpu", dtype=torch.bfloat16, attention="hqq4", progress=False)
    gpu = offload_moe.load(tiny_fp32, device="cuda", dtype=torch.bfloat16, attention="hqq4", progress=False)
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        want = cpu.model(ids).logits.float()
        got = gpu.model(ids.cuda()).logits.float().cpu()
    rel = ((want - got).norm(dim=-1) / want.norm(dim=-1))[0]
    assert rel.median() < 0.02
