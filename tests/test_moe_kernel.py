"""The fused MoE CPU kernel (offload_moe.quant.moe_kernel): one call for a layer's routed experts.

Checked against its definition, per expert: gate_up = q8(x) @ W1^T (+ b1) with the dequantized
prepared weights (int4_layout.dequantize_cpu_blocks), the gate, q8 of the gate's output, down
(+ b2), the routing weight, and the combine in ascending expert order; in float64. q8 (int8 in
blocks of 32, scale amax / 127) is computed here with the kernel's own fp32 operations, so both
round every input to the same code: a code flipped by a last-bit difference would move an output
by ~1/127 of a block's largest input, far above the 1e-5 checked. For the same reason the down
matmul is checked from the kernel's own gate output (`gate_out`), the gate itself separately.
Both layouts (BLOCK_N 64: AVX-512 VNNI, 32: AVX2) run where the CPU has them, whatever torch's
layout here; a subprocess checks the default layout under ATEN_CPU_CAPABILITY=avx2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from offload_moe.model.arch import (
    GATE_KINDS, ArchSpec, ExpertsKind, GateSpec, apply_gate_fn, gate_spec, matrix_fields,
)
from offload_moe.quant import moe_kernel, native
from offload_moe.quant.formats import parse_format
from offload_moe.quant.int4_layout import cpu_int4_block_n, dequantize_cpu_blocks, expanded_groups, kernel_in_features
from offload_moe.quant.matmul import linear, prepare_expert_for_cpu
from offload_moe.quant.quantize import pack, quantize

H, FF = 256, 128  # hidden, one expert's intermediate width (whole 64-row blocks, groups of 64)
LAYOUTS = [pytest.param(n, id=f"block_n{n}") for n in (64, 32)]
COUNTS = [1, 2, 5, 0, 64, 300]  # tokens per expert: both loops, an empty expert
ROOT = Path(__file__).resolve().parent.parent


def needs_layout(block_n: int) -> None:
    if block_n not in moe_kernel.block_ns():
        pytest.skip(f"the fused kernel's BLOCK_N={block_n} variant does not run on this CPU (or no compiler)")


def random_expert(fmt, gated: bool, seed: int, block_n: int, bias: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n1 = 2 * FF if gated else FF
    fields = {}
    for name, shape in (("gate_up", (n1, H)), ("down", (H, FF))):
        packed = pack(quantize(torch.randn(*shape, generator=gen) * 0.05, fmt, optimize=False))
        fields.update({f"{name}.{k}": v for k, v in packed.items()})
    prepared = prepare_expert_for_cpu(fields, fmt, H, FF, block_n=block_n, gated=gated)
    if bias:
        prepared["gate_up_bias"] = torch.randn(n1, generator=gen) * 0.3
        prepared["down_bias"] = torch.randn(H, generator=gen) * 0.3
    return prepared


def weight_t(prepared: dict[str, torch.Tensor], fmt, in_features: int, block_n: int) -> torch.Tensor:
    """fp64 W^T [in, out] as the kernel reads it (the dequantized prepared layout)."""
    out = prepared["scales_and_zeros"].shape[1]
    wt = torch.empty(in_features, out)
    blocks = prepared["qweight"].view(out // block_n, kernel_in_features(fmt, in_features), block_n // 2)
    dequantize_cpu_blocks(blocks, prepared["scales_and_zeros"], fmt, in_features, wt)
    return wt.double()


def q8(x: torch.Tensor, width: int) -> torch.Tensor:
    """x [T, K] rounded as the kernel rounds it, in blocks of `width` real inputs (16 for expanded
    groups, else 32), with the kernel's fp32 operations (see the module docstring); fp64 out."""
    blocks = x.float().reshape(x.shape[0], -1, width)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / torch.where(amax > 0, amax, 1), 0)
    codes = torch.round(blocks * inv)
    return (codes.double() * (amax / 127.0).double()).reshape(x.shape)


def gate_reference(gate: GateSpec, h: torch.Tensor) -> torch.Tensor:
    acts = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"), "relu": F.relu}
    if gate.kind == "swiglu_oai":
        g, u = h[:, ::2].clamp(max=gate.limit), h[:, 1::2].clamp(-gate.limit, gate.limit)
        return (u + 1) * (g * torch.sigmoid(g * gate.alpha))
    if gate.gated:
        a, b = h.chunk(2, dim=-1)
        return acts[gate.kind.removesuffix("_mul")](a) * b
    return acts[gate.kind](h)


def routing(counts: list[int], tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """token_of_row (each expert's tokens ascending, as torch.where gives them), weights, offsets."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(tokens, generator=gen)[:c].sort().values for c in counts]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return (torch.cat(rows), torch.rand(offsets[-1], generator=gen) + 0.1, offsets)


def run_layer(fmt, gate, block_n, counts, bias=False, tokens=None, tile_min=None, seed=0, x=None,
              chunk_bytes=moe_kernel.CHUNK_BYTES):
    tokens = max(counts) if tokens is None else tokens
    experts = [random_expert(fmt, gate.gated, seed + 10 + i, block_n, bias) for i in range(len(counts))]
    token_of_row, weight_of_row, offsets = routing(counts, tokens, seed)
    if x is None:
        x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(seed + 1))
    rows = offsets[-1]
    out = torch.zeros(tokens, H)
    rows_out = torch.empty(rows, H)
    gate_out = torch.empty(rows, FF)
    args = (x, token_of_row, weight_of_row, offsets, experts, fmt, gate)
    moe_kernel.moe_experts(*args, out, block_n=block_n, tile_min=tile_min, chunk_bytes=chunk_bytes)
    moe_kernel.moe_experts(*args, None, rows_out, block_n=block_n, tile_min=tile_min,
                           gate_out=gate_out, chunk_bytes=chunk_bytes)
    return dict(x=x, experts=experts, token_of_row=token_of_row, weight_of_row=weight_of_row, offsets=offsets,
                out=out, rows=rows_out, gate_out=gate_out)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def check_against_definition(fmt, gate, block_n, r) -> None:
    width = 16 if expanded_groups(fmt) else 32
    want_out = torch.zeros(r["out"].shape, dtype=torch.float64)
    for e, expert in enumerate(r["experts"]):
        lo, hi = r["offsets"][e], r["offsets"][e + 1]
        if lo == hi:
            continue
        idx = r["token_of_row"][lo:hi].long()
        h = q8(r["x"][idx], width) @ weight_t(matrix_fields(expert, "gate_up"), fmt, H, block_n)
        if "gate_up_bias" in expert:
            h = h + expert["gate_up_bias"].double()
        assert rel_err(r["gate_out"][lo:hi], gate_reference(gate, h)) < 1e-5
        y = q8(r["gate_out"][lo:hi], width) @ weight_t(matrix_fields(expert, "down"), fmt, FF, block_n)
        if "down_bias" in expert:
            y = y + expert["down_bias"].double()
        y = y * r["weight_of_row"][lo:hi, None].double()
        assert rel_err(r["rows"][lo:hi], y) < 1e-5
        want_out.index_put_((idx,), y, accumulate=True)  # ascending experts
    assert rel_err(r["out"], want_out) < 1e-5
    # the combine is the rows summed in row order, exactly
    combined = torch.zeros_like(r["out"])
    for row, token in enumerate(r["token_of_row"].tolist()):
        combined[token] += r["rows"][row]
    assert torch.equal(r["out"], combined)


@pytest.mark.parametrize("block_n", LAYOUTS)
@pytest.mark.parametrize("kind", GATE_KINDS)
def test_every_gate_is_the_definition(kind, block_n):
    needs_layout(block_n)
    gate = GateSpec(kind, alpha=1.702, limit=0.2) if kind == "swiglu_oai" else GateSpec(kind)
    fmt = parse_format("hqq4")
    check_against_definition(fmt, gate, block_n, run_layer(fmt, gate, block_n, [3, 0, 9], bias=kind == "swiglu_oai"))


@pytest.mark.parametrize("block_n", LAYOUTS)
@pytest.mark.parametrize("name", ["hqq4", "hqq3", "hqq2g64", "hqq2"])
def test_every_format_and_token_count_both_loops(name, block_n):
    """Counts 1..300 per expert and an empty one; the direct and tiled loops agree bit for bit
    (the same fp32 operations in the same order), and the measured threshold mixes them; so do
    small chunks (a few dozen rows between barriers, the 300-row expert split in pieces)."""
    needs_layout(block_n)
    fmt, gate = parse_format(name), GateSpec("silu_mul")
    tiled = run_layer(fmt, gate, block_n, COUNTS, tile_min=0)
    check_against_definition(fmt, gate, block_n, tiled)
    direct = run_layer(fmt, gate, block_n, COUNTS, tile_min=1 << 40)
    mixed = run_layer(fmt, gate, block_n, COUNTS)
    chunked = run_layer(fmt, gate, block_n, COUNTS, chunk_bytes=40 * 1024)
    for r in (direct, mixed, chunked):
        assert torch.equal(r["rows"], tiled["rows"]) and torch.equal(r["out"], tiled["out"])


@pytest.mark.parametrize("block_n", LAYOUTS)
@pytest.mark.parametrize("kind", ["relu", "swiglu_oai", "silu_mul"])
def test_biases_fp32_and_bf16(kind, block_n):
    needs_layout(block_n)
    gate, fmt = GateSpec(kind, limit=7.0) if kind == "swiglu_oai" else GateSpec(kind), parse_format("hqq4")
    r = run_layer(fmt, gate, block_n, [4, 12], bias=True)
    check_against_definition(fmt, gate, block_n, r)
    for expert in r["experts"]:  # bf16 biases are read as such: the same as their fp32 values
        for name in moe_kernel.BIASES:
            expert[name] = expert[name].bfloat16()
    out = torch.zeros_like(r["out"])
    moe_kernel.moe_experts(r["x"], r["token_of_row"], r["weight_of_row"], r["offsets"], r["experts"], fmt, gate,
                           out, block_n=block_n)
    for expert in r["experts"]:
        for name in moe_kernel.BIASES:
            expert[name] = expert[name].float()
    want = torch.zeros_like(out)
    moe_kernel.moe_experts(r["x"], r["token_of_row"], r["weight_of_row"], r["offsets"], r["experts"], fmt, gate,
                           want, block_n=block_n)
    assert torch.equal(out, want)


@pytest.mark.parametrize("block_n", LAYOUTS)
def test_no_tokens_no_rows_and_adding_into_out(block_n):
    needs_layout(block_n)
    fmt, gate = parse_format("hqq4"), GateSpec("silu_mul")
    experts = [random_expert(fmt, True, 1, block_n)]
    out = torch.zeros(0, H)
    moe_kernel.moe_experts(torch.zeros(0, H), torch.zeros(0, dtype=torch.int64), torch.zeros(0), [0, 0], experts,
                           fmt, gate, out, block_n=block_n)
    out = torch.ones(3, H)
    moe_kernel.moe_experts(torch.randn(3, H), torch.zeros(0, dtype=torch.int64), torch.zeros(0), [0, 0], experts,
                           fmt, gate, out, block_n=block_n)
    assert torch.equal(out, torch.ones(3, H))
    r = run_layer(fmt, gate, block_n, [2, 3])  # out is added into: twice from ones = 2 * result + ones
    twice = torch.ones_like(r["out"])
    for _ in range(2):
        moe_kernel.moe_experts(r["x"], r["token_of_row"], r["weight_of_row"], r["offsets"], r["experts"], fmt,
                               gate, twice, block_n=block_n)
    assert torch.allclose(twice, 2 * r["out"] + 1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_combined_result_is_the_fp32_sum_rounded_once(dtype):
    # no out given: the kernel sums from zero in fp32 and rounds once to the asked dtype, the
    # very bits of adding into zeros and casting after
    block_n = min(moe_kernel.block_ns(), default=None)
    if block_n is None:
        pytest.skip("the fused kernel does not run here")
    fmt, gate = parse_format("hqq4"), GateSpec("silu_mul")
    r = run_layer(fmt, gate, block_n, [3, 1, 4], tokens=6)
    args = (r["x"].to(dtype), r["token_of_row"], r["weight_of_row"], r["offsets"], r["experts"], fmt, gate)
    added = torch.zeros(6, H)
    moe_kernel.moe_experts(*args, added, block_n=block_n)
    got = moe_kernel.moe_experts(*args, block_n=block_n)
    assert got.dtype == dtype and torch.equal(got, added.to(dtype))
    assert torch.equal(moe_kernel.moe_experts(*args, block_n=block_n, out_dtype=torch.float32), added)
    none = moe_kernel.moe_experts(r["x"], torch.zeros(0, dtype=torch.int64), torch.zeros(0), [0], [], fmt, gate,
                                  out_dtype=dtype)
    assert none.dtype == dtype and torch.equal(none, torch.zeros(6, H, dtype=dtype))


def test_a_table_serves_any_selection_of_its_experts():
    block_n = min(moe_kernel.block_ns(), default=None)
    if block_n is None:
        pytest.skip("the fused kernel does not run here")
    fmt, gate = parse_format("hqq4"), GateSpec("silu_mul")
    pool = [random_expert(fmt, True, 30 + i, block_n) for i in range(5)]
    table = moe_kernel.ExpertTable(pool, fmt, block_n)
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(3))
    token_of_row, weight_of_row, offsets = routing([2, 4, 1], 4, seed=4)
    chosen = [3, 0, 4]
    got = moe_kernel.moe_experts(x, token_of_row, weight_of_row, offsets, table, fmt, gate, ids=chosen)
    want = moe_kernel.moe_experts(x, token_of_row, weight_of_row, offsets, [pool[e] for e in chosen], fmt, gate,
                                  block_n=block_n)
    assert torch.equal(got, want)


@pytest.mark.parametrize("tokens, top_k", [(1, 8), (3, 2), (8, 4)])
@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16])
def test_from_the_routers_top_k_is_the_routed_rows_result_bit_for_bit(tokens, top_k, weights_dtype):
    from offload_moe.runtime.routing import route_rows

    block_n = min(moe_kernel.block_ns(), default=None)
    if block_n is None:
        pytest.skip("the fused kernel does not run here")
    fmt, gate, num_experts = parse_format("hqq4"), GateSpec("silu_mul"), 40
    pool = [random_expert(fmt, True, 50 + i, block_n) for i in range(6)]
    table = moe_kernel.ExpertTable(pool, fmt, block_n)
    g = torch.Generator().manual_seed(tokens * 10 + top_k)
    x = torch.randn(tokens, H, generator=g).bfloat16()
    index = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)])  # [T, K]
    index[0, -1] = num_experts  # "no expert" (a pair dropped at capacity)
    weights = (torch.rand(tokens, top_k, generator=g) + 0.1).to(weights_dtype)
    experts = sorted({e for e in index.view(-1).tolist() if e < num_experts})
    entries = [(3 * e + 1) % 6 for e in experts]  # any entries of the table (here several experts share one)
    got = moe_kernel.moe_experts_topk(x, index, weights, num_experts, experts, entries, table, gate)
    rows = route_rows(index, weights, num_experts)
    counts = [rows.count(e) for e in experts]
    offsets = [0] + [sum(counts[: i + 1]) for i in range(len(counts))]
    routed = offsets[-1]  # the dropped pair sorts last, in no expert's rows
    want = moe_kernel.moe_experts(x, rows.token_of_row[:routed], rows.weight_of_row[:routed].float(), offsets, table,
                                  fmt, gate, ids=entries)
    assert got.dtype == x.dtype and torch.equal(got, want)
    unused = next(e for e in range(num_experts) if e not in experts)
    extra = moe_kernel.moe_experts_topk(x, index, weights, num_experts, experts + [unused], entries + [0], table,
                                        gate)  # an expert listed but not routed: unused
    assert torch.equal(extra, want)


def test_from_the_routers_top_k_refuses_ids_it_cannot_place():
    block_n = min(moe_kernel.block_ns(), default=None)
    if block_n is None:
        pytest.skip("the fused kernel does not run here")
    fmt, gate = parse_format("hqq4"), GateSpec("silu_mul")
    table = moe_kernel.ExpertTable([random_expert(fmt, True, 60, block_n)], fmt, block_n)
    x, w = torch.randn(1, H), torch.ones(1, 2)
    call = lambda index, experts, entries: moe_kernel.moe_experts_topk(x, torch.tensor(index), w, 8, experts,
                                                                       entries, table, gate)
    assert call([[2, 8]], [2], [0]).shape == (1, H)  # 8: no expert
    for index, experts, entries in (([[2, 3]], [2], [0]),  # expert 3 routed, not listed
                                    ([[2, 9]], [2], [0]),  # an id past "no expert"
                                    ([[2, -1]], [2], [0]),
                                    ([[2, 8]], [2], [1]),  # an entry outside the table
                                    ([[2, 8]], [2, 11], [0, 0])):  # a listed expert outside 0..7
        with pytest.raises(ValueError, match="moe_experts_topk"):
            call(index, experts, entries)
    with pytest.raises(ValueError, match="top_k_index int64"):
        moe_kernel.moe_experts_topk(x, torch.tensor([[2, 8]], dtype=torch.int32), w, 8, [2], [0], table, gate)


def test_bf16_and_fp16_inputs_are_their_fp32_values():
    block_n = min(moe_kernel.block_ns(), default=None)
    if block_n is None:
        pytest.skip("the fused kernel does not run here")
    fmt, gate = parse_format("hqq4"), GateSpec("silu_mul")
    x = torch.randn(5, H).bfloat16()
    for dtype in (torch.bfloat16, torch.float16):
        low = run_layer(fmt, gate, block_n, [5, 2], x=x.to(dtype))
        full = run_layer(fmt, gate, block_n, [5, 2], x=x.to(dtype).float())
        assert torch.equal(low["out"], full["out"])


@pytest.mark.parametrize("name", ["hqq4", "hqq2"])
def test_matches_the_per_expert_linear_path(name):
    """Against today's path (quant.matmul.linear per matrix) within its own int8-vs-bf16 tolerance."""
    block_n = cpu_int4_block_n()
    if block_n not in moe_kernel.block_ns():
        pytest.skip("the fused kernel does not run on this machine's layout")
    fmt, gate = parse_format(name), GateSpec("silu_mul")
    r = run_layer(fmt, gate, block_n, [1, 3, 40])
    want = torch.zeros_like(r["out"])
    for e, expert in enumerate(r["experts"]):
        lo, hi = r["offsets"][e], r["offsets"][e + 1]
        idx = r["token_of_row"][lo:hi].long()
        h = linear(r["x"][idx], matrix_fields(expert, "gate_up"), fmt)
        y = linear(gate_reference(gate, h), matrix_fields(expert, "down"), fmt) * r["weight_of_row"][lo:hi, None]
        want.index_put_((idx,), y, accumulate=True)
    assert ((r["out"] - want).norm() / want.norm()).item() < 2e-2


def test_bad_inputs_name_the_field():
    block_n = min(moe_kernel.block_ns(), default=None)
    if block_n is None:
        pytest.skip("the fused kernel does not run here")
    fmt, gate = parse_format("hqq4"), GateSpec("silu_mul")
    experts = [random_expert(fmt, True, 1, block_n)]
    x, out = torch.randn(2, H), torch.zeros(2, H)
    rows, weights = torch.tensor([0, 1]), torch.ones(2)

    def call(**change):
        args = dict(x=x, token_of_row=rows, weight_of_row=weights, offsets=[0, 2], experts=experts, fmt=fmt,
                    gate=gate, out=out, block_n=block_n)
        args.update(change)
        moe_kernel.moe_experts(**args)

    bad = {
        "token_of_row": dict(token_of_row=rows.int()),
        "weight_of_row": dict(weight_of_row=weights.double()),
        "offsets": dict(offsets=[0, 1]),
        "out": dict(out=out.bfloat16()),
        "rows_out": dict(rows_out=torch.zeros(3, H)),
        "gate_out": dict(gate_out=torch.zeros(2, 2 * FF)),
        "'gate_up.qweight'": dict(experts=[{**experts[0], "gate_up.qweight": experts[0]["gate_up.qweight"][:64]}]),
        "'down.scales_and_zeros'": dict(experts=[{k: v for k, v in experts[0].items() if k != "down.scales_and_zeros"}]),
        "'down_bias'": dict(experts=[{**experts[0], "down_bias": torch.zeros(H + 1)}]),
        "x must": dict(x=torch.randn(2, H).double()),
        "block_n": dict(block_n=16),
    }
    for field, change in bad.items():
        with pytest.raises(ValueError, match=field.replace("[", r"\[")):
            call(**change)
    with pytest.raises(ValueError, match="whole blocks"):  # gate_up rows not a whole number of row blocks
        odd = {**experts[0], "gate_up.qweight": experts[0]["gate_up.qweight"][:-16],
               "gate_up.scales_and_zeros": experts[0]["gate_up.scales_and_zeros"][:, :-16]}
        call(experts=[odd])
    with pytest.raises(ValueError, match=r"tokens within 0\.\.1"):
        call(token_of_row=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="offsets .* must rise"):
        call(offsets=[0, 3, 2], experts=experts * 2)
    table = moe_kernel.ExpertTable(experts * 2, fmt, block_n)
    with pytest.raises(ValueError, match="a table of 2"):
        call(experts=table, ids=[0, 2], offsets=[0, 1, 2])
    with pytest.raises(ValueError, match="a table of 2"):
        call(experts=table, ids=[0], offsets=[0, 1, 2])
    with pytest.raises(ValueError, match="not both"):
        call(rows_out=torch.zeros(2, H))
    with pytest.raises(ValueError, match="kind"):
        GateSpec("swish")


def test_combine_rows_is_the_row_order_sum():
    if not moe_kernel.block_ns():
        pytest.skip("the fused kernel does not run here")
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(50, 100, generator=gen)
    tokens = torch.randint(0, 7, (50,), generator=gen)
    out = torch.randn(7, 100, generator=gen)
    want = out.clone()
    for r, t in enumerate(tokens.tolist()):
        want[t] += rows[r]
    moe_kernel.combine_rows(rows, tokens, out)
    assert torch.equal(out, want)
    with pytest.raises(ValueError, match="rows"):
        moe_kernel.combine_rows(rows.double(), tokens, out)


# ---------------------------------------------------------------------------------------------
# gates: recognised, and checked against the model's own


@pytest.mark.parametrize("kind", GATE_KINDS)
def test_gate_matches_its_reference_and_not_another(kind):
    if moe_kernel.load_kernel() is None:
        pytest.skip("the fused kernel does not run here")
    gate = GateSpec(kind, alpha=1.702, limit=7.0) if kind == "swiglu_oai" else GateSpec(kind)
    assert moe_kernel.gate_matches(gate, lambda h: gate_reference(gate, h))
    others = {"silu_mul": "gelu_mul", "gelu_tanh_mul": "silu_mul", "gelu_mul": "gelu_tanh_mul", "relu": "gelu",
              "gelu": "gelu_tanh", "gelu_tanh": "relu"}  # gelu and its tanh form differ by ~1e-3: told apart
    other = GateSpec(kind, alpha=1.0, limit=7.0) if kind == "swiglu_oai" else GateSpec(others[kind])
    assert not moe_kernel.gate_matches(other, lambda h: gate_reference(gate, h))
    assert not moe_kernel.gate_matches(gate, lambda h: h[:, :1])  # wrong shape


def _spec(kind: ExpertsKind) -> ArchSpec:
    return ArchSpec(model_type="test", kind=kind, num_experts=2, hidden=64, intermediate=32, top_k=1, layers=())


def test_gate_spec_of_real_experts_modules():
    """The activations transformers builds (ACT2FN) and gpt-oss's own gate, recognised and verified."""
    from transformers import GptOssConfig, MixtralConfig
    from transformers.activations import ACT2FN
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    if moe_kernel.load_kernel() is None:
        pytest.skip("the fused kernel does not run here")
    experts = MixtralExperts(MixtralConfig(hidden_size=64, intermediate_size=32, num_local_experts=2))
    expected = {"silu": "silu_mul", "gelu": "gelu_mul", "gelu_pytorch_tanh": "gelu_tanh_mul",
                "gelu_new": "gelu_tanh_mul", "relu": "relu_mul", "quick_gelu": None}
    for act, kind in expected.items():
        experts.act_fn = ACT2FN[act]
        spec = gate_spec(_spec(ExpertsKind.FUSED), experts)
        if kind is None or kind == "relu_mul":  # relu gated is not a GateSpec kind; quick_gelu unknown
            assert spec is None
            continue
        assert spec == GateSpec(kind)
        assert moe_kernel.gate_matches(spec, apply_gate_fn(_spec(ExpertsKind.FUSED), experts))
        assert moe_kernel.verified_gate_spec(_spec(ExpertsKind.FUSED), experts) == spec
    oss = GptOssExperts(GptOssConfig(hidden_size=64, intermediate_size=32, num_local_experts=2))
    spec = gate_spec(_spec(ExpertsKind.TRANSPOSED), oss)
    assert spec == GateSpec("swiglu_oai", oss.alpha, oss.limit)
    assert moe_kernel.gate_matches(spec, apply_gate_fn(_spec(ExpertsKind.TRANSPOSED), oss))
    assert not moe_kernel.gate_matches(GateSpec("swiglu_oai", oss.alpha, oss.limit / 2), oss._apply_gate)
    oss.limit = 1.0  # the spec follows the module's own parameters
    assert moe_kernel.verified_gate_spec(_spec(ExpertsKind.TRANSPOSED), oss) == GateSpec("swiglu_oai", oss.alpha, 1.0)
    experts.act_fn = ACT2FN["silu"]
    experts.act_fn.forward = torch.tanh  # a SiLUActivation whose forward was replaced
    assert gate_spec(_spec(ExpertsKind.FUSED), experts) == GateSpec("silu_mul")
    assert moe_kernel.verified_gate_spec(_spec(ExpertsKind.FUSED), experts) is None


def test_available():
    gate, hqq4 = GateSpec("silu_mul"), parse_format("hqq4")
    for block_n in moe_kernel.block_ns():
        for name in ("hqq4", "hqq3", "hqq2g64", "hqq2"):
            assert moe_kernel.available(parse_format(name), block_n, gate)
        assert not moe_kernel.available(parse_format("nf4"), block_n, gate)
        assert not moe_kernel.available(parse_format("bf16"), block_n, gate)
        assert not moe_kernel.available(hqq4, block_n, None)
    assert not moe_kernel.available(hqq4, None, gate)
    assert not moe_kernel.available(hqq4, 16, gate)


def test_environment_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "torch")
    for block_n in (64, 32):
        assert not moe_kernel.available(parse_format("hqq4"), block_n, GateSpec("silu_mul"))


# ---------------------------------------------------------------------------------------------
# the measured threshold and its cache


def test_calibration_cache_written_once_reused_and_rewritten_when_corrupt(tmp_path, monkeypatch):
    """native.cached_measurement, as tile_threshold uses it (dense_switch's entries: test_dense_kernel)."""
    monkeypatch.setenv("OFFLOAD_MOE_CACHE", str(tmp_path))
    path = tmp_path / "kernels" / moe_kernel.CALIBRATION_FILE
    calls = []

    def measure():
        calls.append(1)
        return 3

    def cached(key, measure):
        return native.cached_measurement(moe_kernel.CALIBRATION_FILE, key, measure, native.count_entry)

    assert cached("key-a", measure) == 3
    assert json.loads(path.read_text()) == {"key-a": 3}
    assert cached("key-a", measure) == 3 and len(calls) == 1  # reused
    assert cached("key-b", lambda: 5) == 5  # another build/CPU: its own entry
    assert json.loads(path.read_text()) == {"key-a": 3, "key-b": 5}
    for corrupt in ("{not json", "[1, 2]", json.dumps({"key-a": "three"}), json.dumps({"key-a": 0})):
        path.write_text(corrupt)
        assert cached("key-a", measure) == 3
        assert json.loads(path.read_text())["key-a"] == 3
    assert len(calls) == 5
    assert not list(path.parent.glob("*.tmp"))  # written through a temporary file, renamed
    with pytest.raises(ValueError, match="invalid entry 0"):
        cached("key-c", lambda: 0)


def test_measured_threshold_is_cached_next_to_the_kernel(tmp_path, monkeypatch):
    if not moe_kernel.block_ns():
        pytest.skip("the fused kernel does not run here")
    monkeypatch.setenv("OFFLOAD_MOE_CACHE", str(tmp_path))
    moe_kernel.tile_threshold.cache_clear()
    try:
        block_n = max(moe_kernel.block_ns())
        value = moe_kernel.tile_threshold(block_n)
        entries = json.loads((native.kernel_dir() / moe_kernel.CALIBRATION_FILE).read_text())
        (key, stored), = entries.items()
        assert stored == value >= 1 and native.cpu_model() in key and f"block_n={block_n}" in key
    finally:
        moe_kernel.tile_threshold.cache_clear()


def test_avx2_layout_by_default_under_aten_avx2():
    """With torch's AVX2 mode the store's layout is BLOCK_N 32, and the kernel takes it by default."""
    if 32 not in moe_kernel.block_ns():
        pytest.skip("no AVX2 variant here")
    script = (
        "import torch\n"
        "from offload_moe.quant import moe_kernel\n"
        "from offload_moe.quant.int4_layout import cpu_int4_block_n\n"
        "import tests.test_moe_kernel as t\n"
        "assert cpu_int4_block_n() == 32, cpu_int4_block_n()\n"
        "fmt, gate = t.parse_format('hqq2'), t.GateSpec('silu_mul')\n"
        "r = t.run_layer(fmt, gate, 32, [1, 9])\n"
        "out = torch.zeros_like(r['out'])\n"
        "moe_kernel.moe_experts(r['x'], r['token_of_row'], r['weight_of_row'], r['offsets'], r['experts'], fmt,"
        " gate, out)\n"
        "assert torch.equal(out, r['out'])\n"
        "t.check_against_definition(fmt, gate, 32, r)\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
