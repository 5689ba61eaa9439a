"""offload_moe's dense CPU kernels (offload_moe/quant/dense_kernel.c), the paths around them, the q8
format and the measured switch point, against their definitions.

Both SIMD variants run here where the CPU has them (the kernel takes the variant as an argument);
`variant()` following torch's capability is checked in a subprocess with ATEN_CPU_CAPABILITY=avx2.
Tolerance of an fp32 sum of K products (each rounded once to fp32, in any order): the worst-case
bound of fp32 dot products, |y - exact| <= (K + 1) * 2^-24 * sum_k |w_k x_k|.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from offload_moe.errors import ConfigError
from offload_moe.quant import dense_kernel, dense_switch, native
from offload_moe.quant.cpu_norm import CpuRMSNorm, rms_norm_reference, use_fast_norms
from offload_moe.quant.cpu_router import RECIPES, CpuRouter, Recipe, route_reference, use_fast_routers
from offload_moe.quant.cpu_linear import CpuLinear, Q8Linear, use_fast_linears
from offload_moe.quant.dense_matmul import TILE_ROWS, Switch, Workspace, dense_matmul, q8_matmul
from offload_moe.quant.q8 import BLOCK, dequantize_q8, quantize_q8, round_activations

VARIANTS = sorted(dense_kernel.supported_variants())
needs_kernel = pytest.mark.skipif(not VARIANTS, reason="offload_moe's dense CPU kernel does not run here")


def assert_fp32_sum_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y [T, N] against x [T, K] @ w.T in fp64, within the fp32 summation bound (module docstring)."""
    exact = x.double() @ w.double().T
    bound = (x.shape[1] + 1) * 2.0**-24 * (x.double().abs() @ w.double().abs().T) + 1e-30
    assert y.shape == exact.shape
    excess = ((y.double() - exact).abs() - bound).max().item() if y.numel() else -1.0
    assert excess <= 0, f"error exceeds the fp32 bound by {excess}"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@needs_kernel
@pytest.mark.parametrize("use", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [0, 1, 3, 8, 300])
@pytest.mark.parametrize("shape", [(37, 101), (64, 2048), (5, 7), (1, 16)])
def test_dense16_gemv_is_the_fp32_product(use, dtype, tokens, shape):
    n, k = shape
    w = torch.randn(n, k, generator=gen(1)).to(dtype)
    x = torch.randn(tokens, k, generator=gen(2))
    assert_fp32_sum_close(dense_kernel.dense16_gemv(x, w, use), x, w.float())


@needs_kernel
@pytest.mark.parametrize("use", VARIANTS)
def test_dense16_gemv_takes_strided_weights_and_non_contiguous_tokens(use):
    wide = torch.randn(45, 150, generator=gen(3)).to(torch.float16)
    w = wide[:, 7:120]  # rows 150 apart, unit column stride: read in place
    x = torch.randn(113, 5, generator=gen(4)).t()  # [5, 113], transposed
    assert not x.is_contiguous()
    assert_fp32_sum_close(dense_kernel.dense16_gemv(x, w, use), x, w.float())
    assert_fp32_sum_close(dense_kernel.dense16_gemv(x.to(torch.bfloat16), w, use), x.to(torch.bfloat16).float(), w.float())


@needs_kernel
@pytest.mark.parametrize("use", VARIANTS)
@pytest.mark.parametrize("io", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5])
def test_dense16_gemv_reads_and_writes_16_bit_activations_as_torch_casts_them(use, io, tokens):
    # 16-bit tokens, a bias and a 16-bit output inside the kernel: the very bits of widening
    # first, the fp32 product, adding the bias in fp32 and one cast (round to nearest even)
    w = torch.randn(37, 101, generator=gen(11)).half()
    x = (torch.randn(tokens, 101, generator=gen(12)) * 3).to(io)
    for bias in (None, torch.randn(37, generator=gen(13)).to(io), torch.randn(37, generator=gen(14))):
        ref = dense_kernel.dense16_gemv(x.float(), w, use)
        ref = ref if bias is None else ref + bias.float()
        y = dense_kernel.dense16_gemv(x, w, use, bias=bias, out_dtype=io)
        assert y.dtype == io and torch.equal(y, ref.to(io))
        assert torch.equal(dense_kernel.dense16_gemv(x, w, use, bias=bias), ref)
    huge = torch.full((1, 101), 1e4).to(io)  # past fp16's range: inf, as torch's cast gives
    assert torch.equal(dense_kernel.dense16_gemv(huge, w, use, out_dtype=io),
                       dense_kernel.dense16_gemv(huge.float(), w, use).to(io))


def test_dense16_gemv_refuses_what_it_cannot_read():
    if not VARIANTS:
        pytest.skip("no kernel")
    with pytest.raises(ValueError, match="unit column stride"):
        dense_kernel.dense16_gemv(torch.randn(1, 8), torch.randn(8, 4).half().t())
    with pytest.raises(ValueError, match="fp16/bf16"):
        dense_kernel.dense16_gemv(torch.randn(1, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="bias"):
        dense_kernel.dense16_gemv(torch.randn(1, 8), torch.randn(4, 8).half(), bias=torch.zeros(5))
    with pytest.raises(ValueError, match="x must be"):
        dense_kernel.dense16_gemv(torch.randn(1, 8).double(), torch.randn(4, 8).half())
    with pytest.raises(ValueError, match="out_dtype"):
        dense_kernel.dense16_gemv(torch.randn(1, 8), torch.randn(4, 8).half(), out_dtype=torch.float64)


@pytest.mark.parametrize("switch", [Switch(0), Switch(0, True), Switch(10**6)], ids=["tiles", "native", "kernel"])
@pytest.mark.parametrize("tokens", [1, 9, 300])
def test_every_path_of_dense_matmul_is_the_product(switch, tokens):
    n, k = TILE_ROWS + 45, 96  # two tiles, the second partial
    w = torch.randn(n, k, generator=gen(5)).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen(6)).to(torch.bfloat16)
    x = torch.randn(tokens, k, generator=gen(7)).to(torch.bfloat16)
    y = dense_matmul(x, w, bias, Workspace(), switch, out_dtype=torch.float32)
    assert y.is_contiguous() and dense_matmul(x, w, bias, Workspace(), switch).dtype == torch.bfloat16
    if switch.native_prefill or not dense_kernel.available() and switch.gemv_max_tokens:
        torch.testing.assert_close(y, torch.nn.functional.linear(x, w, bias).float(), rtol=0, atol=0)  # torch's own
    else:
        assert y.dtype == torch.float32
        assert_fp32_sum_close(y - bias.float(), x.float(), w.float())


def test_cpu_linear_keeps_the_weight_and_the_linear_contract():
    linear = torch.nn.Linear(40, 300, dtype=torch.float16)
    weight, bias = linear.weight, linear.bias
    x = torch.randn(2, 3, 40, generator=gen(8)).half()
    for switch in (Switch(0), Switch(0, True), Switch(64)):
        fast = CpuLinear(linear, Workspace(), switch)
        assert fast.weight is weight and fast.bias is bias and isinstance(fast, torch.nn.Linear)
        y = fast(x)
        assert y.shape == (2, 3, 300) and y.dtype == torch.float16 and y.is_contiguous()
        ref = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
        # one fp16 rounding of the output on top of the fp32 sum
        torch.testing.assert_close(y.float(), ref, rtol=2**-10, atol=1e-3)


def test_use_fast_linears_swaps_16bit_cpu_linears_only():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, dtype=torch.float16), torch.nn.Linear(8, 8),
                                torch.nn.Sequential(torch.nn.Linear(8, 4, dtype=torch.bfloat16)))
    first = model[0].weight
    assert use_fast_linears(model) == 2
    assert type(model[0]) is CpuLinear and type(model[1]) is torch.nn.Linear and type(model[2][0]) is CpuLinear
    assert model[0].weight is first and model[0].workspace is model[2][0].workspace
    assert use_fast_linears(model) == 0  # already swapped


# ---------------------------------------------------------------------------------------------
# q8


def test_q8_quantize_dequantize_pair():
    w = torch.randn(6, 4 * BLOCK, generator=gen(9))
    w[2, :BLOCK] = 0  # an all-zero block: scale 0, codes 0
    codes, scales = quantize_q8(w)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (6, 4)
    assert codes.abs().max() <= 127 and scales[2, 0] == 0 and not codes[2, :BLOCK].any()
    blocks = codes.view(6, 4, BLOCK).abs().amax(-1)
    assert torch.equal(blocks[scales > 0], torch.full_like(blocks[scales > 0], 127))  # each block's max is a full code
    deq = dequantize_q8(codes, scales)
    step = scales.repeat_interleave(BLOCK, dim=1)
    assert ((deq - w).abs() <= step / 2 * (1 + 1e-6) + 1e-12).all()  # round to nearest
    assert torch.equal(deq, codes.float() * step)  # the definition, exactly
    with pytest.raises(ConfigError, match="multiple of 32"):
        quantize_q8(torch.randn(4, 48))


def test_round_activations_is_a_rounding_to_int8_per_block():
    x = torch.randn(3, 2 * BLOCK, generator=gen(10))
    r = round_activations(x)
    scale = x.view(3, 2, BLOCK).abs().amax(-1, keepdim=True) / 127
    codes = r.view(3, 2, BLOCK) / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 127 + 1e-4
    assert ((r - x).abs().view(3, 2, BLOCK) <= scale / 2 * (1 + 1e-5)).all()


@needs_kernel
@pytest.mark.parametrize("use", VARIANTS)
@pytest.mark.parametrize("tokens", [0, 1, 3, 8, 300])
@pytest.mark.parametrize("shape", [(37, 96), (64, 2048), (1, 32)])
def test_q8_gemv_is_its_definition(use, tokens, shape):
    n, k = shape
    codes, scales = quantize_q8(torch.randn(n, k, generator=gen(11)))
    x = torch.randn(tokens, k, generator=gen(12)) * 3
    y = dense_kernel.q8_gemv(x, codes, scales, use)
    assert_fp32_sum_close(y, round_activations(x), dequantize_q8(codes, scales))


@pytest.mark.parametrize("switch", [Switch(0), Switch(10**6)], ids=["tiles", "kernel"])
def test_q8_matmul_paths(switch):
    n, k = TILE_ROWS + 3, 64
    codes, scales = quantize_q8(torch.randn(n, k, generator=gen(13)))
    bias = torch.randn(n, generator=gen(14))
    x = torch.randn(5, k, generator=gen(15))
    y = q8_matmul(x, codes, scales, bias, Workspace(), switch) - bias
    rounded = switch.gemv_max_tokens and dense_kernel.available()
    assert_fp32_sum_close(y, round_activations(x) if rounded else x, dequantize_q8(codes, scales))


def test_q8_linear_holds_only_the_codes():
    linear = torch.nn.Linear(64, 10, dtype=torch.bfloat16)
    q8 = Q8Linear(linear, Workspace(), Switch(0))
    assert not hasattr(q8, "weight") and q8.codes.shape == (10, 64)
    y = q8(torch.randn(2, 64, dtype=torch.bfloat16))
    assert y.shape == (2, 10) and y.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# variants and the measured switch


def test_variant_follows_torchs_capability():
    code = ("import torch; from offload_moe.quant import dense_kernel as d; "
            "print(torch.backends.cpu.get_cpu_capability(), d.variant())")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "AVX2" and out[1] == (str(dense_kernel.AVX2) if VARIANTS else "None")
    env["OFFLOAD_MOE_CPU_KERNEL"] = "torch"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "None"


def test_switch_is_measured_once_cached_and_a_corrupt_cache_rewritten(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_MOE_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(dense_switch, "measure", lambda kind: calls.append(kind) or Switch(7, kind == "float16"))
    assert dense_switch.cached_switch("float16") == Switch(7, True)
    assert dense_switch.cached_switch("float16") == Switch(7, True) and calls == ["float16"]
    path = native.kernel_dir() / dense_switch.cache_name()
    assert path.parent == tmp_path / "kernels"
    entries = json.loads(path.read_text())
    assert entries == {dense_switch.cache_key("float16"): {"gemv_max_tokens": 7, "native_prefill": True}}
    assert dense_switch.cached_switch("q8") == Switch(7, False) and len(json.loads(path.read_text())) == 2
    path.write_text("{not json")
    assert dense_switch.cached_switch("float16") == Switch(7, True) and calls == ["float16", "q8", "float16"]
    assert json.loads(path.read_text())[dense_switch.cache_key("float16")]["gemv_max_tokens"] == 7
    path.write_text(json.dumps({dense_switch.cache_key("q8"): {"gemv_max_tokens": "many"}}))
    assert dense_switch.cached_switch("q8") == Switch(7, False) and calls[-1] == "q8"
    assert not list(tmp_path.glob("kernels/*.tmp"))


def test_measured_switch_is_sane():
    for kind in dense_switch.KINDS:
        switch = dense_switch.measure(kind)
        assert switch.gemv_max_tokens in (0, *dense_switch.TOKEN_STEPS) and isinstance(switch.native_prefill, bool)
        assert switch.gemv_max_tokens == 0 or dense_kernel.available()
        assert not (kind == "q8" and switch.native_prefill)  # torch has no q8 matmul


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", [0, 1])
def test_rms_norm16_is_its_torch_reference(dtype, mode):
    w = (torch.randn(300, generator=gen(20)) * 0.5 + 1).to(dtype)
    x = (torch.randn(2, 7, 300, generator=gen(21)) * 4).to(dtype)
    want = rms_norm_reference(x, w, 1e-5, mode)
    got = dense_kernel.rms_norm16(x, w, 1e-5, mode, want.dtype)
    assert got.shape == x.shape and got.dtype == want.dtype
    assert (got == want).float().mean() >= 0.99  # the rest: the fp32 sum's order, one rounding step
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * torch.finfo(dtype).eps, atol=0)
    wide = dense_kernel.rms_norm16(x, w.float(), 1e-5, 0, torch.float32)  # an fp32 weight promotes
    torch.testing.assert_close(wide, rms_norm_reference(x, w.float(), 1e-5, 0), rtol=2 * torch.finfo(dtype).eps, atol=0)
    with pytest.raises(ValueError, match="rms_norm16"):
        dense_kernel.rms_norm16(x, w[:-1], 1e-5, mode, dtype)


@needs_kernel
def test_norms_are_swapped_only_where_the_kernel_reproduces_them():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    classes = {"mixtral": MixtralRMSNorm, "gpt_oss": GptOssRMSNorm, "gemma": GemmaRMSNorm, "qwen3": Qwen3MoeRMSNorm}
    for dtype in (torch.float16, torch.bfloat16):
        model = torch.nn.ModuleDict({name: cls(256, eps=1e-5).to(dtype) for name, cls in classes.items()})
        with torch.no_grad():
            for m in model.values():
                m.weight.copy_(torch.randn(256, generator=gen(22)) * 0.3 + 0.8)
        reference = {name: m for name, m in model.items()}
        assert use_fast_norms(model, dtype) == 3
        assert not isinstance(model["gemma"], CpuRMSNorm)  # 1 + weight: no mode reproduces it
        assert (model["mixtral"].mode, model["gpt_oss"].mode, model["qwen3"].mode) == (0, 1, 0)
        x = (torch.randn(5, 256, generator=gen(23)) * 2).to(dtype)
        for name, m in model.items():
            assert m.weight is reference[name].weight
            with torch.no_grad():
                want = reference[name](x)
            assert (m(x) == want).float().mean() >= 0.99
        assert use_fast_norms(torch.nn.ModuleDict({"n": MixtralRMSNorm(256)}), torch.float32) == 0  # fp32: left alone


def test_a_norm_follows_the_kernel_switch(monkeypatch):
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    norm = CpuRMSNorm(MixtralRMSNorm(64).half(), 1e-6, 0)
    x = torch.randn(3, 64, generator=gen(24)).half()
    monkeypatch.setenv("OFFLOAD_MOE_CPU_KERNEL", "torch")
    assert torch.equal(norm(x), rms_norm_reference(x, norm.weight, 1e-6, 0))


def router_families():
    from transformers import DeepseekV3Config, GptOssConfig, MixtralConfig, OlmoeConfig, Qwen3MoeConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    dims = dict(hidden_size=256, num_experts_per_tok=4)
    return {
        "mixtral": MixtralTopKRouter(MixtralConfig(num_local_experts=32, **dims)),
        "qwen3": Qwen3MoeTopKRouter(Qwen3MoeConfig(num_experts=64, norm_topk_prob=True, **dims)),
        "olmoe": OlmoeTopKRouter(OlmoeConfig(num_experts=64, norm_topk_prob=False, **dims)),
        "gpt_oss": GptOssTopKRouter(GptOssConfig(num_local_experts=32, **dims)),
        "deepseek_v3": DeepseekV3TopkRouter(DeepseekV3Config(n_routed_experts=32, n_group=4, topk_group=2, **dims)),
    }


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_routers_are_swapped_only_where_the_kernel_routes_as_they_do(dtype):
    model = torch.nn.ModuleDict(router_families()).to(dtype)
    with torch.no_grad():
        for m in model.values():
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen(30)) * 0.05)
            if isinstance(getattr(m, "bias", None), torch.nn.Parameter):
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen(31)) * 0.1)
    reference = dict(model.items())
    assert use_fast_routers(model) == 4
    assert not isinstance(model["deepseek_v3"], CpuRouter)  # grouped top-k and a score bias: no recipe
    assert model["mixtral"].recipe.fp32_scores and not model["qwen3"].recipe.fp32_scores
    assert model["qwen3"].recipe.renorm and not model["olmoe"].recipe.renorm
    x = torch.randn(6, 256, generator=gen(32)).to(dtype)
    for name, router in model.items():
        with torch.no_grad():
            logits, scores, indices = reference[name](x)
        got = router(x)
        assert router.weight is reference[name].weight
        assert got[1].dtype == scores.dtype and got[0].dtype == logits.dtype
        assert torch.equal(got[2].sort(dim=-1).values, indices.sort(dim=-1).values)
        torch.testing.assert_close(got[1].float().sort(dim=-1).values, scores.float().sort(dim=-1).values,
                                   rtol=2e-2, atol=1e-3)


@needs_kernel
def test_route_topk_is_its_torch_reference_and_refuses_bad_shapes(monkeypatch):
    logits = torch.randn(5, 40, generator=gen(33))
    weight = torch.randn(40, 16, generator=gen(34)).half()
    for recipe in RECIPES:
        idx, scores = dense_kernel.route_topk(logits, 6, recipe.order, recipe.renorm, torch.float32)
        _, want_scores, want_idx = route_reference(logits, torch.eye(40), None, 6, Recipe(recipe.order, recipe.renorm, True))
        assert torch.equal(idx, want_idx)
        torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-7)
    for bad in (dict(k=0), dict(k=41), dict(order=2)):
        args = dict(k=6, order=0) | bad
        with pytest.raises(ValueError, match="route_topk"):
            dense_kernel.route_topk(logits, args["k"], args["order"], True, torch.float32)
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    mixtral = MixtralTopKRouter(MixtralConfig(hidden_size=16, num_local_experts=40, num_experts_per_tok=3)).half()
    with torch.no_grad():
        mixtral.weight.copy_(weight)
    router = CpuRouter(mixtral, 3, Recipe(0, True, True))
    x = torch.randn(4, 16, generator=gen(35)).half()
    monkeypatch.setenv("OFFLOAD_MOE_CPU_KERNEL", "torch")  # the switch, read per call: torch's ops
    for got, want in zip(router(x), route_reference(x, weight, None, 3, Recipe(0, True, True))):
        assert torch.equal(got, want)
