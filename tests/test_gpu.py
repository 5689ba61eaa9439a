"""CUDA path: pinned store, copy stream and events. Skipped on machines without CUDA."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import offload_moe

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
