"""A GPTQ checkpoint (auto-gptq layout: attention and experts as qweight/qzeros/scales/g_idx)
loads and runs: exactly like its dequantized weights when experts are dequantized (act-order),
and through the int4 kernel when the GPTQ layout maps onto it (no act-order)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import offload_moe
from offload_moe.errors import CheckpointError, ConfigError
from offload_moe.testing import make_tiny_checkpoint

from gptq_util import make_tiny_gptq_tensors

QUANTIZED = (".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight",
             ".self_attn.o_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight")


def make_gptq_pair(root, desc_act: bool, bits: int = 4, group_size: int = 32):
    """(gptq_dir, reference_dir): the same model as GPTQ tensors and as their dequantized weights."""
    base = make_tiny_checkpoint(root / "base", seed=6)
    tensors = load_file(str(base / "model.safetensors"))
    gptq, dense = {}, {}
    for i, (name, w) in enumerate(sorted(tensors.items())):
        if name.endswith(QUANTIZED):
            q = make_tiny_gptq_tensors(w, bits, group_size, desc_act, seed=i)
            prefix = name[: -len(".weight")]
            for field in ("qweight", "qzeros", "scales", "g_idx"):
                gptq[f"{prefix}.{field}"] = q[field]
            dense[name] = q["dequantized"].float()
        else:
            gptq[name] = dense[name] = w
    out = {}
    for kind, content in (("gptq", gptq), ("reference", dense)):
        d = root / kind
        shutil.copytree(base, d)
        (d / "model.safetensors").unlink()
        save_file(content, str(d / "model.safetensors"), metadata={"format": "pt"})
        out[kind] = d
    (out["gptq"] / "quantize_config.json").write_text(json.dumps(
        {"bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": False, "checkpoint_format": "gptq"}))
    return out["gptq"], out["reference"]


def test_act_order_gptq_is_dequantized_and_exact(tmp_path):
    gptq, reference = make_gptq_pair(tmp_path, desc_act=True)
    ref = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32, experts_implementation="eager").eval()
    with pytest.warns(UserWarning, match="dequantized"):
        llm = offload_moe.load(gptq, slots_per_layer=3, progress=False)
    assert not llm.runtime.experts[0].fmt.quantized
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, llm.model(ids).logits)
    g = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert torch.equal(ref.generate(ids, **g), llm.generate(ids, **g))


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_without_act_order_runs_on_the_int4_kernel(tmp_path, bits):
    gptq, reference = make_gptq_pair(tmp_path, desc_act=False, bits=bits)
    ref = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32, experts_implementation="eager").eval()
    llm = offload_moe.load(gptq, slots_per_layer=3, progress=False)
    assert llm.runtime.experts[0].fmt.quantized and llm.runtime.experts[0].fmt.bits == bits
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        want, got = ref(ids).logits, llm.model(ids).logits
    rel = ((want - got).norm(dim=-1) / want.norm(dim=-1))[0]
    assert rel.median() < 0.02 and (want.argmax(-1) == got.argmax(-1)).float().mean() > 0.9


def test_gptq_errors_name_the_file_and_tensor(tmp_path):
    gptq, _ = make_gptq_pair(tmp_path, desc_act=False)
    with pytest.raises(ConfigError, match="served as is"):
        offload_moe.load(gptq, experts="hqq4", progress=False)
    tensors = load_file(str(gptq / "model.safetensors"))
    key = "model.layers.1.block_sparse_moe.experts.2.w2.qzeros"
    tensors[key] = tensors[key][:1]
    save_file(tensors, str(gptq / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{key}' has shape"):
        offload_moe.load(gptq, progress=False)


def test_experts_gptq_is_accepted_for_a_gptq_checkpoint_and_refused_for_others(tmp_path, tiny_fp32):
    gptq, _ = make_gptq_pair(tmp_path, desc_act=False)
    implicit = offload_moe.load(gptq, slots_per_layer=3, progress=False)
    explicit = offload_moe.load(gptq, experts="gptq", slots_per_layer=3, progress=False)
    assert explicit.runtime.experts[0].fmt == implicit.runtime.experts[0].fmt
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        assert torch.equal(explicit.model(ids).logits, implicit.model(ids).logits)
    with pytest.raises(ConfigError, match=rf"{tiny_fp32}: experts='gptq' needs a GPTQ checkpoint"):
        offload_moe.load(tiny_fp32, experts="gptq", progress=False)
