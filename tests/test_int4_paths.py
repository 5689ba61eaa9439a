"""The int4 layouts read back (int4layout), the prefill path (qkernels) and the CPU-checkable
parts of the CUDA path (qcuda): exact inverses, exact dequantization, path choice."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from offload_moe.errors import ConfigError
from offload_moe.quant import int4_gemv, matmul, native
from offload_moe.quant.int4_layout import (
    _relayout_codes_cpu,
    canonical_qweight_from_cpu,
    code_offset,
    cpu_int4_block_n,
    dequantize_cpu_blocks,
    expand_groups,
    expand_input,
    expanded_groups,
    kernel_codes_from_cpu,
    kernel_group,
    kernel_in_features,
    prepare_for_cpu,
    scales_and_zeros,
)
from offload_moe.quant.cuda_int4 import check_cuda_layout, cuda_input_from_cpu, inner_k_tiles, int4pack_shape, qweight_view
from offload_moe.runtime.fused_torch import fused_layout_problem
from offload_moe.quant.matmul import (
    linear,
    matmul_path,
    prefill_linear,
    prefill_threshold,
)
from offload_moe.quant.quantize import pack, quantize, unpack_codes
from offload_moe.quant.formats import parse_format

OUT, IN = 256, 512
AFFINE = ["hqq4", "hqq3", "hqq2", "hqq2g64"]
BLOCK_N = cpu_int4_block_n()
OWN_KERNEL = int4_gemv.available(BLOCK_N, 32)  # offload_moe's own few-token kernel runs here


def packed(name: str, out: int = OUT, inp: int = IN, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return pack(quantize(torch.randn(out, inp, generator=gen) * 0.02, name, optimize=False))


def slot_codes(fields: dict[str, torch.Tensor], name: str, inp: int = IN) -> torch.Tensor:
    """The int4 kernel's slot codes [out, K'] computed from the canonical packing, independently."""
    fmt = parse_format(name)
    codes = unpack_codes(fields["qweight"], fmt.bits, inp) + code_offset(fmt.bits)
    return expand_groups(codes, fmt.group_size) if fmt.group_size < 32 else codes


def reference_weight(fields: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """fp32 [out, in]: (q - 8) * S + Z with the bf16 S, Z the kernel reads, from canonical fields."""
    fmt = parse_format(name)
    codes = unpack_codes(fields["qweight"], fmt.bits, IN).float() + code_offset(fmt.bits) - 8
    sz = scales_and_zeros(fields["scale"], fields["zero"], fmt.bits).float()  # [G, out, 2]
    s = sz[..., 0].t().repeat_interleave(fmt.group_size, dim=1)
    z = sz[..., 1].t().repeat_interleave(fmt.group_size, dim=1)
    return codes * s + z


# ---------------------------------------------------------------------------------------------
# the CPU layout read back


@pytest.mark.parametrize("block_n", [64, 32])
@pytest.mark.parametrize("name", AFFINE)
def test_cpu_layout_inverse_round_trips_exactly(name, block_n):
    fmt = parse_format(name)
    fields = packed(name)
    prepared = prepare_for_cpu(fields, fmt, OUT, IN, block_n=block_n)
    kernel_in = kernel_in_features(fmt, IN)
    assert torch.equal(kernel_codes_from_cpu(prepared["qweight"], kernel_in, block_n), slot_codes(fields, name))
    back = canonical_qweight_from_cpu(prepared["qweight"], fmt, OUT, IN, block_n)
    assert torch.equal(back, fields["qweight"])  # canonical -> prepared -> canonical, bit for bit
    again = torch.empty_like(prepared["qweight"])
    _relayout_codes_cpu(back, fmt, OUT, IN, again, block_n)
    assert torch.equal(again, prepared["qweight"])  # prepared -> canonical -> prepared, bit for bit


@pytest.mark.skipif(BLOCK_N is None, reason="this CPU's int4 layout is not a known one")
@pytest.mark.parametrize("name", AFFINE)
def test_inverse_of_torchs_own_packing(name):
    """Independent of our re-layout: read back what torch's packing op wrote."""
    fmt = parse_format(name)
    fields = packed(name, seed=3)
    codes = slot_codes(fields, name)
    torch_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
    assert torch.equal(kernel_codes_from_cpu(torch_packed, kernel_in_features(fmt, IN), BLOCK_N), codes)
    # and our re-layout for this CPU's BLOCK_N writes exactly the bytes torch's op writes
    assert torch.equal(prepare_for_cpu(fields, fmt, OUT, IN, block_n=BLOCK_N)["qweight"], torch_packed)


# ---------------------------------------------------------------------------------------------
# dequantization and the prefill path


@pytest.mark.skipif(BLOCK_N is None, reason="this CPU's int4 layout is not a known one")
@pytest.mark.parametrize("name", AFFINE)
def test_dequantized_blocks_are_the_kernels_weights(name):
    fmt = parse_format(name)
    fields = packed(name, seed=1)
    prepared = prepare_for_cpu(fields, fmt, OUT, IN, block_n=BLOCK_N)
    blocks = prepared["qweight"].view(OUT // BLOCK_N, kernel_in_features(fmt, IN), BLOCK_N // 2)
    wt = torch.empty(IN, OUT)
    dequantize_cpu_blocks(blocks, prepared["scales_and_zeros"], fmt, IN, wt)
    assert torch.equal(wt.t(), reference_weight(fields, name))  # fp32: exact
    # the int4 kernel itself, fed the identity, returns its weights W^T (rounded to bf16)
    eye = torch.eye(IN, dtype=torch.bfloat16)
    if expanded_groups(fmt):
        eye = expand_input(eye, fmt.group_size)
    kernel_wt = torch.ops.aten._weight_int4pack_mm_for_cpu(
        eye, prepared["qweight"], kernel_group(fmt), prepared["scales_and_zeros"])
    assert torch.equal(kernel_wt, wt.to(torch.bfloat16))


@pytest.mark.skipif(BLOCK_N is None, reason="this CPU's int4 layout is not a known one")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", AFFINE)
def test_prefill_path_equals_dequantize_then_matmul(name, dtype):
    fmt = parse_format(name)
    fields = packed(name, seed=2)
    prepared = prepare_for_cpu(fields, fmt, OUT, IN, block_n=BLOCK_N)
    threshold = prefill_threshold(fmt, OWN_KERNEL, BLOCK_N)
    x = torch.randn(threshold + 3, IN, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert matmul_path("cpu", x.shape[0], fmt, OUT, BLOCK_N, OWN_KERNEL) == "dequant-cpu"
    got = linear(x, prepared, fmt)
    assert got.dtype == dtype
    want = F.linear(x, reference_weight(fields, name).to(dtype))  # the same weights, the same dtype
    assert torch.equal(prefill_linear(x, prepared, fmt, BLOCK_N), got)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # bf16 matmul: chunked vs whole, accumulation order differs
        assert ((got.float() - want.float()).norm() / want.float().norm()) < 1e-2
    # and it agrees with the few-token kernel (which rounds x to bf16, or to int8 in blocks of 32)
    kernel = linear(x[: threshold - 1], prepared, fmt).float()
    rel = (kernel - got[: threshold - 1].float()).norm() / kernel.norm()
    assert rel < 1e-2


@pytest.mark.skipif(BLOCK_N is None, reason="this CPU's int4 layout is not a known one")
def test_prefill_path_on_odd_chunking():
    """Rows not a multiple of the chunk, tokens above the threshold (not a multiple of 64)."""
    fmt = parse_format("hqq4")
    out = 3 * BLOCK_N
    fields = packed("hqq4", out=out, seed=5)
    prepared = prepare_for_cpu(fields, fmt, out, IN, block_n=BLOCK_N)
    x = torch.randn(prefill_threshold(fmt, OWN_KERNEL, BLOCK_N) + 44, IN)
    assert matmul_path("cpu", x.shape[0], fmt, out, BLOCK_N, OWN_KERNEL) == "dequant-cpu"
    w = (unpack_codes(fields["qweight"], 4, IN).float() - 8)
    sz = scales_and_zeros(fields["scale"], fields["zero"], 4).float()
    w = w * sz[..., 0].t().repeat_interleave(64, 1) + sz[..., 1].t().repeat_interleave(64, 1)
    torch.testing.assert_close(linear(x, prepared, fmt), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_path_choice():
    hqq4, hqq2, hqq2g64 = parse_format("hqq4"), parse_format("hqq2"), parse_format("hqq2g64")
    assert matmul_path("cuda", 1, hqq4, 4096, None) == "int4-cuda"
    assert matmul_path("cuda", 4096, hqq4, 4096, 64) == "int4-cuda"
    assert matmul_path("cuda", 1, hqq4, 4096, 64, cuda_layout=False) == "dequant-cpu"  # an expert slot alone
    assert matmul_path("cpu", 1, hqq4, 4096, 64) == "int4-cpu"
    few, expanded = prefill_threshold(hqq4), prefill_threshold(hqq2)  # torch's kernel, measured here
    assert matmul_path("cpu", few - 1, hqq4, 4096, 64) == "int4-cpu"
    assert matmul_path("cpu", few, hqq4, 4096, 64) == "dequant-cpu"
    assert matmul_path("cpu", expanded, hqq2, 4096, 32) == "dequant-cpu"
    assert matmul_path("cpu", few, hqq2g64, 4096, None) == "int4-cpu"  # layout unreadable
    assert matmul_path("cpu", few, hqq4, 4096 + 16, 64) == "int4-cpu"  # partial block
    # offload_moe's own kernel: thresholds per variant
    for block_n in (64, 32):
        few, expanded = prefill_threshold(hqq4, True, block_n), prefill_threshold(hqq2, True, block_n)
        assert matmul_path("cpu", few - 1, hqq4, 4096, block_n, own_kernel=True) == "int8-cpu"
        assert matmul_path("cpu", few, hqq4, 4096, block_n, own_kernel=True) == "dequant-cpu"
        assert matmul_path("cpu", expanded - 1, hqq2, 4096, block_n, own_kernel=True) == "int8-cpu"
        assert matmul_path("cpu", expanded, hqq2, 4096, block_n, own_kernel=True) == "dequant-cpu"


@pytest.mark.skipif(not OWN_KERNEL, reason="offload_moe's own kernel does not run here")
def test_prefill_threshold_is_measured_once_and_cached_next_to_the_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_MOE_CACHE", str(tmp_path))
    matmul._prefill_threshold.cache_clear()
    try:
        value = prefill_threshold(parse_format("hqq4"), True, BLOCK_N)
        entries = json.loads((native.kernel_dir() / matmul.PREFILL_FILE).read_text())
        (key, stored), = entries.items()
        assert stored == value and matmul._PREFILL_FIT_TOKENS[0] <= value <= matmul._PREFILL_NEVER
        assert f"block_n={BLOCK_N}" in key and "expanded=False" in key
        matmul._prefill_threshold.cache_clear()
        (native.kernel_dir() / matmul.PREFILL_FILE).write_text(json.dumps({key: 1}))
        assert prefill_threshold(parse_format("hqq3"), True, BLOCK_N) == 1  # read back: hqq3 runs as hqq4
    finally:
        matmul._prefill_threshold.cache_clear()


# ---------------------------------------------------------------------------------------------
# the CUDA path's CPU-checkable parts


@pytest.mark.parametrize("block_n", [64, 32])
@pytest.mark.parametrize("name", AFFINE)
def test_cuda_input_from_cpu_layout(name, block_n):
    """`_convert_weight_to_int4pack`'s uint8 input: two slot codes per byte, the first high."""
    fmt = parse_format(name)
    fields = packed(name, seed=4)
    prepared = prepare_for_cpu(fields, fmt, OUT, IN, block_n=block_n)
    kernel_in = kernel_in_features(fmt, IN)
    got = cuda_input_from_cpu(prepared["qweight"], kernel_in, block_n)
    codes = slot_codes(fields, name)
    assert got.shape == (OUT, kernel_in // 2) and got.dtype == torch.uint8 and got.is_contiguous()
    assert torch.equal(got >> 4, codes[:, 0::2]) and torch.equal(got & 0x0F, codes[:, 1::2])


def test_cuda_shapes_and_views():
    assert inner_k_tiles(4096) == 8 and inner_k_tiles(576) == 4 and inner_k_tiles(32) == 2
    with pytest.raises(ValueError, match="multiple of 32"):
        inner_k_tiles(48)
    assert int4pack_shape(14336, 4096) == (1792, 32, 32, 4)
    qweight = torch.arange(OUT * IN // 2, dtype=torch.int64).to(torch.uint8).view(OUT, IN // 2)
    view = qweight_view(qweight, IN)
    assert view.dtype == torch.int32 and view.shape == int4pack_shape(OUT, IN)
    assert view.untyped_storage().data_ptr() == qweight.untyped_storage().data_ptr()  # no copy
    # same byte count as the CPU layout, so a slot holds either
    assert view.numel() * 4 == qweight.numel()


# An expert with hidden 256 and intermediate 80 ([160, 256] gate_up, [256, 80] down): which check
# refuses it first depends on the host's layout. 64-row blocks (torch's AVX-512 packing): 160 rows
# are not whole blocks; 32-row blocks (AVX2): the rows are, and the down matrix's 80 inputs are not.
ODD_EXPERT = [(160, 256), (256, 80)]
ODD_EXPERT_PROBLEM = {64: "160 output rows are not whole blocks of 64", 32: "input dimension 80 is not a multiple of 32"}


@pytest.mark.parametrize("block_n", [64, 32])
def test_cuda_layout_check_names_the_problem(block_n):
    assert check_cuda_layout("hqq4", [(256, 512), (512, 256)], block_n) is None
    assert check_cuda_layout("nf4", [(256, 512)], None) is None  # nf4 takes no int4 path
    assert "read back" in check_cuda_layout("hqq4", [(256, 512)], None)
    assert check_cuda_layout("hqq4", [(16 * 5, 512)], block_n) == f"80 output rows are not whole blocks of {block_n}"
    assert check_cuda_layout("hqq4", [(256, 80)], block_n) == "input dimension 80 is not a multiple of 32"
    assert check_cuda_layout("hqq4", ODD_EXPERT, block_n) == ODD_EXPERT_PROBLEM[block_n]


def test_cpu_transfer_copies_before_its_fence_passes():
    """A copy on the worker thread: once its fence passes, the destination holds the source's bytes."""
    from offload_moe.runtime.transfer import CpuTransferEngine

    engine = CpuTransferEngine()
    src = torch.arange(1 << 20, dtype=torch.int32).view(torch.uint8)
    dst = torch.zeros_like(src)
    engine.copy(src, dst).wait()
    engine.close()
    assert torch.equal(dst, src)


@pytest.mark.parametrize("block_n", [64, 32])
def test_gpu_slots_refuse_a_layout_the_fused_path_cannot_read(block_n):
    """GPU slots keep the CPU layout (no re-layout step); the fused path reads it back, which
    needs whole blocks of rows. nf4 and unquantized experts have no such condition."""
    assert fused_layout_problem(parse_format("hqq4"), 256, 512, True, block_n) is None
    assert fused_layout_problem(parse_format("nf4"), 256, 8, True, block_n) is None
    assert fused_layout_problem(parse_format("hqq4"), 256, 512, True, None) == (
        "this CPU's int4 packing layout is not one offload_moe can read back")
    problem = fused_layout_problem(parse_format("hqq4"), 256, 80, True, block_n)  # gate_up [160, 256]
    assert problem == (None if block_n == 32 else "160 output rows are not whole blocks of 64")
    assert fused_layout_problem(parse_format("hqq4"), 256, 8, True, block_n) == f"16 output rows are not whole blocks of {block_n}"


# ---------------------------------------------------------------------------------------------
# the other layout: the tests above that depend on this CPU's layout, again as on an AVX2-only CPU

AVX2_LAYOUT = """
import importlib.util, sys
import torch
spec = importlib.util.spec_from_file_location("int4_paths_avx2", sys.argv[1])
t = importlib.util.module_from_spec(spec)
spec.loader.exec_module(t)
assert torch.backends.cpu.get_cpu_capability() == "AVX2" and t.BLOCK_N == 32, (t.BLOCK_N, t.OWN_KERNEL)
for name in t.AFFINE:
    t.test_inverse_of_torchs_own_packing(name)
    t.test_dequantized_blocks_are_the_kernels_weights(name)
    for dtype in (torch.float32, torch.bfloat16):
        t.test_prefill_path_equals_dequantize_then_matmul(name, dtype)
t.test_prefill_path_on_odd_chunking()
print("ok", t.BLOCK_N, t.OWN_KERNEL)
"""


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                    reason="runs torch's AVX2 code on an AVX-512 CPU (an AVX2 CPU runs the tests above as they are)")
def test_layout_dependent_tests_pass_on_torchs_avx2_layout():
    """On an AVX2-only CPU torch packs int4 in 32-row blocks. ATEN_CPU_CAPABILITY=avx2 makes torch do
    so here: the layout-dependent tests of this file, run in such a process, see BLOCK_N 32 and pass."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    result = subprocess.run([sys.executable, "-c", AVX2_LAYOUT, __file__], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.startswith("ok 32"), result.stdout[-2000:] + result.stderr[-4000:]
