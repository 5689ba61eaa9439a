"""Decode attention on offload_moe's CPU kernels (offload_moe.quant.cpu_attention) and the kernels
under it (dense_kernel's rope16, decode_attention, dense16_gemv_many), against transformers' own
attention and torch's SDPA."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, GptOssConfig, MixtralConfig, OlmoeConfig, Qwen3MoeConfig
from transformers import GptOssForCausalLM, MixtralForCausalLM, OlmoeForCausalLM, Qwen3MoeForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralAttention, apply_rotary_pos_emb

from offload_moe.quant.cpu_attention import CpuAttention, norms_of, use_fast_attention
from offload_moe.model.fp32_attention import use_fp32_attention
from offload_moe.quant import dense_kernel
from offload_moe.quant.cpu_linear import use_fast_linears
from offload_moe.quant.cpu_norm import use_fast_norms
from offload_moe.quant.formats import parse_attention_format
from offload_moe.quant.quantized_linear import quantize_attention

VARIANTS = sorted(dense_kernel.supported_variants())
pytestmark = [pytest.mark.skipif(not VARIANTS, reason="offload_moe's dense CPU kernel does not run here"),
              pytest.mark.usefixtures("one_torch_thread")]
DTYPES = [torch.float16, torch.bfloat16]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, heads, dim", [(1, 8, 128), (3, 5, 64), (2, 1, 16)])
def test_rope16_is_transformers_rotary_embedding_bit_for_bit(dtype, rows, heads, dim):
    x = (torch.randn(rows, heads, dim, generator=gen(1)) * 4).to(dtype)
    angles = torch.rand(rows, dim, generator=gen(2)) * 50
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    # transformers' layout: q [B, heads, S, D], cos [B, S, D]
    want, _ = apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None], cos[None], sin[None])
    got = dense_kernel.rope16(x.clone(), cos, sin)
    assert torch.equal(got, want[0].transpose(0, 1))


def test_rope16_refuses_what_it_cannot_rotate():
    x, cs = torch.zeros(1, 2, 16, dtype=torch.float16), torch.zeros(1, 16, dtype=torch.float16)
    for bad in (lambda: dense_kernel.rope16(x.float(), cs.float(), cs.float()),  # fp32
                lambda: dense_kernel.rope16(torch.zeros(1, 2, 15, dtype=torch.float16), cs[:, :15], cs[:, :15]),
                lambda: dense_kernel.rope16(x, cs[:, :8], cs),  # cos of another size
                lambda: dense_kernel.rope16(x, cs.bfloat16(), cs),  # cos of another dtype
                lambda: dense_kernel.rope16(x.transpose(0, 1), cs, cs)):  # not contiguous
        with pytest.raises(ValueError, match="rope16"):
            bad()


def sdpa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query row per head [Hq, D] against k, v [Hkv, L, D], in fp32 (query head h reads KV head h // group)."""
    group = q.shape[0] // k.shape[0]
    keys, values = (t.float().repeat_interleave(group, dim=0)[None] for t in (k, v))
    return F.scaled_dot_product_attention(q.float()[None, :, None], keys, values, scale=scale)[0, :, 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 7, 63, 64, 65, 200])
@pytest.mark.parametrize("heads, kv_heads, dim", [(8, 2, 64), (4, 4, 128), (6, 1, 16)])
def test_decode_attention_is_sdpa_in_fp32(dtype, length, heads, kv_heads, dim):
    q = torch.randn(heads, dim, generator=gen(3)).to(dtype)
    cache = (torch.randn(2, kv_heads, length + 5, dim, generator=gen(4)) * 2).to(dtype)
    k, v = cache[0, :, :length], cache[1, :, :length]  # views into a longer cache, read in place
    want = sdpa_reference(q, k, v, dim**-0.5)
    got = dense_kernel.decode_attention(q, k, v, dim**-0.5, torch.float32)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
    rounded = dense_kernel.decode_attention(q, k, v, dim**-0.5, dtype)
    assert rounded.dtype == dtype
    step = torch.finfo(dtype).eps * want.abs().clamp(min=torch.finfo(dtype).tiny)
    assert ((rounded.float() - want).abs() <= step).all()  # one rounding of (nearly) the fp32 result
    assert (rounded == want.to(dtype)).float().mean() >= 0.98


def test_decode_attention_refuses_what_it_cannot_read():
    q, kv = torch.zeros(4, 16, dtype=torch.float16), torch.zeros(2, 3, 16, dtype=torch.float16)
    for bad in (lambda: dense_kernel.decode_attention(q, kv.float(), kv.float(), 1.0, torch.float16),
                lambda: dense_kernel.decode_attention(q[:3], kv, kv, 1.0, torch.float16),  # 3 heads over 2 KV heads
                lambda: dense_kernel.decode_attention(q, kv[:, :0], kv[:, :0], 1.0, torch.float16),  # nothing cached
                lambda: dense_kernel.decode_attention(q[:, :12], kv[..., :12], kv[..., :12], 1.0, torch.float16),
                lambda: dense_kernel.decode_attention(q, kv, kv[:, :2], 1.0, torch.float16),
                lambda: dense_kernel.decode_attention(q, kv.transpose(1, 2), kv.transpose(1, 2), 1.0, torch.float16)):
        with pytest.raises(ValueError, match="decode_attention"):
            bad()


@pytest.mark.parametrize("use", VARIANTS)
@pytest.mark.parametrize("tokens", [1, 5])
def test_dense16_gemv_many_is_each_product_side_by_side(use, tokens):
    x = torch.randn(tokens, 96, generator=gen(5)).bfloat16()
    weights = [torch.randn(n, 96, generator=gen(6 + n)).to(dt) for n, dt in ((40, torch.float16), (7, torch.bfloat16),
                                                                            (16, torch.float16))]
    biases = [None, torch.randn(7, generator=gen(9)).half(), torch.randn(16, generator=gen(10))]
    for out_dtype in (torch.float32, torch.bfloat16):
        want = torch.cat([dense_kernel.dense16_gemv(x, w, use, bias=b, out_dtype=out_dtype)
                          for w, b in zip(weights, biases)], dim=-1)
        assert torch.equal(dense_kernel.dense16_gemv_many(x, weights, biases, out_dtype, use), want)
    group = dense_kernel.GemvGroup(weights, biases)  # checked once, called many times
    assert torch.equal(group(x[None], torch.float32, use)[0], dense_kernel.dense16_gemv_many(x, weights, biases,
                                                                                              torch.float32, use))
    with pytest.raises(ValueError, match="every weight must take 96"):
        dense_kernel.GemvGroup([weights[0], torch.zeros(3, 95, dtype=torch.float16)], [None, None])
    with pytest.raises(ValueError, match="one bias"):
        dense_kernel.GemvGroup(weights, biases[:2])
    with pytest.raises(ValueError, match="dense kernel: x"):
        group(torch.zeros(1, 95), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_calls_are_their_parts_bit_for_bit(dtype):
    """q, k, v and the rotary of q and k in one call; attention and the output projection in one."""
    heads, kv_heads, dim, hidden = 4, 2, 32, 64
    x = torch.randn(1, 1, hidden, generator=gen(12)).to(dtype)
    weights = [(torch.randn(n * dim, hidden, generator=gen(13 + n)) * 0.2).to(dtype) for n in (heads, kv_heads, kv_heads)]
    angles = torch.rand(1, dim, generator=gen(17)) * 9
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    group = dense_kernel.GemvGroup(weights, [None] * 3)
    plain = group(x, dtype).view(heads + 2 * kv_heads, dim)
    rotated = group(x, dtype, rotary=(cos, sin, heads + kv_heads)).view(heads + 2 * kv_heads, dim)
    want = dense_kernel.rope16(plain[: heads + kv_heads].clone()[None], cos, sin)[0]
    assert torch.equal(rotated[: heads + kv_heads], want) and torch.equal(rotated[heads + kv_heads :], plain[heads + kv_heads :])
    with pytest.raises(ValueError, match="rotary"):
        group(x, torch.float32, rotary=(cos, sin, heads))  # rotated in 16 bits only
    with pytest.raises(ValueError, match="rotary"):
        group(x, dtype, rotary=(cos, sin, heads + 2 * kv_heads + 1))  # more heads than columns
    q = torch.randn(heads, dim, generator=gen(18)).to(dtype)
    k, v = (torch.randn(kv_heads, 9, dim, generator=gen(19 + i)).to(dtype) for i in range(2))
    o_weight, o_bias = (torch.randn(hidden, heads * dim, generator=gen(21)) * 0.1).to(dtype), torch.randn(hidden).to(dtype)
    output = dense_kernel.GemvGroup([o_weight], [o_bias])
    attended = dense_kernel.decode_attention(q, k, v, 0.3, dtype)
    projected = dense_kernel.decode_attention(q, k, v, 0.3, dtype, output)
    assert torch.equal(projected, dense_kernel.dense16_gemv(attended.view(-1), o_weight, bias=o_bias, out_dtype=dtype))
    with pytest.raises(ValueError, match="output"):
        dense_kernel.decode_attention(q, k, v, 0.3, dtype, dense_kernel.GemvGroup([o_weight[:, :64]], [None]))


# ---- the module swap ----

DIMS = dict(vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128)


def families() -> dict[str, tuple[type, object]]:
    return {
        "mixtral": (MixtralForCausalLM, MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **DIMS)),
        "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                          **DIMS)),  # q/k norms on each head
        "olmoe": (OlmoeForCausalLM, OlmoeConfig(num_experts=4, num_experts_per_tok=2, **DIMS)),  # on the projection
        # a window shorter than the decode: past it the mask is needed, and the module's own forward runs
        "mixtral_window": (MixtralForCausalLM, MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                                                             sliding_window=7, **DIMS)),
    }


def build(model_class: type, config, dtype: torch.dtype, fast: bool, attention: str | None = None) -> torch.nn.Module:
    """A random model (the same weights for both `fast`), on the CPU kernels as the loader sets
    them up (attention="q8": its projections quantized first), the attention swapped only when `fast`."""
    torch.manual_seed(0)
    model = model_class._from_config(copy.deepcopy(config), attn_implementation="sdpa").to(dtype).eval()
    if attention is not None:
        quantize_attention(model, parse_attention_format(attention))
    use_fast_linears(model)
    use_fast_norms(model, dtype)
    assert use_fp32_attention(model)
    if fast:
        assert use_fast_attention(model, dtype) == config.num_hidden_layers
    return model


def greedy_logits(model: torch.nn.Module, steps: int = 6) -> list[torch.Tensor]:
    """The logits of a 5-token prompt, then of `steps` greedy decode steps (one token each)."""
    ids = torch.tensor([[3, 17, 40, 9, 77]])
    with torch.no_grad():
        out = model(ids, use_cache=True)
        found = [out.logits[:, -1]]
        for _ in range(steps):
            token = out.logits[:, -1:].float().argmax(-1)
            out = model(token, cache=out.cache, use_cache=True)
            found.append(out.logits[:, -1])
    return found


@pytest.mark.parametrize("family", sorted(families()))
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_matches_transformers_attention(family, dtype):
    model_class, config = families()[family]
    reference, fast = build(model_class, config, dtype, False), build(model_class, config, dtype, True)
    swapped = [m for m in fast.modules() if isinstance(m, CpuAttention)]
    expected_norms = {"mixtral": "none", "qwen3_moe": "head", "olmoe": "projection", "mixtral_window": "none"}[family]
    assert len(swapped) == 2 and {m.norms for m in swapped} == {expected_norms}
    assert all(isinstance(m, type(r)) for m, r in zip(swapped, (l.self_attn for l in reference.model.layers)))
    replaced = swapped[0]._own_forward.__self__  # the module it replaced: the same submodules, not copies
    assert not isinstance(replaced, CpuAttention) and swapped[0].q_proj is replaced.q_proj
    assert swapped[0]._qkv is not None  # one kernel call for q, k and v
    assert fast.state_dict().keys() == reference.state_dict().keys()
    want, got = greedy_logits(reference), greedy_logits(fast)
    assert torch.equal(got[0], want[0])  # the prompt runs the module's own forward
    for step, (a, b) in enumerate(zip(got[1:], want[1:])):
        bound = 8 * torch.finfo(dtype).eps * b.float().abs().max()
        assert (a.float() - b.float()).abs().max() <= bound, f"decode step {step}"


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_q8_projections_are_called_as_the_modules_they_are(family):
    model_class, config = families()[family]
    reference = build(model_class, config, torch.float16, False, attention="q8")
    fast = build(model_class, config, torch.float16, True, attention="q8")
    swapped = [m for m in fast.modules() if isinstance(m, CpuAttention)]
    assert swapped and all(m._qkv is None and m._o is None for m in swapped)
    for a, b in zip(greedy_logits(fast)[1:], greedy_logits(reference)[1:]):
        assert (a.float() - b.float()).abs().max() <= 8 * torch.finfo(torch.float16).eps * b.float().abs().max()


def test_every_other_call_runs_the_modules_own_forward(monkeypatch):
    model_class, config = families()["mixtral"]
    fast = build(model_class, config, torch.float16, True)
    attention = fast.model.layers[0].self_attn
    calls = []
    own = attention._own_forward
    monkeypatch.setattr(attention, "_own_forward", lambda *a, **k: calls.append(1) or own(*a, **k))
    x = torch.randn(1, 1, 64, generator=gen(11)).half()
    rotary = fast.model.rotary_emb(x, torch.tensor([[5]]))

    def cache(batch: int = 1) -> DynamicCache:
        made = DynamicCache()
        made.update(torch.zeros(batch, 2, 5, 16).half(), torch.zeros(batch, 2, 5, 16).half(), 0)
        return made

    with torch.no_grad():
        attention(x, rotary, None, cache=cache())
        assert calls == []  # one token, no mask: the fast path
        attention(x, rotary, torch.zeros(1, 1, 1, 6).half(), cache=cache())  # a mask
        attention(torch.cat([x, x], dim=1), fast.model.rotary_emb(x, torch.tensor([[5, 6]])), None, cache=cache())
        attention(torch.cat([x, x]), rotary, None, cache=cache(2))  # two sequences
        attention(x, rotary, None, cache=None)  # no cache
        monkeypatch.setenv("OFFLOAD_MOE_CPU_KERNEL", "torch")  # read per call
        attention(x, rotary, None, cache=cache())
        monkeypatch.delenv("OFFLOAD_MOE_CPU_KERNEL")
        fast.set_attn_implementation("eager")
        attention(x, rotary, None, cache=cache())
    assert len(calls) == 6


def test_a_cache_handing_back_other_tensors_gets_sdpa_as_the_module_runs_it():
    class Fp32Cache(DynamicCache):  # e.g. a cache that dequantizes what it stores
        def update(self, keys, values, *args, **kwargs):
            keys, values = super().update(keys, values, *args, **kwargs)
            return keys.float(), values.float()

    model_class, config = families()["mixtral"]
    reference, fast = build(model_class, config, torch.float16, False), build(model_class, config, torch.float16, True)
    x = torch.randn(1, 1, 64, generator=gen(25)).half()
    rotary = fast.model.rotary_emb(x, torch.tensor([[5]]))
    outputs = []
    for model in (reference, fast):
        cache = Fp32Cache()
        cache.update(torch.randn(1, 2, 5, 16, generator=gen(26)).half(), torch.randn(1, 2, 5, 16, generator=gen(27)).half(), 0)
        with torch.no_grad():
            outputs.append(model.model.layers[0].self_attn(x, rotary, None, cache=cache)[0])
    bound = 4 * torch.finfo(torch.float16).eps * outputs[0].float().abs().max()
    assert (outputs[1].float() - outputs[0].float()).abs().max() <= bound


def test_modules_it_does_not_reproduce_are_left_alone():
    torch.manual_seed(0)
    sinks = GptOssForCausalLM(GptOssConfig(num_local_experts=4, num_experts_per_tok=2, **DIMS)).half().eval()
    assert norms_of(sinks.model.layers[0].self_attn) is None  # its own parameter (the sinks)
    mixtral = build(MixtralForCausalLM, families()["mixtral"][1], torch.float16, False)
    assert use_fast_attention(mixtral, torch.float32) == 0  # fp32 activations: left to torch
    mixtral.set_attn_implementation("sdpa")
    assert use_fast_attention(mixtral, torch.float16) == 0  # only where it runs offload_moe's fp32 SDPA
    clipped_config = OlmoeConfig(num_experts=4, num_experts_per_tok=2, clip_qkv=0.5, **DIMS)
    clipped = build(OlmoeForCausalLM, clipped_config, torch.float16, False)
    assert use_fast_attention(clipped, torch.float16) == 0  # clip_qkv: not in the fast path
    plain = MixtralAttention(families()["mixtral"][1], layer_idx=0).half()
    assert norms_of(plain) == "none"
    del plain.layer_idx  # not decoder self-attention as the fast path knows it
    assert norms_of(plain) is None


def test_output_attentions_recorder_still_finds_the_swapped_modules():
    model_class, config = families()["mixtral"]
    fast = build(model_class, config, torch.float16, True)
    fast.set_attn_implementation("eager")  # weights to record: the modules' own forward (eager) gives them
    with torch.no_grad():
        out = fast(torch.tensor([[3, 17, 40]]), output_attentions=True)
    assert len(out.attentions) == config.num_hidden_layers  # found by class: CpuAttention subclasses it
    assert out.attentions[0].shape == (1, config.num_attention_heads, 3, 3)
