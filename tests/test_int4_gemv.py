"""offload_moe's own int4 CPU kernel (int4_gemv): what it computes, when it is used, how it is built.

The kernel is checked against its definition (the dequantized prepared weights times the inputs
rounded to int8 in blocks of 32, in float64) and against torch's int4 kernel. The building and
fallback tests run everywhere; the numeric ones skip on CPUs it does not run on.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from offload_moe.quant import int4_gemv, native
from offload_moe.quant.int4_layout import (
    cpu_int4_block_n, dequantize_cpu_blocks, expand_input, expanded_groups, kernel_group, kernel_in_features,
    prepare_for_cpu,
)
from offload_moe.quant.matmul import int4_cpu_linear, int8_cpu_linear, linear, matmul_path, prefill_threshold
from offload_moe.quant.quantize import pack, quantize
from offload_moe.quant.formats import QuantFormat, parse_format
from offload_moe.quant.formats import FormatKind

OUT, IN = 192, 512
BLOCK_N = cpu_int4_block_n()
RUNS = int4_gemv.available(BLOCK_N, 32)  # the kernel's variant for this CPU's layout runs here
needs_kernel = pytest.mark.skipif(not RUNS, reason=f"offload_moe's int4 kernel does not run on this CPU's layout "
                                  f"(BLOCK_N={BLOCK_N}: 64 needs AVX-512 BW/VNNI/VBMI, 32 AVX2) or no C compiler")


def prepared_matrix(name: str | QuantFormat, out: int = OUT, inp: int = IN, seed: int = 0,
                    block_n: int | None = BLOCK_N) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=gen) * 0.02
    return prepare_for_cpu(pack(quantize(weight, name, optimize=False)), name, out, inp, block_n=block_n)


def kernel_weight(prepared: dict[str, torch.Tensor], fmt: QuantFormat, block_n: int, inp: int = IN) -> torch.Tensor:
    """fp32 W^T [K', out] exactly as the kernels read it (checked in test_int4_paths)."""
    out = prepared["scales_and_zeros"].shape[1]
    kernel_in = kernel_in_features(fmt, inp)
    wt = torch.empty(inp, out)
    dequantize_cpu_blocks(prepared["qweight"].view(out // block_n, kernel_in, block_n // 2),
                          prepared["scales_and_zeros"], fmt, inp, wt)
    if expanded_groups(fmt):  # back to the kernel's expanded input: zero rows in between
        wt = expand_input(wt.t(), fmt.group_size).t()
    return wt


def int8_rounded(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the kernel rounds it: int8 codes in blocks of 32, scale amax / 127."""
    blocks = x.double().reshape(x.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    codes = torch.where(scale > 0, torch.round(blocks / torch.where(scale > 0, scale, 1)), 0)
    return (codes * scale).reshape(x.shape)


@pytest.mark.parametrize("block_n", [64, 32], ids=["avx512", "avx2"])
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("fmt", [parse_format(n) for n in ("hqq4", "hqq3", "hqq2g64", "hqq2")]
                         + [QuantFormat(f"gptq4g{g}", FormatKind.AFFINE, 4, g) for g in (32, 128, 256)],
                         ids=lambda f: f.name)
def test_kernel_is_the_weights_times_int8_rounded_inputs(fmt, tokens, block_n):
    """Both variants, whichever layout torch uses here: each reads its own layout of the same weights."""
    if block_n not in int4_gemv.block_ns():
        pytest.skip(f"this CPU does not run the BLOCK_N={block_n} variant")
    prepared = prepared_matrix(fmt, seed=1, block_n=block_n)
    x = torch.randn(tokens, IN, generator=torch.Generator().manual_seed(2))
    xk = expand_input(x, fmt.group_size) if expanded_groups(fmt) else x
    got = int4_gemv.int4_gemv(xk, prepared["qweight"], prepared["scales_and_zeros"], kernel_group(fmt), block_n)
    want = int8_rounded(xk) @ kernel_weight(prepared, fmt, block_n).double()
    assert got.dtype == torch.float32 and got.shape == (tokens, OUT)
    assert ((got.double() - want).abs().max() / want.abs().max()) < 1e-6
    # and the rounding of x costs ~0.5% against the unrounded product (a real difference, not noise)
    exact = xk.double() @ kernel_weight(prepared, fmt, block_n).double()
    rel = ((got.double() - exact).norm() / exact.norm()).item()
    assert 1e-4 < rel < 2e-2


@pytest.mark.parametrize("block_n", [64, 32], ids=["avx512", "avx2"])
@pytest.mark.parametrize("fmt", [parse_format(n) for n in ("hqq4", "hqq2")]
                         + [QuantFormat("gptq4g128", FormatKind.AFFINE, 4, 128)], ids=lambda f: f.name)
def test_tiled_loop_on_one_matrix_is_the_direct_one_bit_for_bit(fmt, block_n):
    """Many tokens (not a whole number of register tiles) through the tiled loop and the direct
    one: the same fp32 operations in the same order, so equal; and both the definition."""
    if block_n not in int4_gemv.block_ns():
        pytest.skip(f"this CPU does not run the BLOCK_N={block_n} variant")
    prepared = prepared_matrix(fmt, seed=6, block_n=block_n)
    x = torch.randn(13, IN, generator=torch.Generator().manual_seed(7))
    x[5, :32] = 0  # an all-zero activation block inside a tile
    xk = expand_input(x, fmt.group_size) if expanded_groups(fmt) else x
    run = lambda tile_min: int4_gemv.int4_gemv(xk, prepared["qweight"], prepared["scales_and_zeros"],  # noqa: E731
                                               kernel_group(fmt), block_n, tile_min=tile_min)
    tiled, direct = run(1), run(1 << 40)
    assert torch.equal(tiled, direct)
    want = int8_rounded(xk) @ kernel_weight(prepared, fmt, block_n).double()
    assert ((tiled.double() - want).abs().max() / want.abs().max()) < 1e-6


@needs_kernel
def test_kernel_matches_torchs_int4_kernel_and_handles_zero_and_extreme_inputs():
    fmt = parse_format("hqq4")
    prepared = prepared_matrix("hqq4", out=4 * BLOCK_N, seed=3)
    x = torch.randn(2, IN, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    x[1, :64] = 0  # an all-zero activation block: scale 0, codes 0
    x[1, 100] = 1e4  # one outlier dominates its block only
    ours = int8_cpu_linear(x, prepared, fmt)
    torchs = int4_cpu_linear(x, prepared, fmt)
    assert ours.dtype == torch.bfloat16
    rel = ((ours.float() - torchs.float()).norm(dim=1) / torchs.float().norm(dim=1))
    assert (rel < 2e-2).all(), rel
    zeros = int4_gemv.int4_gemv(torch.zeros(1, IN), prepared["qweight"], prepared["scales_and_zeros"], 64, BLOCK_N)
    assert torch.equal(zeros, torch.zeros(1, 4 * BLOCK_N))


@needs_kernel
def test_linear_takes_the_kernel_and_the_environment_switch_turns_it_off(monkeypatch):
    fmt = parse_format("hqq4")
    prepared = prepared_matrix("hqq4", seed=5)
    x = torch.randn(1, IN).to(torch.bfloat16)
    assert matmul_path("cpu", 1, fmt, OUT, BLOCK_N, own_kernel=True) == "int8-cpu"
    assert torch.equal(linear(x, prepared, fmt), int8_cpu_linear(x, prepared, fmt))
    monkeypatch.setenv(int4_gemv.DISABLE_ENV, "torch")
    assert not int4_gemv.available(BLOCK_N, 64)
    assert torch.equal(linear(x, prepared, fmt), int4_cpu_linear(x, prepared, fmt))


def test_path_choice_with_the_own_kernel():
    hqq4 = parse_format("hqq4")
    assert matmul_path("cpu", 1, hqq4, 4096, 64, own_kernel=True) == "int8-cpu"
    assert matmul_path("cpu", 1, hqq4, 4096 + 16, 64, own_kernel=True) == "int4-cpu"  # partial block: torch's
    assert matmul_path("cpu", 1, hqq4, 4096, None, own_kernel=True) == "int4-cpu"  # unknown layout: torch's
    assert matmul_path("cpu", prefill_threshold(hqq4, True, 64), hqq4, 4096, 64, own_kernel=True) == "dequant-cpu"
    assert matmul_path("cuda", 1, hqq4, 4096, 64, own_kernel=True) == "int4-cuda"
    assert not int4_gemv.available(None, 64)  # a layout int4layout could not identify
    assert not int4_gemv.available(16, 64)
    assert not int4_gemv.available(64, 16)  # a group the int8 blocks do not divide


@needs_kernel
def test_bad_shapes_are_refused_by_name():
    prepared = prepared_matrix("hqq4")
    with pytest.raises(ValueError, match=r"x \(1, 256\), qweight \(192, 256\)"):
        int4_gemv.int4_gemv(torch.zeros(1, 256), prepared["qweight"], prepared["scales_and_zeros"], 64, BLOCK_N)
    with pytest.raises(ValueError, match="contiguous"):
        int4_gemv.int4_gemv(torch.zeros(1, IN), prepared["qweight"].t().contiguous().t(),
                            prepared["scales_and_zeros"], 64, BLOCK_N)


@needs_kernel
def test_kernel_shares_torchs_openmp_runtime():
    """Linked against the libgomp torch loaded: one OpenMP thread pool, not two fighting over cores."""
    int4_gemv.load_kernel()
    maps = Path("/proc/self/maps").read_text()
    gomps = {line.split()[-1] for line in maps.splitlines() if "libgomp" in line}
    assert len(gomps) == 1, gomps


# ---------------------------------------------------------------------------------------------
# building


@pytest.mark.skipif(int4_gemv.compiler() is None, reason="no C compiler")
def test_build_is_cached_and_leaves_no_temporary_files(tmp_path):
    first = int4_gemv.build(tmp_path, int4_gemv.compiler())
    assert first.parent == tmp_path and first.name.startswith("moe_kernel-") and first.suffix == ".so"
    stamp = first.stat().st_mtime_ns
    assert int4_gemv.build(tmp_path, int4_gemv.compiler()) == first
    assert first.stat().st_mtime_ns == stamp  # not rebuilt
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]


def test_failing_compiler_is_reported_with_its_output_and_leaves_nothing(tmp_path):
    fake = tmp_path / "fake-cc"
    fake.write_text("#!/bin/sh\necho 'fake-cc: cannot compile' >&2\nexit 1\n")
    fake.chmod(0o755)
    out = tmp_path / "kernels"
    with pytest.raises(RuntimeError, match="fake-cc: cannot compile"):
        int4_gemv.build(out, str(fake))
    assert list(out.iterdir()) == []


@pytest.fixture
def fresh_kernel_probe():
    """load_kernel and block_ns memoise their answers for the process; these tests ask again."""
    int4_gemv.load_kernel.cache_clear()
    int4_gemv.block_ns.cache_clear()
    yield
    int4_gemv.load_kernel.cache_clear()
    int4_gemv.block_ns.cache_clear()


def test_no_compiler_falls_back_to_torch_with_a_warning(monkeypatch, tmp_path, fresh_kernel_probe):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    with pytest.warns(UserWarning, match="no C compiler"):
        assert int4_gemv.load_kernel() is None
    assert not int4_gemv.available(64, 64)


def test_build_failure_falls_back_to_torch_with_the_compiler_output(monkeypatch, tmp_path, fresh_kernel_probe):
    fake = tmp_path / "fake-cc"
    fake.write_text("#!/bin/sh\necho 'fake-cc: unknown flag -mavx512vnni' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("OFFLOAD_MOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    with pytest.warns(UserWarning, match="unknown flag -mavx512vnni"):
        assert int4_gemv.load_kernel() is None
    # and the model code still runs, on torch's kernel
    prepared = prepared_matrix("hqq4")
    x = torch.randn(1, IN).to(torch.bfloat16)
    assert torch.equal(linear(x, prepared, "hqq4"), int4_cpu_linear(x, prepared, parse_format("hqq4")))


def test_other_machines_use_torchs_kernel_silently(monkeypatch, fresh_kernel_probe, recwarn):
    monkeypatch.setattr(native.platform, "machine", lambda: "aarch64")
    assert int4_gemv.load_kernel() is None
    assert not [w for w in recwarn.list if "kernel" in str(w.message)]


@needs_kernel
def test_a_quantized_model_decodes_on_the_kernel_close_to_torchs(tmp_path, monkeypatch):
    """End to end: every MoE layer call of a tiny hqq4 Mixtral takes the fused native kernel
    (counted by its profiler row: one per layer call), and the logits stay close to the same
    model's on torch's int4 kernel."""
    import offload_moe
    from offload_moe.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "mixtral", arch="mixtral", dtype=torch.bfloat16)
    llm = offload_moe.load(path, device="cpu", experts="hqq4", slots_per_layer=3, progress=False)
    ids = torch.randint(3, llm.model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ours = llm.model(ids).logits.float()
    calls = [e for e in prof.events() if e.name == "offload_moe::moe_experts"]
    assert len(calls) >= llm.model.config.num_hidden_layers  # one per group of experts (3 slots: several)
    assert not [e for e in prof.events() if e.name == "offload_moe::int4_gemv"]  # no per-expert matmuls
    monkeypatch.setenv(int4_gemv.DISABLE_ENV, "torch")
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torchs = llm.model(ids).logits.float()
    assert not [e for e in prof.events() if e.name.startswith("offload_moe::")]
    # Per position the kernels differ by their rounding of the activations (int8 against bf16)
    # through 2 layers of a tiny random model, far below either's ~20% from the unquantized model
    # (`python bench/quality.py --parts b`); a wrong layout would differ by ~100%.
    rel = (ours - torchs).norm(dim=-1) / torchs.norm(dim=-1)  # [1, 12]
    assert rel.median() < 3e-2 and rel.max() < 6e-2, rel
    assert not torch.equal(ours, torchs)  # two different kernels really ran


AVX2_MACHINE = """
import torch
from offload_moe.quant import int4_gemv, native
from offload_moe.quant.int4_layout import cpu_int4_block_n, prepare_for_cpu
from offload_moe.quant.matmul import int4_cpu_linear, linear, matmul_path
from offload_moe.quant.quantize import pack, parse_format, quantize
fmt = parse_format("hqq4")
assert torch.backends.cpu.get_cpu_capability() == "AVX2" and cpu_int4_block_n() == 32, cpu_int4_block_n()
w = torch.randn(192, 512, generator=torch.Generator().manual_seed(0)) * 0.02
prepared = prepare_for_cpu(pack(quantize(w, fmt, optimize=False)), fmt, 192, 512)  # torch's AVX2 layout
x = torch.randn(2, 512, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
assert matmul_path("cpu", 2, fmt, 192, 32, int4_gemv.available(32, 64)) == "int8-cpu"
ours, torchs = linear(x, prepared, fmt).float(), int4_cpu_linear(x, prepared, fmt).float()
rel = ((ours - torchs).norm(dim=1) / torchs.norm(dim=1)).max().item()
assert 0 < rel < 2e-2, rel
print("ok", rel)
"""


@pytest.mark.skipif(32 not in int4_gemv.block_ns(), reason="this CPU does not run the AVX2 variant")
def test_avx2_machines_take_the_avx2_variant_on_torchs_avx2_layout(tmp_path):
    """On an AVX2-only CPU torch packs 32-row blocks; ATEN_CPU_CAPABILITY=avx2 makes torch behave
    so here, and the model's few-token matmuls then run the AVX2 variant, close to torch's kernel."""
    import subprocess
    import sys

    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    env.pop(int4_gemv.DISABLE_ENV, None)
    result = subprocess.run([sys.executable, "-c", AVX2_MACHINE], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-2000:]
