"""dense_kernels= and attention="q8" on loaded tiny models: what is swapped, and how close it stays.

"fast" against "torch": the same weights, products summed in fp32 instead of by torch's 16-bit
kernels and attention in fp32, so each layer's outputs differ by about one rounding of the
16-bit dtype; through the tiny model's 2 layers that stays within a few ulps of the logits'
scale, and 8 ulps (8 * eps(dtype) * max|logit|) is the bound asserted. "auto" with unquantized
experts must stay bit-exact with transformers (as tests/test_exactness.py checks it).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import offload_moe
from offload_moe.config import OffloadConfig
from offload_moe.errors import ConfigError
from offload_moe.model.fp32_attention import FP32_SDPA
from offload_moe.options import OPTIONS
from offload_moe.quant.cpu_linear import CpuLinear, Q8Linear
from offload_moe.quant.cpu_norm import CpuRMSNorm
from offload_moe.quant.cpu_router import CpuRouter
from offload_moe.testing import make_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")
IDS = torch.tensor([[1, 50, 60, 70, 80, 90, 17, 33, 250, 4, 8, 15, 16, 23, 42]])


@pytest.fixture(scope="module", params=[torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def tiny16(request, tmp_path_factory):
    dtype = request.param
    return make_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny_{dtype}"), seed=5, dtype=dtype), dtype


def logits(llm) -> torch.Tensor:
    with torch.no_grad():
        return llm.model(IDS).logits


def count(llm, cls) -> int:
    return sum(isinstance(m, cls) for m in llm.model.modules())


def test_fast_is_close_to_torch(tiny16):
    path, dtype = tiny16
    exact = offload_moe.load(path, device="cpu", dense_kernels="torch", progress=False)
    fast = offload_moe.load(path, device="cpu", dense_kernels="fast", progress=False)
    assert count(exact, CpuLinear) == 0 and exact.model.config._attn_implementation == "sdpa"
    # q, k, v, o per layer (2 layers) and lm_head; the routers are the experts' gate linears
    assert count(fast, CpuLinear) >= 9 and fast.model.config._attn_implementation == FP32_SDPA
    assert count(fast, CpuRMSNorm) == 5 and count(exact, CpuRMSNorm) == 0  # 2 per layer and the final one
    assert count(fast, CpuRouter) == 2 and count(exact, CpuRouter) == 0  # one per MoE layer
    assert fast.model.lm_head.weight is fast.model.get_input_embeddings().weight or \
        not fast.model.config.tie_word_embeddings
    want, got = logits(exact), logits(fast)
    assert got.dtype == dtype
    with torch.no_grad():  # the routers are still found by class (transformers' router_logits recorder)
        ref_routing = exact.model(IDS, output_router_logits=True).router_logits
        fast_routing = fast.model(IDS, output_router_logits=True).router_logits
    assert len(fast_routing) == len(ref_routing) == 2
    for a, b in zip(fast_routing, ref_routing):
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0.05 * b.float().abs().max().item())
    bound = 8 * torch.finfo(dtype).eps * want.float().abs().max()
    assert (got.float() - want.float()).abs().max() <= bound
    assert fast.generate(IDS, max_new_tokens=4, do_sample=False).shape == (1, IDS.shape[1] + 4)


def test_auto_stays_exact_for_unquantized_experts(tiny16):
    path, dtype = tiny16
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager").eval()
    llm = offload_moe.load(path, device="cpu", progress=False)  # dense_kernels="auto"
    assert count(llm, CpuLinear) == 0
    with torch.no_grad():
        assert torch.equal(reference(IDS).logits, logits(llm))


def test_auto_is_fast_for_quantized_experts_and_q8_attention_runs(tiny16):
    path, dtype = tiny16
    hqq = offload_moe.load(path, device="cpu", experts="hqq4", progress=False)
    assert count(hqq, CpuLinear) >= 9
    q8 = offload_moe.load(path, device="cpu", experts="hqq4", attention="q8", progress=False)
    assert count(q8, Q8Linear) == 8 and count(q8, CpuLinear) >= 1  # q/k/v/o of 2 layers; lm_head and routers 16-bit
    want, got = logits(hqq).float(), logits(q8).float()
    # int8 weights and tokens (each rounded to 1/254 of its block's max) move a position's logits
    # by a few percent here; a random tiny router may flip an expert at some positions (then far
    # more), so the median position is what is bounded.
    per_position = (got - want).norm(dim=-1) / want.norm(dim=-1)  # [1, T]
    assert per_position.median() < 0.06
    text = q8.generate("Hello", max_new_tokens=4, do_sample=False)
    assert isinstance(text, str)


def test_q8_with_torch_kernels_still_quantizes(tiny16):
    path, _ = tiny16
    llm = offload_moe.load(path, device="cpu", attention="q8", dense_kernels="torch", progress=False)
    assert count(llm, Q8Linear) == 8 and count(llm, CpuLinear) == 0


def test_fp32_models_are_left_alone(tiny_fp32):
    llm = offload_moe.load(tiny_fp32, device="cpu", dense_kernels="fast", progress=False)
    assert count(llm, CpuLinear) == 0 and count(llm, CpuRMSNorm) == 0 and llm.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("keyword, value, message", [
    ("dense_kernels", "fastest", "dense_kernels='fastest'"), ("attention", "q4", "attention='q4'"),
    ("experts", "q8", "unknown quantization format 'q8'"),  # q8 is an attention format only
])
def test_bad_values_are_refused_by_name(tiny_fp32, keyword, value, message):
    with pytest.raises(ConfigError, match=message):
        offload_moe.load(tiny_fp32, device="cpu", progress=False, **{keyword: value})


def test_bad_environment_value_and_q8_off_the_cpu():
    with pytest.raises(ConfigError, match="OFFLOAD_MOE_DENSE_KERNELS='gpu'"):
        OPTIONS["dense_kernels"].from_env({"OFFLOAD_MOE_DENSE_KERNELS": "gpu"})
    assert OPTIONS["attention"].from_env({"OFFLOAD_MOE_ATTENTION": "q8"}) == "q8"
    with pytest.raises(ConfigError, match="q8 attention runs on the CPU only"):
        OffloadConfig(device=torch.device("cuda"), dtype=torch.float16, attention="q8")
