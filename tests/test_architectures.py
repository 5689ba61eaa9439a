"""Every supported MoE family: exact against transformers' eager reference, and the runtime
features (quantized experts, conversion, prefetch, hybrid compute, planning) on each.

The reference's weights are re-allocated after from_pretrained: safetensors hands it tensors at
8-byte-aligned file offsets, and torch's CPU matrix-vector kernels round differently on
unaligned memory (seen on Granite in fp32, ~2e-7). Fresh allocations are 64-byte aligned, like
the offloaded store; the reference computes the same function either way.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import offload_moe
from offload_moe.arch import ExpertsKind, describe_model
from offload_moe.errors import UnsupportedArchitectureError
from offload_moe.planner import plan_model
from offload_moe.quant import dequantize, quantize
from offload_moe.testing import TINY_DEFAULTS, make_tiny_checkpoint, tiny_config

ARCHS = [arch for arch in TINY_DEFAULTS if arch != "mixtral"]  # Mixtral: tests/test_exactness.py
IDS = torch.tensor([[1, 17, 200, 45, 99, 3, 250, 61, 7, 128, 33, 310, 90, 12, 5, 77]])


def aligned_reference(path, dtype: torch.dtype):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager").eval()
    for param in model.parameters():
        param.data = param.data.clone()  # 64-byte aligned, see the module docstring
    return model


@pytest.fixture(scope="module", params=ARCHS)
def arch_checkpoints(request, tmp_path_factory):
    arch = request.param
    paths = {}
    for dtype in (torch.float32, torch.bfloat16):
        path = tmp_path_factory.mktemp(f"{arch}-{str(dtype)[6:]}")
        paths[dtype] = make_tiny_checkpoint(path, arch=arch, dtype=dtype, num_shards=2)
    return arch, paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_exact_for_every_slot_count(arch_checkpoints, dtype):
    arch, paths = arch_checkpoints
    path = paths[dtype]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = aligned_reference(path, dtype)
        with torch.no_grad():
            want_logits = ref(IDS).logits
        want_ids = ref.generate(IDS, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    num_experts = describe_model(ref).num_experts
    for slots in range(1, num_experts + 1):
        llm = offload_moe.load(path, device="cpu", slots_per_layer=slots, prefetch_top_n=2, progress=False)
        with torch.no_grad():
            got = llm.model(IDS).logits
        assert torch.equal(want_logits, got), f"{arch} slots={slots}: max diff {(want_logits - got).abs().max()}"
        assert torch.equal(want_ids, llm.generate(IDS, max_new_tokens=32, min_new_tokens=32, do_sample=False)), \
            f"{arch} slots={slots}: greedy tokens differ"
        total = llm.stats()["total"]
        assert (total["misses"] > 0) == (slots < num_experts)


def _requantized(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """dequantize(quantize(W)) in hqq4 for a weight held [out, in] (or [in, out] if transposed)."""
    canonical = weight.t() if transposed else weight
    out = dequantize(quantize(canonical.float(), "hqq4", optimize=False), torch.float32)
    return out.t() if transposed else out


def dequantized_reference(path):
    """The eager transformers model with every expert matrix replaced by its hqq4 round trip
    (row-wise groups: quantizing gate and up apart equals quantizing gate_up at once)."""
    model = aligned_reference(path, torch.float32)
    spec = describe_model(model)
    with torch.no_grad():
        for layer in spec.layers:
            experts = model.get_submodule(layer.experts_path)
            if spec.kind is ExpertsKind.DBRX:  # [E*F, H]; w2 is used as x @ w2
                for name, transposed in (("w1", False), ("v1", False), ("w2", True)):
                    param = getattr(experts.mlp, name)
                    blocks = param.view(spec.num_experts, spec.intermediate, spec.hidden)
                    for e in range(spec.num_experts):
                        blocks[e] = _requantized(blocks[e], transposed)
                continue
            transposed = spec.kind is ExpertsKind.TRANSPOSED
            for param in (experts.gate_up_proj, experts.down_proj):
                for e in range(spec.num_experts):
                    param[e] = _requantized(param[e], transposed)
    return model


def test_quantized_converted_prefetch_hybrid_and_plan(arch_checkpoints, tmp_path):
    """hqq4 experts with fewer slots than experts, prefetch and hybrid on: the transformers
    model with dequantized experts, up to the int4 kernel's bf16 rounding; a converted directory
    reloads to the same logits; the planner plans the family from its config."""
    arch, paths = arch_checkpoints
    path = paths[torch.float32]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            want = dequantized_reference(path)(IDS).logits
    llm = offload_moe.load(path, device="cpu", experts="hqq4", slots_per_layer=3, prefetch_top_n=2, hybrid=True,
                           progress=False)
    with torch.no_grad():
        got = llm.model(IDS).logits
    rel = ((want - got).norm(dim=-1) / want.norm(dim=-1))[0]
    # Per position: the kernel rounds activations and scales to bf16 (~0.5% per matmul); a
    # position whose router or top logit was near a tie may flip, so look at the median.
    assert rel.median() < 0.02, f"{arch}: median relative logit error {rel.median():.4f}"
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() >= 0.75
    llm.generate(IDS, max_new_tokens=8, do_sample=False)
    total = llm.stats()["total"]
    assert total["cpu_computed"] > 0  # hybrid served misses on the CPU (same memory: never copied)

    prefetching = offload_moe.load(path, device="cpu", experts="hqq4", slots_per_layer=3, prefetch_top_n=2,
                                   progress=False)
    prefetching.generate(IDS, max_new_tokens=8, do_sample=False)
    moe_layers = len(prefetching.runtime.spec.layers)
    assert (prefetching.stats()["total"]["prefetch_issued"] > 0) == (moe_layers > 1)

    converted = offload_moe.convert(path, tmp_path / "hqq4", experts="hqq4", progress=False)
    reloaded = offload_moe.load(converted, device="cpu", slots_per_layer=3, progress=False)
    with torch.no_grad():
        assert torch.equal(reloaded.model(IDS).logits, got)

    config = tiny_config(arch)
    plan = plan_model(config, "hqq4", gpu_memory=2**30, cpu_memory=2**30, context=256)
    spec = prefetching.runtime.spec
    assert plan.moe_layers == len(spec.layers) and plan.num_experts == spec.num_experts
    # 4-bit codes plus a 16-bit scale and zero per 64 weights: ~0.28 of the 16-bit expert.
    assert 0.25 < plan.expert_bytes / spec.expert_bytes(2) < 0.35


def test_unknown_experts_forward_is_refused():
    """A family whose experts compute something else (NemotronH: no gate) is refused by name."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("nemotron_h", hidden_size=64, num_hidden_layers=2, vocab_size=320)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitectureError, match=r"model_type 'nemotron_h' is not supported: the eager "
                                                           r"forward of NemotronHExperts"):
        describe_model(model)
