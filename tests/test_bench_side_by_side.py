"""bench/side_by_side.py and bench/profile_decode.py: the GGUF they write for llama.cpp computes
the HF model's function (a head_dim other than hidden / heads included), the memory plan, and
the decode profile's kernel accounting. The scripts import their neighbours as `python bench/x.py`
does, so bench/ goes on sys.path per test."""

from __future__ import annotations

import argparse
import importlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
# head_dim 32 with hidden 64 / 4 heads: the GGUF must carry attention.key_length/value_length
TINY_DIMS = dict(vocab_size=320, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                 rope_theta=1e6, rms_norm_eps=1e-5)


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return lambda name: importlib.import_module(name)


def test_llama_cpp_computes_transformers_with_its_dequantized_experts(bench, tmp_path, one_torch_thread):
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    shapes, sbs = bench("moe_shapes"), bench("side_by_side")
    files = shapes.ModelFiles(tmp_path, tmp_path / "hf", tmp_path / "hf-hqq4", tmp_path / "model.gguf")
    shapes.build_checkpoint(files.hf, TINY_DIMS, layers=2)
    shapes.build_gguf(files.hf, files.gguf)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(files.hf)
    prompt = sbs.random_ids(12, cfg.vocab_size, seed=1)
    ref_tokens, ref_logits = sbs.references(files, cfg, prompt, new_tokens=4)[sbs.LLAMA]
    args = argparse.Namespace(prompt_tokens=12, new_tokens=4, prefill=[], llama_batch=512, llama_ubatch=512)
    llama = sbs.load_llama_cpp(files, args)
    try:
        tokens, logits, _ = sbs.greedy(llama, prompt, 4)
    finally:
        llama.close()
    # Both run f16 non-expert weights on the same dequantized experts; what differs is rounding of
    # activations (llama.cpp's f16 KV cache, its accumulation order), far below a wrong RoPE or head_dim.
    assert np.corrcoef(ref_logits, logits)[0, 1] > 0.999
    assert logits.argmax() == ref_logits.argmax()


def test_engines_share_one_round_robin_only_when_they_fit(bench):
    sbs = bench("side_by_side")
    from transformers import MixtralConfig

    cfg = MixtralConfig(num_hidden_layers=2, **TINY_DIMS)
    need = sum(sbs.engine_bytes(cfg).values()) + sbs.MARGIN
    both = [[sbs.OFFLOAD, sbs.LLAMA], [sbs.HF, sbs.LLAMA]]
    assert sbs.plan_rounds(cfg, need, skip_transformers=False) == [[sbs.OFFLOAD, sbs.LLAMA, sbs.HF]]
    assert sbs.plan_rounds(cfg, need - 1, skip_transformers=False) == both
    assert sbs.plan_rounds(cfg, need, skip_transformers=True) == [[sbs.OFFLOAD, sbs.LLAMA]]


def test_engine_bytes_count_every_weight_of_the_checkpoint(bench, tmp_path):
    shapes, sbs = bench("moe_shapes"), bench("side_by_side")
    from safetensors import safe_open
    from transformers import AutoConfig

    hf = shapes.build_checkpoint(tmp_path / "hf", TINY_DIMS, layers=2)
    counts = Counter()
    for f in hf.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for name in h.keys():
                if not name.endswith("norm.weight"):  # norms are not counted: a few KiB in any shape
                    counts["experts." in name] += h.get_slice(name).get_shape()[0] * h.get_slice(name).get_shape()[1]
    assert sbs.weight_counts(AutoConfig.from_pretrained(hf)) == (counts[True], counts[False])


def test_kernel_time_counts_each_outermost_kernel_once(bench):
    prof_mod = bench("profile_decode")
    a = torch.randn(64, 64)

    def step():
        with torch.profiler.record_function("offload_moe::moe_experts"):
            torch.mm(a, a)  # inside offload_moe's kernel row: already counted there
        torch.mm(a, a)
        with torch.profiler.record_function("offload_moe::rms_norm16"):  # not a matmul: overhead
            torch.relu(a)

    _, events = prof_mod.profiled_steps(step, 2)
    assert len(events) == 2
    for event in events:
        kernels = Counter()
        prof_mod.kernel_us(event, kernels)
        outer = [c for c in event.cpu_children if c.name == "offload_moe::moe_experts"]
        bare = [c for c in event.cpu_children if c.name == "aten::mm"]
        assert len(outer) == len(bare) == 1
        assert kernels == Counter({"offload_moe::moe_experts": outer[0].cpu_time_total,
                                   "aten::mm": bare[0].cpu_time_total})