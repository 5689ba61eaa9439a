"""Unquantized offloaded experts give the reference transformers model's numbers bit for bit."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import offload_moe
import offload_moe.testing

PROMPT = "The quick brown fox jumps over the lazy dog. Offloading experts keeps logits exact!"
_references: dict = {}


def reference(path, dtype):
    key = (str(path), dtype)
    if key not in _references:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager")
        _references[key] = model.eval()
    return _references[key]


@pytest.fixture(params=["fp32", "bf16"])
def checkpoint(request, tiny_fp32, tiny_bf16):
    return (tiny_fp32, torch.float32) if request.param == "fp32" else (tiny_bf16, torch.bfloat16)


@pytest.mark.parametrize("slots", range(1, 9))
def test_prefill_logits_and_greedy_ids_equal_reference(checkpoint, slots):
    path, dtype = checkpoint
    ref = reference(path, dtype)
    llm = offload_moe.load(path, device="cpu", slots_per_layer=slots, prefetch_top_n=2, progress=False)
    assert llm.config.dtype == dtype
    ids = AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt").input_ids

    with torch.no_grad():
        expected, got = ref(ids).logits, llm.model(ids).logits
    assert got.dtype == dtype
    assert torch.equal(expected, got), f"max diff {(expected.float() - got.float()).abs().max()}"

    want = ref.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    have = llm.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    assert have.shape[1] == ids.shape[1] + 32
    assert torch.equal(want, have)
    total = llm.stats()["total"]
    if slots < 8:
        assert total["misses"] > 0 and total["prefetch_issued"] > 0  # eviction and prefetch both ran
    else:
        assert total["misses"] == 0 and total["hit_rate"] == 1.0


def test_sampling_with_same_seed_equals_reference(tiny_fp32):
    ref = reference(tiny_fp32, torch.float32)
    llm = offload_moe.load(tiny_fp32, device="cpu", slots_per_layer=2, progress=False)
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    torch.manual_seed(7)
    want = ref.generate(ids, max_new_tokens=16, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(7)
    have = llm.generate(ids, max_new_tokens=16, do_sample=True, top_k=20, temperature=0.9)
    assert torch.equal(want, have)


@pytest.mark.parametrize("slots", [1, 3, 6])
def test_top4_routing_sharded_checkpoint_equal_reference(tmp_path, slots):
    """More than two experts per token: the combine order matters, and must be the eager one."""
    path = offload_moe.testing.make_tiny_checkpoint(
        tmp_path, seed=3, num_shards=3, num_experts_per_tok=4, num_local_experts=6, num_hidden_layers=3
    )
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    llm = offload_moe.load(path, device="cpu", slots_per_layer=slots, progress=False)
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, llm.model(ids).logits)
    assert torch.equal(
        ref.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False),
        llm.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False),
    )
