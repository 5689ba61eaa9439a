"""CUDA path: pinned store, copy stream, GPU slots in the CPU layout, the fused expert path.
Every test checks what it claims on any CUDA host; all skip without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import offload_moe
from offload_moe.model.arch import gated
from offload_moe.op_counter import count_ops
from offload_moe.quant.int4_layout import cpu_int4_block_n
from offload_moe.quant.formats import parse_format
from offload_moe.runtime.fused_torch import DequantTile, experts_from_slots
from offload_moe.runtime.hybrid import HybridCostModel, LinearTime
from offload_moe.runtime.routing import route_rows
from offload_moe.testing import make_tiny_checkpoint
from test_fused_torch import F_, H, build_pool, random_experts  # one builder of test pools (tests/ is on sys.path)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots", [1, 2, 8])
def test_cuda_offloaded_equals_cuda_reference(tiny_fp32, dtype, slots):
    """Unquantized experts: logits equal the eager cuBLAS reference bit for bit. Hybrid off, so
    every miss is copied and computed on the GPU like the reference (on the CPU it could not be)."""
    ref = AutoModelForCausalLM.from_pretrained(tiny_fp32, dtype=dtype, experts_implementation="eager").cuda().eval()
    llm = offload_moe.load(tiny_fp32, device="cuda", dtype=dtype, slots_per_layer=slots, hybrid=False, progress=False)
    assert llm.runtime.store.pinned
    ids = torch.arange(1, 40, device="cuda")[None]
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, llm.model(ids).logits)
    assert torch.equal(
        ref.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False),
        llm.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False),
    )


def test_cuda_device_memory_is_slots_only(tiny_fp32):
    """Device memory after load: the weights, buffers and slots (cuBLAS's workspace, allocated by
    the warm-up matmul before the first reading, is not the loader's)."""
    torch.ones(64, 64, device="cuda") @ torch.ones(64, 64, device="cuda")  # warm-up: cuBLAS workspace
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    llm = offload_moe.load(tiny_fp32, device="cuda", slots_per_layer=2, hybrid=False, progress=False)
    torch.cuda.synchronize()
    used = torch.cuda.memory_allocated() - before
    non_expert = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in llm.model.buffers())
    assert used <= non_expert + buffers + llm.stats()["device_expert_bytes"] + 2**20


@pytest.mark.parametrize("fmt", ["hqq4", "hqq3", "hqq2", "hqq2g64", "nf4"])
@pytest.mark.parametrize("slots", [2, 8])
def test_cuda_quantized_experts_match_cpu(tiny_fp32, fmt, slots):
    cpu = offload_moe.load(tiny_fp32, device="cpu", dtype=torch.bfloat16, experts=fmt, slots_per_layer=8, progress=False)
    gpu = offload_moe.load(tiny_fp32, device="cuda", dtype=torch.bfloat16, experts=fmt, slots_per_layer=slots,
                           hybrid=False, progress=False)
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        want = cpu.model(ids).logits.float()
        got = gpu.model(ids.cuda()).logits.float().cpu()
    rel = ((want - got).norm(dim=-1) / want.norm(dim=-1))[0]
    assert rel.median() < 0.02, f"{fmt}: median relative logit error {rel.median():.4f}"
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() > 0.9
    if slots < 8:
        assert gpu.stats()["total"]["misses"] > 0  # slots refilled during the call


def test_cuda_quantized_hybrid_reads_the_host_store_with_the_cpu_kernel(tiny_fp32):
    copy = offload_moe.load(tiny_fp32, device="cuda", dtype=torch.bfloat16, experts="hqq4", slots_per_layer=2,
                            hybrid=False, progress=False)
    hybrid = offload_moe.load(tiny_fp32, device="cuda", dtype=torch.bfloat16, experts="hqq4", slots_per_layer=2,
                              hybrid=True, progress=False)
    always_cpu = HybridCostModel(copy_seconds=1.0, cpu=LinearTime(0.0, 0.0), device=LinearTime(0.0, 0.0))
    for module in hybrid.runtime.experts.values():
        module.hybrid = always_cpu  # every miss computed on the CPU from the (CPU-layout) host store
    ids = torch.arange(1, 30, device="cuda")[None]
    with torch.no_grad():
        a, b = copy.model(ids).logits.float(), hybrid.model(ids).logits.float()
    rel = ((a - b).norm(dim=-1) / a.norm(dim=-1))[0]
    assert rel.median() < 0.02
    assert hybrid.stats()["total"]["cpu_computed"] > 0


@pytest.fixture(scope="module")
def tiny_whole_blocks(tmp_path_factory):
    """Every attention projection a whole number of 64-row blocks (k/v: 4 KV heads x 16), so
    quantized attention is accepted whatever the host CPU's int4 layout (32 or 64 rows)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_blocks"), seed=2, num_key_value_heads=4)


def test_cuda_quantized_attention(tiny_whole_blocks):
    cpu = offload_moe.load(tiny_whole_blocks, device="cpu", dtype=torch.bfloat16, attention="hqq4", progress=False)
    gpu = offload_moe.load(tiny_whole_blocks, device="cuda", dtype=torch.bfloat16, attention="hqq4", hybrid=False,
                           progress=False)
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        want = cpu.model(ids).logits.float()
        got = gpu.model(ids.cuda()).logits.float().cpu()
    rel = ((want - got).norm(dim=-1) / want.norm(dim=-1))[0]
    assert rel.median() < 0.02


@pytest.mark.parametrize("fmt", ["hqq4", "nf4"])
def test_cuda_fused_path_matches_cpu_launches_stay_fixed_and_nothing_syncs(fmt):
    """experts_from_slots on GPU slots: the CPU's numbers, the same launches for 2, 8 and 32
    experts, no host sync (the padded index arrives by a non-blocking copy from pinned memory)."""
    layout, pool = build_pool(fmt, random_experts(32), None if fmt == "nf4" else cpu_int4_block_n())
    gate = gated(F.silu)
    tiles = {dev: DequantTile.allocate(parse_format(fmt), H, F_, True, 32, torch.bfloat16, torch.device(dev))
             for dev in ("cpu", "cuda")}
    launches = {}
    for n in (2, 8, 32):
        routing = route_rows(torch.arange(n).view(n // 2, 2), torch.rand(n // 2, 2), 32)
        hidden = torch.randn(n // 2, H).bfloat16()
        counts = [routing.count(e) for e in routing.needed()]
        args = dict(counts=counts, layout=layout, fmt=parse_format(fmt), apply_gate=gate)
        want = experts_from_slots(hidden, routing.token_of_row, routing.weight_of_row, slots=torch.arange(n),
                                  pool=pool, tile=tiles["cpu"], **args)
        gpu = [t.cuda() for t in (hidden, routing.token_of_row, routing.weight_of_row, torch.arange(n), pool)]
        torch.cuda.synchronize()
        with count_ops() as counts_:
            got = experts_from_slots(gpu[0], gpu[1], gpu[2], slots=gpu[3], pool=gpu[4], tile=tiles["cuda"], **args)
        assert counts_.syncs == 0, counts_.synced
        launches[n] = counts_.launches
        rel = (got.float().cpu() - want.float()).norm(dim=-1) / want.float().norm(dim=-1)
        assert rel.max() < 0.02  # bf16 matmuls on two devices: different summation orders
    assert launches[2] == launches[8] == launches[32], launches

