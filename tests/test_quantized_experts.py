"""Quantized experts through the whole model: the offloaded model equals a transformers model
whose expert weights are the dequantized ones, up to the int4 kernel's bf16 rounding."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import offload_moe
from offload_moe.errors import ConfigError
from offload_moe.quant.quantize import dequantize, quantize
from offload_moe.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_q"), seed=2)


def dequantized_reference(path, fmt):
    """The eager transformers model with every expert matrix replaced by dequantize(quantize(w))."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    for layer in model.model.layers:
        experts = layer.mlp.experts
        with torch.no_grad():
            for e in range(experts.gate_up_proj.shape[0]):
                for param in (experts.gate_up_proj, experts.down_proj):
                    param[e] = dequantize(quantize(param[e].float(), fmt, optimize=False), torch.float32)
    return model


@pytest.mark.parametrize("fmt", ["hqq4", "hqq3", "hqq2", "hqq2g64", "nf4"])
@pytest.mark.parametrize("slots", [3, 8])
def test_quantized_offloaded_model_matches_dequantized_reference(tiny, fmt, slots):
    ref = dequantized_reference(tiny, fmt)
    llm = offload_moe.load(tiny, experts=fmt, slots_per_layer=slots, progress=False)
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        want, got = ref(ids).logits, llm.model(ids).logits
    # Per position: the kernel rounds activations and scales to bf16 (~0.5% per matmul); a
    # position whose router was near a tie may route differently, so look at the median.
    rel = ((want - got).norm(dim=-1) / want.norm(dim=-1))[0]
    assert rel.median() < 0.02, f"{fmt}: median relative logit error {rel.median():.4f}"
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() > 0.9
    if fmt == "nf4":  # dequantize + fp32 matmul: the very numbers of the reference
        assert rel.max() < 1e-5
    if slots < 8:
        assert llm.stats()["total"]["misses"] > 0
    # the store holds packed bytes: far fewer than 32-bit weights
    dense_bytes = 3 * 64 * 128 * 4
    assert llm.runtime.store.layout.nbytes < dense_bytes / (2 if fmt == "hqq2" else 4)


def test_quantized_hybrid_equals_quantized_copy(tiny):
    copy = offload_moe.load(tiny, experts="hqq4", slots_per_layer=2, hybrid=False, progress=False)
    hybrid = offload_moe.load(tiny, experts="hqq4", slots_per_layer=2, hybrid=True, progress=False)
    ids = torch.arange(1, 30)[None]
    g = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with torch.no_grad():
        assert torch.equal(copy.model(ids).logits, hybrid.model(ids).logits)
    assert torch.equal(copy.generate(ids, **g), hybrid.generate(ids, **g))
    assert hybrid.stats()["total"]["cpu_computed"] > 0


def test_bad_expert_format_is_refused_before_loading(tiny):
    with pytest.raises(ConfigError, match="unknown quantization format 'int3'"):
        offload_moe.load(tiny, experts="int3", progress=False)
    with pytest.raises(ConfigError, match="needs dtype"):
        offload_moe.load(tiny, experts="bf16", dtype="float32", progress=False)


def test_unquantized_format_names_set_the_dtype(tiny):
    llm = offload_moe.load(tiny, experts="bf16", slots_per_layer=2, progress=False)
    assert llm.config.dtype == torch.bfloat16 and llm.runtime.store.layout.fields[0].dtype == torch.bfloat16


def test_quantized_attention_leaves_router_norms_embeddings_and_head_alone(tiny):
    from offload_moe.quant.quantized_linear import QuantizedLinear

    ref = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32, experts_implementation="eager").eval()
    with torch.no_grad():  # the reference with attention weights dequantized
        for layer in ref.model.layers:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                lin = getattr(layer.self_attn, name)
                lin.weight.copy_(dequantize(quantize(lin.weight.float(), "hqq4", optimize=False), torch.float32))
    llm = offload_moe.load(tiny, attention="hqq4", slots_per_layer=4, progress=False)
    layer = llm.model.model.layers[0]
    assert all(isinstance(getattr(layer.self_attn, n), QuantizedLinear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert isinstance(layer.mlp.gate.weight, torch.nn.Parameter) and layer.mlp.gate.weight.dtype == torch.float32
    assert isinstance(llm.model.lm_head, torch.nn.Linear) and isinstance(llm.model.model.embed_tokens, torch.nn.Embedding)
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        want, got = ref(ids).logits, llm.model(ids).logits
    rel = ((want - got).norm(dim=-1) / want.norm(dim=-1))[0]
    assert rel.median() < 0.02 and (want.argmax(-1) == got.argmax(-1)).float().mean() > 0.9
    with pytest.raises(ConfigError, match="attention='bf16'"):
        offload_moe.load(tiny, attention="bf16", progress=False)


def test_experts_that_do_not_fit_free_ram_are_quantized_to_hqq4_by_default(tiny, monkeypatch, tmp_path):
    """No expert format given: exact when the 16-bit experts fit the free RAM; hqq4, with a
    warning that says why, when they do not; an explicit format or cpu_memory budget is obeyed."""
    import collections

    import psutil

    monkeypatch.setenv("OFFLOAD_MOE_CACHE", str(tmp_path / "cache"))  # where the disk store goes
    exact = offload_moe.load(tiny, slots_per_layer=3, progress=False)
    assert not exact.runtime.experts[0].fmt.quantized
    free = collections.namedtuple("vm", "available")(64 * 1024)  # 64 KiB free: 2 x 8 experts of 96 KiB do not fit
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free)
    with pytest.warns(UserWarning, match=r"more than the free host RAM .* quantizing them to hqq4"):
        small = offload_moe.load(tiny, slots_per_layer=3, progress=False)
    assert small.runtime.experts[0].fmt.name == "hqq4"
    explicit = offload_moe.load(tiny, experts="hqq3", slots_per_layer=3, progress=False)
    assert explicit.runtime.experts[0].fmt.name == "hqq3"
    budget = offload_moe.load(tiny, cpu_memory="64KiB", slots_per_layer=3, progress=False)
    assert not budget.runtime.experts[0].fmt.quantized and budget.runtime.store.mapped  # served from disk, exact


def decode_logits(llm, steps: int = 8) -> list[torch.Tensor]:
    """The logits of a short prompt and of `steps` greedy decode steps."""
    with torch.no_grad():
        out = llm.model(torch.tensor([[1, 5, 9, 30, 2]]), use_cache=True)
        found = [out.logits[:, -1]]
        for _ in range(steps):
            out = llm.model(out.logits[:, -1:].float().argmax(-1), cache=out.cache, use_cache=True)
            found.append(out.logits[:, -1])
    return found


@pytest.mark.parametrize("slots, policy", [(8, "markov"), (3, "lru")])
def test_decode_from_the_routers_top_k_is_the_routed_rows_path(tiny, monkeypatch, slots, policy):
    """A CPU decode call whose experts are all resident runs one native call straight from the
    router's top-k; with misses it takes the general path. Either way: the same logits, bit for
    bit, and the same cache counters as the general path alone."""
    from offload_moe.runtime.offloaded_experts import OffloadedExperts
    from offload_moe.quant import moe_kernel

    if not moe_kernel.block_ns():
        pytest.skip("the fused kernel does not run here")
    runs, calls = {}, []
    original = moe_kernel.moe_experts_topk
    monkeypatch.setattr(moe_kernel, "moe_experts_topk", lambda *a, **k: calls.append(1) or original(*a, **k))
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(OffloadedExperts, "_resident_only", lambda *a: False)
        llm = offload_moe.load(tiny, experts="hqq4", slots_per_layer=slots, policy=policy, progress=False)
        runs[fast] = decode_logits(llm), llm.stats()["total"]
        taken = len(calls)
    assert taken > 0  # the fast path ran (at decode) ...
    assert len(calls) == taken  # ... and only where it was allowed
    (fast_logits, fast_stats), (general_logits, general_stats) = runs[True], runs[False]
    assert all(torch.equal(a, b) for a, b in zip(fast_logits, general_logits))
    assert fast_stats == general_stats
    if slots < 8:
        assert general_stats["misses"] > 0


def test_router_logits_are_tapped_only_when_something_reads_them(tiny):
    every = offload_moe.load(tiny, experts="hqq4", progress=False)  # all experts resident: nothing to evict
    assert all(m.router_logits is None for m in every.runtime.experts.values())
    few = offload_moe.load(tiny, experts="hqq4", slots_per_layer=3, policy="markov", progress=False)
    assert all(m.router_logits is not None for m in few.runtime.experts.values())  # the policy reads them
    lru = offload_moe.load(tiny, experts="hqq4", slots_per_layer=3, policy="lru", progress=False)
    assert all(m.router_logits is None for m in lru.runtime.experts.values())
