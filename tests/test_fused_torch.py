"""The fused device path (runtime.fused_torch) on the CPU: the same numbers as the per-expert CPU
path, and a number of torch ops that does not grow with the number of experts, with no sync."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from offload_moe.errors import ConfigError
from offload_moe.model.arch import ExpertsKind, gated
from offload_moe.op_counter import count_ops
from offload_moe.quant.batched_dequant import dequantize_int4_experts, dequantize_nf4_experts
from offload_moe.quant.formats import parse_format
from offload_moe.quant.int4_layout import cpu_int4_block_n, dequantize_cpu_blocks
from offload_moe.quant.matmul import expert_fields, nf4_byte_table, prepare_expert_for_cpu
from offload_moe.quant.quantize import dequantize, pack, quantize, unpack
from offload_moe.runtime.expert_compute import expert_forward
from offload_moe.runtime.fused_torch import DequantTile, experts_from_slots, tile_bytes
from offload_moe.runtime.routing import route_rows
from offload_moe.runtime.store import ExpertLayout

H, F_ = 128, 128  # every matrix whole blocks of 64 and 32 rows
GATE = gated(F.silu)
CPU = torch.device("cpu")
AFFINE = ["hqq4", "hqq3", "hqq2", "hqq2g64"]


def random_experts(num: int, gated_: bool = True, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    up_rows = 2 * F_ if gated_ else F_
    return [{"gate_up": torch.randn(up_rows, H, generator=gen) * 0.05, "down": torch.randn(H, F_, generator=gen) * 0.05,
             "gate_up_bias": torch.randn(up_rows, generator=gen) * 0.1, "down_bias": torch.randn(H, generator=gen) * 0.1}
            for _ in range(num)]


def build_pool(fmt_name: str, experts: list[dict], block_n: int | None, dtype=torch.bfloat16, gated_=True,
               bias=False) -> tuple[ExpertLayout, torch.Tensor]:
    """A SlotPool-like buffer [num, nbytes] holding `experts` in the store's layout (slot e = expert e)."""
    fmt = parse_format(fmt_name)
    up_rows = 2 * F_ if gated_ else F_
    biases = [("gate_up_bias", (up_rows,), dtype), ("down_bias", (H,), dtype)] if bias else []
    layout = ExpertLayout(expert_fields(fmt, H, F_, gated=gated_) + biases)
    pool = torch.zeros(len(experts), layout.nbytes, dtype=torch.uint8)
    for e, w in enumerate(experts):
        views = layout.views(pool[e])
        if fmt.quantized:
            canon = {f"{m}.{k}": v for m in ("gate_up", "down") for k, v in pack(quantize(w[m], fmt, optimize=False)).items()}
            prepare_expert_for_cpu(canon, fmt, H, F_, dest=views, block_n=block_n, gated=gated_)
        else:
            for m in ("gate_up", "down"):
                views[m].copy_(w[m])
        for name in ("gate_up_bias", "down_bias") if bias else ():
            views[name].copy_(w[name])
    return layout, pool


def routed(tokens: int, num_experts: int, k: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(tokens)])
    return route_rows(idx, torch.rand(tokens, k, generator=gen), num_experts)


def run_fused(routing, hidden, layout, pool, fmt_name, tile, gate=GATE, kind=ExpertsKind.FUSED):
    needed = routing.needed()
    rows = slice(routing.starts[needed[0]], routing.starts[needed[-1] + 1])
    return experts_from_slots(hidden, routing.token_of_row[rows], routing.weight_of_row[rows],
                              [routing.count(e) for e in needed], torch.tensor(needed), pool, layout,
                              parse_format(fmt_name), gate, tile, kind=kind)


def per_expert(routing, hidden, layout, pool, fmt_name, gate=GATE, kind=ExpertsKind.FUSED):
    """The reference: expert_compute.expert_forward per expert (the CPU path), weighted."""
    outs = []
    for e in routing.needed():
        rows = routing.rows(e)
        x = hidden[routing.token_of_row[rows]]
        y = expert_forward(x, layout.views(pool[e]), parse_format(fmt_name), gate, kind).to(hidden.dtype)
        outs.append(y * routing.weight_of_row[rows, None])
    return torch.cat(outs)


def relative_rows(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    return (got.float() - want.float()).norm(dim=-1) / want.float().norm(dim=-1)


@pytest.mark.parametrize("fmt", AFFINE + ["nf4", "bf16"])
@pytest.mark.parametrize("tokens", [3, 80])  # few rows per expert (padded bmm) and many (per-expert mm)
def test_fused_matches_the_per_expert_cpu_path(fmt, tokens):
    experts = random_experts(6)
    layout, pool = build_pool(fmt, experts, cpu_int4_block_n())
    tile = DequantTile.allocate(parse_format(fmt), H, F_, True, 4, torch.bfloat16, CPU)
    routing = routed(tokens, 6)
    hidden = torch.randn(tokens, H).bfloat16()
    got = run_fused(routing, hidden, layout, pool, fmt, tile)
    want = per_expert(routing, hidden, layout, pool, fmt)
    assert got.shape == want.shape == (2 * tokens, H)
    rel = relative_rows(got, want)
    # The CPU kernel rounds activations to int8 (blocks of 32); both round weights and outputs to bf16.
    assert rel.max() < (1e-6 if fmt == "bf16" else 0.04), f"{fmt}: max relative error {rel.max():.4f}"


@pytest.mark.parametrize("fmt", AFFINE)
@pytest.mark.parametrize("block_n", [32, 64])  # both CPU layouts (AVX2, AVX-512), on any host
def test_int4_experts_dequantize_as_the_cpu_layout_reads_back(fmt, block_n):
    experts = random_experts(3)
    layout, pool = build_pool(fmt, experts, block_n)
    f = parse_format(fmt)
    views = [layout.views(pool[e]) for e in range(3)]
    for m, (out_f, in_f) in (("gate_up", (2 * F_, H)), ("down", (H, F_))):
        q = torch.stack([v[f"{m}.qweight"] for v in views])
        sz = torch.stack([v[f"{m}.scales_and_zeros"] for v in views])
        got = dequantize_int4_experts(q, sz, f, in_f, block_n, torch.empty(3, in_f, out_f))
        for e in range(3):
            want = torch.empty(in_f, out_f)
            dequantize_cpu_blocks(q[e].view(out_f // block_n, -1, block_n // 2), sz[e], f, in_f, want)
            # Z - 8 S is exact in fp32 here, so one rounding either way: equal to a few fp32 ulps
            torch.testing.assert_close(got[e], want, rtol=1e-6, atol=1e-7)


def test_nf4_experts_dequantize_as_the_canonical_format():
    experts = random_experts(2)
    f = parse_format("nf4")
    fields = [pack(quantize(w["down"], f, optimize=False)) for w in experts]
    got = dequantize_nf4_experts(torch.stack([p["qweight"] for p in fields]), torch.stack([p["absmax"] for p in fields]),
                                 nf4_byte_table(CPU), torch.empty(2, H, F_))
    for e in range(2):
        assert torch.equal(got[e], dequantize(unpack(fields[e], f, (H, F_))))


def test_fp32_tile_is_the_cpu_layouts_weights():
    """With an fp32 tile and fp32 activations the only difference to dense fp32 math on the
    layout's own weights is summation order."""
    experts = random_experts(4)
    fmt = parse_format("hqq4")
    layout, pool = build_pool("hqq4", experts, 32)
    tile = DequantTile.allocate(fmt, H, F_, True, 2, torch.float32, CPU, block_n=32)
    routing = routed(5, 4)
    hidden = torch.randn(5, H)
    got = run_fused(routing, hidden, layout, pool, "hqq4", tile)  # 4 experts through a 2-expert tile: 2 chunks
    want = []
    for e in routing.needed():
        w = {}
        for m, (out_f, in_f) in (("gate_up", (2 * F_, H)), ("down", (H, F_))):
            wt = torch.empty(in_f, out_f)
            v = layout.views(pool[e])
            dequantize_cpu_blocks(v[f"{m}.qweight"].view(out_f // 32, -1, 16), v[f"{m}.scales_and_zeros"], fmt, in_f, wt)
            w[m] = wt
        rows = routing.rows(e)
        x = hidden[routing.token_of_row[rows]]
        want.append(GATE(x @ w["gate_up"]) @ w["down"] * routing.weight_of_row[rows, None])
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens", [3, 80])
def test_biases_and_non_gated_experts(tokens):
    """Quantized experts with biases (gpt-oss, NLLB-MoE) and non-gated ones (Switch)."""
    experts = random_experts(5, gated_=False)
    layout, pool = build_pool("hqq4", experts, cpu_int4_block_n(), gated_=False, bias=True)
    tile = DequantTile.allocate(parse_format("hqq4"), H, F_, False, 2, torch.bfloat16, CPU)
    routing = routed(tokens, 5)
    hidden = torch.randn(tokens, H).bfloat16()
    act = F.gelu
    got = run_fused(routing, hidden, layout, pool, "hqq4", tile, gate=act)
    want = per_expert(routing, hidden, layout, pool, "hqq4", gate=act)
    assert relative_rows(got, want).max() < 0.04


@pytest.mark.parametrize("kind", [ExpertsKind.TRANSPOSED, ExpertsKind.DBRX])
def test_unquantized_transposed_fields(kind):
    """Unquantized experts held [in, out] (gpt-oss: both matrices; DBRX: down) are read as such."""
    experts = random_experts(3)
    transposed = {"gate_up": kind is ExpertsKind.TRANSPOSED, "down": True}
    layout = ExpertLayout([(m, (w.shape[::-1] if transposed[m] else w.shape), torch.float32)
                           for m, w in experts[0].items() if not m.endswith("_bias")])
    pool = torch.zeros(3, layout.nbytes, dtype=torch.uint8)
    for e, w in enumerate(experts):
        for m in ("gate_up", "down"):
            layout.views(pool[e])[m].copy_(w[m].t() if transposed[m] else w[m])
    tile = DequantTile.allocate(parse_format("fp32"), H, F_, True, 3, torch.float32, CPU)
    routing = routed(4, 3)
    hidden = torch.randn(4, H)
    got = run_fused(routing, hidden, layout, pool, "fp32", tile, kind=kind)
    want = torch.cat([GATE(hidden[routing.token_of_row[routing.rows(e)]] @ experts[e]["gate_up"].t())
                      @ experts[e]["down"].t() * routing.weight_of_row[routing.rows(e), None] for e in routing.needed()])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["hqq4", "hqq2", "nf4", "bf16"])
def test_launches_do_not_grow_with_experts_and_nothing_syncs(fmt):
    """Decode-like groups (1 row per expert) of 2, 8 and 32 experts: the same ops, no sync."""
    experts = random_experts(32)
    layout, pool = build_pool(fmt, experts, 64)
    tile = DequantTile.allocate(parse_format(fmt), H, F_, True, 32, torch.bfloat16, CPU, block_n=64)
    launches = {}
    for n in (2, 8, 32):
        routing = route_rows(torch.arange(n).view(n // 2, 2), torch.rand(n // 2, 2), 32)
        hidden = torch.randn(n // 2, H).bfloat16()
        with count_ops() as counts:
            run_fused(routing, hidden, layout, pool, fmt, tile)
        assert counts.syncs == 0, counts.synced
        launches[n] = counts.launches
    assert launches[2] == launches[8] == launches[32], launches


def test_op_counter_names_the_syncs():
    x = torch.randn(4, 3)
    with count_ops() as counts:
        y = x @ x.t()
        y[y > 0]  # boolean mask: nonzero
        y.sum().item()
        y.tolist()
        torch.zeros(4).index_put_((torch.tensor([0, 0]),), torch.ones(2), accumulate=True)
        torch.bincount(torch.tensor([1, 2]))
        y.to("cpu")
    assert set(counts.synced) == {"index", "item", "tolist", "index_put_", "bincount", "to"}
    assert counts.syncs == 6 and counts.launched["mm"] == 1


def test_tile_refuses_an_unreadable_layout_and_sizes_itself():
    with pytest.raises(ConfigError, match="hqq2.*whole blocks of 64"):
        DequantTile.allocate(parse_format("hqq2"), 48, 64, True, 2, torch.bfloat16, CPU, block_n=64)
    with pytest.raises(ConfigError, match="capacity=0"):
        DequantTile.allocate(parse_format("hqq4"), H, F_, True, 0, torch.bfloat16, CPU)
    tile = DequantTile.allocate(parse_format("hqq4"), H, F_, True, 3, torch.bfloat16, CPU)
    assert tile.nbytes == tile_bytes(H, F_, True, 3, torch.bfloat16) == 3 * 2 * F_ * H * 2
