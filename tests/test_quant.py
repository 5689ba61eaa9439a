"""quant (quantize/dequantize/pack) and qkernels (int4 kernel re-layout and matmuls), on small matrices."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from offload_moe.errors import ConfigError
from offload_moe.quant.quantize import NF4_CODEBOOK, QTensor, dequantize, pack, packed_fields, quantize, unpack
from offload_moe.quant.formats import FORMATS, parse_format
from offload_moe.quant.int4_layout import (
    _relayout_codes_cpu,
    code_offset,
    cpu_int4_block_n,
    expand_groups,
    prepare_for_cpu,
    prepared_fields,
)
from offload_moe.runtime.expert_compute import dense_expert_forward, expert_forward
from offload_moe.model.arch import gated
from offload_moe.quant.matmul import dequant_linear, expert_fields, int4_cpu_linear, linear, prepare_expert_for_cpu
from offload_moe.runtime.store import ExpertLayout
from offload_moe.quant.formats import FormatKind

OUT, IN = 256, 512
QUANTIZED = [name for name, fmt in FORMATS.items() if fmt.quantized]
AFFINE = [name for name, fmt in FORMATS.items() if fmt.kind is FormatKind.AFFINE]
HAS_HQQ = importlib.util.find_spec("hqq") is not None
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None

# relative RMS error of round-to-nearest on Gaussian weights, with some slack
RTN_ERROR_BOUND = {"hqq4": 0.11, "hqq3": 0.23, "hqq2": 0.38, "hqq2g64": 0.52, "nf4": 0.11, "bf16": 0.005, "fp16": 0.001, "fp32": 1e-6}


def weights(out: int = OUT, inp: int = IN, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=gen) * 0.02


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()


def on_grid(name: str, seed: int = 0) -> tuple[torch.Tensor, QTensor]:
    """Weights exactly representable in `name`: w = (q - zero) * scale, codes 0 and max in every group."""
    fmt = parse_format(name)
    gen = torch.Generator().manual_seed(seed)
    groups = IN // fmt.group_size
    codes = torch.randint(0, fmt.max_code + 1, (OUT, groups, fmt.group_size), generator=gen, dtype=torch.uint8)
    codes[..., 0], codes[..., 1] = 0, fmt.max_code
    scale = (torch.rand(OUT, groups, 1, generator=gen) * 9e-3 + 1e-3).half()
    zero = (torch.rand(OUT, groups, 1, generator=gen) * fmt.max_code).half()
    w = (codes.float() - zero.float()) * scale.float()
    qt = QTensor(fmt, (OUT, IN), codes.reshape(OUT, IN), scale.reshape(OUT, groups), zero.reshape(OUT, groups))
    return w.reshape(OUT, IN), qt


# ---------------------------------------------------------------------------------------------
# formats


def test_parse_format_names_and_errors():
    assert parse_format("HQQ4") is FORMATS["hqq4"]
    assert parse_format(FORMATS["nf4"]) is FORMATS["nf4"]
    with pytest.raises(ConfigError, match=r"'int3'.*hqq4.*nf4.*bf16"):
        parse_format("int3")


def test_bad_format_name_in_every_entry_point():
    w = weights()
    for call in (
        lambda: quantize(w, "q4", optimize=False),
        lambda: packed_fields("q4", OUT, IN),
        lambda: prepared_fields("q4", OUT, IN),
        lambda: expert_fields("q4", 64, 128),
    ):
        with pytest.raises(ConfigError, match="'q4'"):
            call()


def test_shape_the_format_cannot_hold_is_a_config_error():
    with pytest.raises(ConfigError, match="multiple of 64"):
        quantize(torch.randn(8, 96), "hqq4", optimize=False)
    with pytest.raises(ConfigError, match="2-D"):
        quantize(torch.randn(8), "hqq4", optimize=False)


def test_bits_per_weight():
    assert FORMATS["hqq4"].bits_per_weight == 4.5
    assert FORMATS["hqq2g64"].bits_per_weight == 2.5
    assert FORMATS["nf4"].bits_per_weight == 4.5


# ---------------------------------------------------------------------------------------------
# quantize / dequantize / pack


@pytest.mark.parametrize("name", list(FORMATS))
def test_round_trip_error_bound(name):
    w = weights()
    qt = quantize(w, name, optimize=False)
    assert rel_rms(dequantize(qt), w) < RTN_ERROR_BOUND[name]


@pytest.mark.parametrize("name", AFFINE)
def test_round_trip_error_per_weight_at_most_half_a_step(name):
    w = weights()
    qt = quantize(w, name, optimize=False)
    step = qt.scale.float().repeat_interleave(parse_format(name).group_size, dim=1)
    assert ((dequantize(qt) - w).abs() <= 0.5 * step * 1.01 + 1e-7).all()


@pytest.mark.parametrize("name", AFFINE)
def test_weights_on_the_grid_round_trip_exactly(name):
    w, expected = on_grid(name)
    qt = quantize(w, name, optimize=False)
    assert torch.equal(qt.codes, expected.codes)
    assert torch.equal(qt.scale, expected.scale)
    assert torch.equal(qt.zero, expected.zero)
    assert torch.equal(dequantize(qt), w)


def test_nf4_weights_on_the_codebook_round_trip_exactly():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (OUT, IN // 64, 64), generator=gen)
    codes[..., 0] = 15  # absmax = 1 * scale in every block
    absmax = torch.rand(OUT, IN // 64, 1, generator=gen) + 0.5
    w = (torch.tensor(NF4_CODEBOOK)[codes] * absmax).reshape(OUT, IN)
    qt = quantize(w, "nf4", optimize=False)
    assert torch.equal(qt.codes.long(), codes.reshape(OUT, IN))
    assert torch.equal(dequantize(qt), w)


@pytest.mark.parametrize("name", list(FORMATS))
def test_pack_unpack_identity_and_fields(name):
    qt = quantize(weights(), name, optimize=False)
    packed = pack(qt)
    assert [(k, tuple(v.shape), v.dtype) for k, v in packed.items()] == packed_fields(name, OUT, IN)
    back = unpack(packed, name, (OUT, IN))
    assert torch.equal(back.codes, qt.codes)
    for attr in ("scale", "zero"):
        a, b = getattr(back, attr), getattr(qt, attr)
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(dequantize(back), dequantize(qt))


@pytest.mark.parametrize("name", QUANTIZED)
def test_packed_fields_fit_an_expert_layout(name):
    layout = ExpertLayout(packed_fields(name, OUT, IN))
    buffer = torch.zeros(layout.nbytes, dtype=torch.uint8)
    views = layout.views(buffer)
    packed = pack(quantize(weights(), name, optimize=False))
    for key, tensor in packed.items():
        views[key].copy_(tensor)
    assert torch.equal(dequantize(unpack(views, name, (OUT, IN))), dequantize(unpack(packed, name, (OUT, IN))))


def test_three_bit_packing_is_eight_codes_in_three_bytes():
    codes = torch.arange(8, dtype=torch.uint8).repeat(OUT, IN // 8)
    qt = QTensor(FORMATS["hqq3"], (OUT, IN), codes, torch.ones(OUT, IN // 64).half(), torch.zeros(OUT, IN // 64).half())
    qweight = pack(qt)["qweight"]
    assert qweight.shape == (OUT, IN * 3 // 8)
    word = sum(i << (3 * i) for i in range(8))  # little-endian 24-bit word
    assert qweight[0, :3].tolist() == [word & 0xFF, (word >> 8) & 0xFF, word >> 16]


# ---------------------------------------------------------------------------------------------
# HQQ optimiser and bitsandbytes cross-checks


@pytest.mark.skipif(not HAS_HQQ, reason="hqq not installed")
@pytest.mark.parametrize("name", AFFINE)
def test_hqq_optimised_error_not_worse_than_rtn(name):
    w = weights(seed=3)
    rtn = rel_rms(dequantize(quantize(w, name, optimize=False)), w)
    hqq = rel_rms(dequantize(quantize(w, name, optimize=True)), w)
    assert hqq <= rtn * 1.001, (hqq, rtn)


def test_optimize_without_hqq_says_how_to_fix(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_hqq(name, *args, **kwargs):
        if name.startswith("hqq"):
            raise ImportError("No module named 'hqq'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hqq)
    with pytest.raises(ConfigError, match=r"pip install hqq.*optimize=False"):
        quantize(weights(), "hqq4", optimize=True)
    quantize(weights(), "hqq4", optimize=False)  # RTN needs nothing
    quantize(weights(), "nf4", optimize=True)  # nothing to optimise: flag ignored


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_nf4_matches_bitsandbytes():
    import bitsandbytes.functional as bnbf

    w = weights(seed=5)
    ours = quantize(w, "nf4", optimize=False)
    theirs, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(state.absmax.reshape(OUT, -1), ours.scale)
    assert torch.allclose(torch.tensor(NF4_CODEBOOK), state.code.cpu().float())
    # bitsandbytes puts the first code of a byte in the high nibble, as we do for nf4
    bnb_codes = torch.stack([theirs.flatten() >> 4, theirs.flatten() & 0x0F], dim=-1).reshape(OUT, IN)
    assert (bnb_codes == ours.codes).float().mean() > 0.999  # ties at midpoints may differ
    # our packed bytes are bitsandbytes' layout: its dequantize reads them as they are
    packed = pack(ours)
    assert torch.equal(bnbf.dequantize_4bit(packed["qweight"].reshape(-1, 1), state), dequantize(ours))
    assert (packed["qweight"].flatten() == theirs.flatten()).float().mean() > 0.999


# ---------------------------------------------------------------------------------------------
# int4 kernel path


def slot_codes(qt: QTensor) -> torch.Tensor:
    codes = qt.codes + code_offset(qt.fmt.bits)
    return expand_groups(codes, 16) if qt.fmt.group_size == 16 else codes


def weight_from_prepared(qt: QTensor, prepared: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 reconstruction with torch's convention from our codes and the prepared S, Z."""
    sz = prepared["scales_and_zeros"].float()  # [groups, out, 2]
    group = qt.fmt.group_size
    s = sz[..., 0].t().repeat_interleave(group, dim=1)
    z = sz[..., 1].t().repeat_interleave(group, dim=1)
    return (qt.codes.float() + code_offset(qt.fmt.bits) - 8) * s + z


@pytest.mark.parametrize("name", AFFINE)
def test_relayout_equals_torch_packing_op(name):
    qt = quantize(weights(), name, optimize=False)
    prepared = prepare_for_cpu(pack(qt), name, OUT, IN)
    assert [(k, tuple(v.shape), v.dtype) for k, v in prepared.items()] == prepared_fields(name, OUT, IN)
    expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(slot_codes(qt).to(torch.int32), 2)
    assert torch.equal(prepared["qweight"], expected)


@pytest.mark.parametrize("name", AFFINE)
def test_fallback_relayout_equals_fast_relayout(name):
    """block_n=None (layout not recognised) calls torch's packing op on the whole matrix."""
    qt = quantize(weights(), name, optimize=False)
    fast = prepare_for_cpu(pack(qt), name, OUT, IN)["qweight"]
    slow = torch.empty_like(fast)
    _relayout_codes_cpu(pack(qt)["qweight"], parse_format(name), OUT, IN, slow, block_n=None)
    assert torch.equal(fast, slow)


def test_this_machine_layout_is_recognised():
    assert cpu_int4_block_n() in (32, 64)


def test_relayout_rows_not_a_multiple_of_block_n():
    qt = quantize(weights(out=80), "hqq4", optimize=False)  # 80 = 64 + 16: a tail block
    prepared = prepare_for_cpu(pack(qt), "hqq4", 80, IN)
    expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qt.codes.to(torch.int32), 2)
    assert torch.equal(prepared["qweight"], expected)


@pytest.mark.parametrize("name", AFFINE)
def test_scales_and_zeros_mapping_is_exact_on_representable_values(name):
    """Integer-valued inputs, power-of-two scales, integer zeros: every step of torch's int4 kernel
    is exact in bf16. offload_moe's own kernel (the default `linear` here) scales the inputs by
    1/127 to int8 and back, which is not exact in fp32: within a few fp32 roundings."""
    fmt = parse_format(name)
    gen = torch.Generator().manual_seed(1)
    groups = IN // fmt.group_size
    codes = torch.randint(0, fmt.max_code + 1, (OUT, IN), generator=gen, dtype=torch.uint8)
    scale = torch.full((OUT, groups), 0.25).half()
    zero = torch.randint(0, fmt.max_code + 1, (OUT, groups), generator=gen).half()
    qt = QTensor(fmt, (OUT, IN), codes, scale, zero)
    x = torch.zeros(4, IN)
    x[:, torch.randperm(IN, generator=gen)[:12]] = torch.randint(-1, 2, (4, 12), generator=gen).float()
    prepared = prepare_for_cpu(pack(qt), fmt, OUT, IN)
    want = x @ dequantize(qt).t()
    assert torch.equal(int4_cpu_linear(x, prepared, fmt), want)
    y = linear(x, prepared, fmt)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", AFFINE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_equals_dequantize_then_matmul(name, dtype):
    qt = quantize(weights(), name, optimize=HAS_HQQ)
    prepared = prepare_for_cpu(pack(qt), name, OUT, IN)
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(2)).to(dtype)
    y = int4_cpu_linear(x, prepared, parse_format(name))  # torch's kernel (test_int4_gemv: our own)
    assert y.dtype == dtype and y.shape == (5, OUT)
    # the kernel computes exactly the prepared weights, up to bf16 rounding of x and y
    reference = x.to(torch.bfloat16).float() @ weight_from_prepared(qt, prepared).t()
    scale = reference.abs().max()
    assert (y.float() - reference).abs().max() <= 4e-3 * scale
    # and the prepared weights are our weights up to bf16 rounding of S and Z (< 0.05 step)
    step = qt.scale.float().repeat_interleave(qt.fmt.group_size, dim=1)
    assert ((weight_from_prepared(qt, prepared) - dequantize(qt)).abs() <= 0.05 * step).all()
    exact = x.float() @ dequantize(qt).t()
    assert (y.float() - exact).abs().max() <= 1e-2 * exact.abs().max()


@pytest.mark.parametrize("name", QUANTIZED)
def test_dequant_linear_equals_reference(name):
    qt = quantize(weights(), name, optimize=False)
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(dequant_linear(x, pack(qt), name), x @ dequantize(qt).t(), rtol=1e-5, atol=1e-6)


def test_linear_with_no_tokens():
    prepared = prepare_for_cpu(pack(quantize(weights(), "hqq4", optimize=False)), "hqq4", OUT, IN)
    assert linear(torch.zeros(0, IN, dtype=torch.bfloat16), prepared, "hqq4").shape == (0, OUT)


def test_prepare_into_preallocated_store_views():
    fmt = "hqq3"
    layout = ExpertLayout(prepared_fields(fmt, OUT, IN))
    views = layout.views(torch.zeros(layout.nbytes, dtype=torch.uint8))
    packed = pack(quantize(weights(), fmt, optimize=False))
    returned = prepare_for_cpu(packed, fmt, OUT, IN, dest=views)
    assert returned is views
    fresh = prepare_for_cpu(packed, fmt, OUT, IN)
    for key in fresh:
        assert torch.equal(views[key], fresh[key])


# ---------------------------------------------------------------------------------------------
# whole experts


@pytest.mark.parametrize("name", ["hqq4", "hqq2", "nf4", "bf16"])
def test_expert_forward_matches_dense_forward_of_dequantized_weights(name):
    hidden, inter = 128, 256
    gen = torch.Generator().manual_seed(6)
    gate_up = torch.randn(2 * inter, hidden, generator=gen) * 0.05
    down = torch.randn(hidden, inter, generator=gen) * 0.05
    fmt = parse_format(name)
    q_gu, q_d = quantize(gate_up, fmt, optimize=False), quantize(down, fmt, optimize=False)

    canonical = ExpertLayout(expert_fields(fmt, hidden, inter, prepared=False))
    stored = canonical.views(torch.zeros(canonical.nbytes, dtype=torch.uint8))
    if fmt.quantized:
        for matrix, qt in (("gate_up", q_gu), ("down", q_d)):
            for key, tensor in pack(qt).items():
                stored[f"{matrix}.{key}"].copy_(tensor)
    else:
        stored["gate_up"].copy_(q_gu.codes)
        stored["down"].copy_(q_d.codes)
    layout = ExpertLayout(expert_fields(fmt, hidden, inter))
    slot = layout.views(torch.zeros(layout.nbytes, dtype=torch.uint8))
    prepare_expert_for_cpu(stored, fmt, hidden, inter, dest=slot)

    x = torch.randn(7, hidden, generator=gen).to(torch.bfloat16)
    y = expert_forward(x, slot, fmt, gated(F.silu))
    dense = {"gate_up": dequantize(q_gu, torch.bfloat16), "down": dequantize(q_d, torch.bfloat16)}
    expected = dense_expert_forward(x, dense, gated(F.silu))
    assert y.dtype == torch.bfloat16 and y.shape == (7, hidden)
    if name == "bf16":
        assert torch.equal(y, expected)
    else:
        assert rel_rms(y, expected) < 0.02
