"""DeepSeekMoE-16B and LLaMA-MoE v1, published only with remote code, run natively.

Three kinds of check, per family:

* an independent plain-PyTorch reference written here from the published modeling code's
  equations (modeling_deepseek.py, modeling_llama_moe_hf.py), reading the checkpoint under the
  published tensor names, equals offload_moe's logits bit for bit in fp32 and bf16. The reference
  uses the published eager attention (scores divided by sqrt(head_dim)); offload_moe's model is
  switched to eager attention for it (LlamaAttention multiplies by head_dim**-0.5: the tiny
  head_dim of 16 makes both exact, see model/deepseek_moe.py);
* the offloaded model equals the same model with its experts in place (eager), for every
  slots-per-layer value, fp32 and bf16, prefill logits and 32 greedy tokens, as for every family;
* hqq4 experts, a converted directory and the planner, as tests/test_architectures.py does.

And refusals: checkpoint code is never run, other remote-code families and settings offload_moe
does not compute exactly are refused by name.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import pytest
from logits_util import assert_quantized_logits_close
import torch
from safetensors.torch import load_file

import offload_moe
from offload_moe.checkpoint.config_check import load_validated_config
from offload_moe.checkpoint.names import build_checkpoint_map, read_expert_fields
from offload_moe.checkpoint.reader import Checkpoint
from offload_moe.errors import UnsupportedArchitectureError
from offload_moe.model.arch import describe_model
from offload_moe.model.build import build_empty_model, causal_lm_class
from offload_moe.planning.planner import plan_model
from offload_moe.quant.quantize import dequantize, quantize
from offload_moe.testing import make_tiny_checkpoint, tiny_config

ARCHS = ["deepseek_moe", "llama_moe"]
IDS = torch.tensor([[1, 17, 200, 45, 99, 3, 250, 61, 7, 128, 33, 310, 90, 12, 5, 77]])


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


@pytest.fixture(scope="module", params=ARCHS)
def checkpoints(request, tmp_path_factory):
    arch = request.param
    paths = {dtype: make_tiny_checkpoint(tmp_path_factory.mktemp(f"{arch}-{str(dtype)[6:]}"), arch=arch, dtype=dtype,
                                         num_shards=2)
             for dtype in (torch.float32, torch.bfloat16)}
    return arch, paths


def disk_tensors(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


# ---------------------------------------------------------------------------------------------
# The published equations, in plain PyTorch (no offload_moe, no transformers modeling code)


def rms_norm(x, weight, eps):
    """LlamaRMSNorm / DeepseekRMSNorm of the published code."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rotary_cache(seq_len: int, dim: int, theta: float, dtype):
    """The published rotary embedding's cos/sin cache (built in fp32, cast to the activations')."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))
    t = torch.arange(seq_len, dtype=inv_freq.dtype)
    freqs = torch.einsum("i,j->ij", t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention(x, w, prefix, cfg):
    """The published eager LlamaAttention / DeepseekAttention with a causal mask."""
    bsz, seq, hidden = x.shape
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = hidden // heads
    q = torch.nn.functional.linear(x, w[f"{prefix}.q_proj.weight"]).view(bsz, seq, heads, head_dim).transpose(1, 2)
    k = torch.nn.functional.linear(x, w[f"{prefix}.k_proj.weight"]).view(bsz, seq, kv_heads, head_dim).transpose(1, 2)
    v = torch.nn.functional.linear(x, w[f"{prefix}.v_proj.weight"]).view(bsz, seq, kv_heads, head_dim).transpose(1, 2)
    cos, sin = rotary_cache(seq, head_dim, cfg["rope_theta"], x.dtype)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(head_dim)
    mask = torch.full((seq, seq), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)
    probs = torch.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(bsz, seq, hidden)
    return torch.nn.functional.linear(out, w[f"{prefix}.o_proj.weight"])


def swiglu(x, gate, up, down):
    """DeepseekMLP / LlamaMLP / LinearGLUExperts.forward: down(silu(gate x) * up x), two matmuls."""
    f = torch.nn.functional
    return f.linear(f.silu(f.linear(x, gate)) * f.linear(x, up), down)


def deepseek_moe(x, w, prefix, cfg):
    """DeepseekMoE.forward at inference: MoEGate (softmax, top-k unsorted, no renormalisation),
    moe_infer (experts in ascending order, scatter_reduce_ sum) and the shared experts."""
    identity, shape = x, x.shape
    flat = x.view(-1, shape[-1])
    scores = torch.nn.functional.linear(flat, w[f"{prefix}.gate.weight"]).softmax(dim=-1)
    top_w, top_i = torch.topk(scores, k=cfg["num_experts_per_tok"], dim=-1, sorted=False)
    flat_i, flat_w = top_i.view(-1), top_w.view(-1, 1)
    cache = torch.zeros_like(flat)
    idxs = flat_i.argsort()
    ends = flat_i.bincount().cpu().numpy().cumsum(0)
    token_idxs = idxs // cfg["num_experts_per_tok"]
    for e, end in enumerate(ends):
        start = 0 if e == 0 else ends[e - 1]
        if start == end:
            continue
        tok = token_idxs[start:end]
        out = swiglu(flat[tok], *(w[f"{prefix}.experts.{e}.{m}_proj.weight"] for m in ("gate", "up", "down")))
        out.mul_(flat_w[idxs[start:end]])
        cache.scatter_reduce_(0, tok.view(-1, 1).repeat(1, flat.shape[-1]), out, reduce="sum")
    y = cache.view(*shape)
    shared = swiglu(identity, *(w[f"{prefix}.shared_experts.{m}_proj.weight"] for m in ("gate", "up", "down")))
    return y + shared


def llama_moe(x, w, prefix, cfg, layer):
    """LinearGLUMoELayer.forward at inference: TopKBalancedNoisyGate without noise (top k+1,
    softmax over the top k in fp32) and UniversalCalculator (expert-sorted rows, scores times
    score_scale_factor, index_add)."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    g = torch.nn.functional
    logits = g.linear(torch.tanh(g.linear(flat, w[f"{prefix}.gate.gate_network.0.weight"])),
                      w[f"{prefix}.gate.gate_network.2.weight"])
    k, experts = cfg["num_selects"], cfg["num_experts"]
    top_logits, top_indices = logits.topk(min(k + 1, experts), dim=1)
    top_k_scores = torch.nn.Softmax(1)(top_logits[:, :k].to(torch.float32)).to(logits.dtype)
    top_k_indices = top_indices[:, :k].flatten()
    scores = top_k_scores.flatten()
    batch = torch.arange(flat.shape[0]).repeat_interleave(k)
    _, order = top_k_indices.sort(0)
    sorted_scores, sorted_batch = scores.index_select(0, order), batch.index_select(0, order)
    split = torch.split(flat.index_select(0, sorted_batch), top_k_indices.bincount(minlength=experts).tolist(), dim=0)
    outs = [swiglu(split[e], *(w[f"{prefix}.calculator.experts.weight_{m}.{e}"] for m in ("gate", "up", "down")))
            for e in range(experts) if split[e].shape[0] > 0]
    scale = cfg["score_scale_factor"]
    scale = scale[layer] if isinstance(scale, list) else scale
    cat = torch.mul(torch.cat(outs, 0), sorted_scores.reshape(-1, 1) * scale)
    y = torch.zeros((flat.shape[0], cat.shape[1]), dtype=cat.dtype).index_add(0, sorted_batch, cat)
    return y.reshape(shape)


def reference_logits(path, ids):
    """The family's published forward pass on the checkpoint's tensors (published names)."""
    cfg, w = json.loads((path / "config.json").read_text()), disk_tensors(path)
    x = torch.nn.functional.embedding(ids, w["model.embed_tokens.weight"])
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        x = x + attention(rms_norm(x, w[f"{p}.input_layernorm.weight"], cfg["rms_norm_eps"]), w, f"{p}.self_attn", cfg)
        h = rms_norm(x, w[f"{p}.post_attention_layernorm.weight"], cfg["rms_norm_eps"])
        if cfg["model_type"] == "llama_moe":
            x = x + llama_moe(h, w, f"{p}.mlp", cfg, layer)
        elif layer >= cfg["first_k_dense_replace"] and layer % cfg["moe_layer_freq"] == 0:
            x = x + deepseek_moe(h, w, f"{p}.mlp", cfg)
        else:
            x = x + swiglu(h, *(w[f"{p}.mlp.{m}_proj.weight"] for m in ("gate", "up", "down")))
    x = rms_norm(x, w["model.norm.weight"], cfg["rms_norm_eps"])
    return torch.nn.functional.linear(x, w["lm_head.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_equal_to_the_published_equations(checkpoints, dtype):
    arch, paths = checkpoints
    want = reference_logits(paths[dtype], IDS)
    num_experts = describe_model(dense_model(paths[dtype], dtype)).num_experts
    for slots in (1, 3, num_experts):
        llm = offload_moe.load(paths[dtype], device="cpu", slots_per_layer=slots, progress=False)
        llm.model.set_attn_implementation("eager")  # the published code's attention
        with torch.no_grad():
            got = llm.model(IDS).logits
        assert got.dtype == dtype
        assert torch.equal(want, got), f"{arch} slots={slots}: max diff {(want - got).abs().max()}"


def test_fused_gate_up_equals_the_published_two_matmuls():
    """The published experts compute gate and up with two matmuls, offload_moe with one fused
    [2F, H] matmul; on the CPU the columns come out the same at DeepSeekMoE-16B's and
    LLaMA-MoE's real widths, so the fused experts contract is exact for both."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for tokens, hidden, width in ((1, 2048, 1408), (6, 2048, 1408), (1, 4096, 1376), (5, 4096, 688)):
            x = torch.randn(tokens, hidden, generator=gen).to(dtype)
            gate, up = (torch.randn(width, hidden, generator=gen).to(dtype) for _ in range(2))
            fused_gate, fused_up = torch.nn.functional.linear(x, torch.cat([gate, up])).chunk(2, dim=-1)
            assert torch.equal(fused_gate, torch.nn.functional.linear(x, gate))
            assert torch.equal(fused_up, torch.nn.functional.linear(x, up))


# ---------------------------------------------------------------------------------------------
# Offloaded == the same model with its experts in place


def dense_model(path, dtype):
    """offload_moe's model of the checkpoint with every expert in place (eager experts), weights
    read under the published names through the checkpoint map, freshly allocated (aligned)."""
    config = load_validated_config(path)
    model = causal_lm_class(config)._from_config(config, dtype=dtype)
    ckpt = Checkpoint(path)
    spec = describe_model(model)
    cmap = build_checkpoint_map(ckpt, model, spec)
    state = {key: ckpt.read(disk).clone() for key, disk in cmap.non_expert.items()}
    for layer in spec.layers:
        fields = [read_expert_fields(ckpt, cmap, spec, layer.index, e) for e in range(spec.num_experts)]
        state[f"{layer.experts_path}.gate_up_proj"] = torch.stack([f["gate_up"] for f in fields]).to(dtype)
        state[f"{layer.experts_path}.down_proj"] = torch.stack([f["down"] for f in fields]).to(dtype)
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_exact_for_every_slot_count(checkpoints, dtype):
    arch, paths = checkpoints
    ref = dense_model(paths[dtype], dtype)
    with torch.no_grad():
        want_logits = ref(IDS).logits
    want_ids = ref.generate(IDS, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    num_experts = describe_model(ref).num_experts
    for slots in range(1, num_experts + 1):
        llm = offload_moe.load(paths[dtype], device="cpu", slots_per_layer=slots, prefetch_top_n=2, progress=False)
        with torch.no_grad():
            got = llm.model(IDS).logits
        assert torch.equal(want_logits, got), f"{arch} slots={slots}: max diff {(want_logits - got).abs().max()}"
        assert torch.equal(want_ids, llm.generate(IDS, max_new_tokens=32, min_new_tokens=32, do_sample=False)), \
            f"{arch} slots={slots}: greedy tokens differ"
        total = llm.stats()["total"]
        assert (total["misses"] > 0) == (slots < num_experts)
        if slots <= 3:
            assert total["prefetch_issued"] > 0  # the router (LLaMA-MoE: its whole gate network) ranks


def test_quantized_converted_and_plan(checkpoints, tmp_path):
    """hqq4 experts within the tolerance of the other families, against the dense model with
    each expert's matrices round-tripped through hqq4; a converted directory reloads to the
    same logits; the planner plans the family from its config."""
    arch, paths = checkpoints
    path = paths[torch.float32]
    ref = dense_model(path, torch.float32)
    spec = describe_model(ref)
    with torch.no_grad():
        for layer in spec.layers:
            experts = ref.get_submodule(layer.experts_path)
            for param in (experts.gate_up_proj, experts.down_proj):
                for e in range(spec.num_experts):
                    param[e] = dequantize(quantize(param[e].float(), "hqq4", optimize=False), torch.float32)
        want = ref(IDS).logits
    llm = offload_moe.load(path, device="cpu", experts="hqq4", slots_per_layer=3, prefetch_top_n=2, hybrid=True,
                           progress=False)
    with torch.no_grad():
        got = llm.model(IDS).logits
    assert_quantized_logits_close(want, got, arch)
    llm.generate(IDS, max_new_tokens=8, do_sample=False)
    assert llm.stats()["total"]["cpu_computed"] > 0

    converted = offload_moe.convert(path, tmp_path / "hqq4", experts="hqq4", progress=False)
    reloaded = offload_moe.load(converted, device="cpu", slots_per_layer=3, progress=False)
    with torch.no_grad():
        assert torch.equal(reloaded.model(IDS).logits, got)

    plan = plan_model(tiny_config(arch), "hqq4", gpu_memory=2**30, cpu_memory=2**30, context=256)
    assert plan.moe_layers == len(spec.layers) and plan.num_experts == spec.num_experts
    assert plan.model_type == json.loads((path / "config.json").read_text())["model_type"]


# ---------------------------------------------------------------------------------------------
# Published layout, planning offline, refusals


def test_tiny_checkpoints_use_the_published_layout(tmp_path):
    ds = make_tiny_checkpoint(tmp_path / "ds", arch="deepseek_moe")
    config = json.loads((ds / "config.json").read_text())
    assert config["model_type"] == "deepseek" and config["architectures"] == ["DeepseekForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_deepseek.DeepseekForCausalLM"
    assert "rope_theta" in config and "rope_parameters" not in config
    names = set(disk_tensors(ds))
    assert {"model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate.weight",
            "model.layers.1.mlp.experts.7.down_proj.weight",
            "model.layers.2.mlp.shared_experts.up_proj.weight"} <= names
    lm = make_tiny_checkpoint(tmp_path / "lm", arch="llama_moe")
    config = json.loads((lm / "config.json").read_text())
    assert config["model_type"] == "llama_moe" and config["architectures"] == ["LlamaMoEForCausalLM"]
    assert config["auto_map"]["AutoConfig"] == "configuration_llama_moe.LlamaMoEConfig"
    names = set(disk_tensors(lm))
    assert {"model.layers.0.mlp.gate.gate_network.0.weight", "model.layers.0.mlp.gate.gate_network.2.weight",
            "model.layers.1.mlp.gate.weight_noise.weight", "model.layers.1.mlp.calculator.experts.weight_gate.7",
            "model.layers.1.mlp.calculator.experts.weight_down.0"} <= names
    assert not any(".mlp.experts." in n for n in names)


@pytest.mark.parametrize("name, layers, experts, top_k, fmt", [
    ("deepseek-ai/deepseek-moe-16b-base", 27, 64, 6, "hqq4"), ("deepseek-ai/deepseek-moe-16b-chat", 27, 64, 6, "hqq4"),
    # LLaMA-MoE's experts are 1376 or 688 wide: not a multiple of the 64-wide groups of
    # hqq4/hqq3/nf4 (the down matrix's input), hqq2's groups of 16 fit.
    ("llama-moe/LLaMA-MoE-v1-3_5B-2_8", 32, 8, 2, "hqq2"),
    ("llama-moe/LLaMA-MoE-v1-3_0B-2_16", 32, 16, 2, "hqq2"), ("llama-moe/LLaMA-MoE-v1-3_5B-4_16", 32, 16, 4, "bf16"),
])
def test_plan_published_checkpoints_offline(name, layers, experts, top_k, fmt):
    out = subprocess.run([sys.executable, "-m", "offload_moe.cli", "plan", name, "--gpu-memory", "24GiB",
                          "--experts", fmt], capture_output=True, text=True, check=True).stdout
    assert f"{layers} MoE layers x {experts} experts (top-{top_k}), experts as {fmt}" in out


@pytest.mark.parametrize("name, width", [("llama-moe/LLaMA-MoE-v1-3_5B-2_8", 1376),
                                         ("llama-moe/LLaMA-MoE-v1-3_0B-2_16", 688)])
def test_hqq4_of_llama_moe_experts_is_refused_by_shape(name, width):
    out = subprocess.run([sys.executable, "-m", "offload_moe.cli", "plan", name, "--experts", "hqq4"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and f"multiple of 64, got a [4096, {width}] matrix" in out.stderr
    # Without --experts, plan says that its default format does not fit and plans 16-bit experts.
    out = subprocess.run([sys.executable, "-m", "offload_moe.cli", "plan", name], capture_output=True, text=True)
    assert out.returncode == 0 and "hqq4 does not fit these experts' shapes; planned as bf16" in out.stderr


# The published config.json files, key for key (LLaMA-MoE-v1-3_5B-2_8's as on the Hub; DeepSeekMoE-16B's
# keys and values as its configuration_deepseek.py writes them).
PUBLISHED_CONFIG_JSON = {
    "deepseek": {
        "architectures": ["DeepseekForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig",
                     "AutoModel": "modeling_deepseek.DeepseekModel",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
        "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
        "max_position_embeddings": 4096, "model_type": "deepseek", "moe_intermediate_size": 1408,
        "moe_layer_freq": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
        "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 28, "num_key_value_heads": 16,
        "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000,
        "scoring_func": "softmax", "seq_aux": True, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.36.0", "use_cache": True, "vocab_size": 102400},
    "llama_moe": {
        "_name_or_path": "llama-moe/LLaMA-MoE-v1-3_5B-2_8", "add_weight_norm": False,
        "architectures": ["LlamaMoEForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_llama_moe.LlamaMoEConfig",
                     "AutoModel": "modeling_llama_moe_hf.LlamaMoEModel",
                     "AutoModelForCausalLM": "modeling_llama_moe_hf.LlamaMoEForCausalLM"},
        "bos_token_id": 1, "calculator_type": "UniversalCalculator", "capacity_factor": 1.25, "drop_tokens": True,
        "dropped_padding": "zero", "eos_token_id": 2, "gate_add_noise": True, "gate_balance_loss_weight": 0.01,
        "gate_network": "mlp", "gate_noise_epsilon": 0.01, "gate_type": "TopKBalancedNoisyGate",
        "gate_use_balance": True, "gate_use_softmax": True, "gates": "mlp", "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
        "model_type": "llama_moe", "multiply_gate_scores": True, "num_attention_heads": 32, "num_experts": 8,
        "num_hidden_layers": 32, "num_key_value_heads": 32, "num_selects": 2, "pad_token_id": 0,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "score_scale_factor": 4.0,
        "size_experts": [[1376] * 8] * 32, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.31.0", "use_cache": True, "vocab_size": 32000},
}


@pytest.mark.parametrize("model_type, layers, experts, top_k, width", [
    ("deepseek", 27, 64, 6, 1408), ("llama_moe", 32, 8, 2, 1376)])
def test_published_config_json_is_read_as_published(tmp_path, model_type, layers, experts, top_k, width):
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_CONFIG_JSON[model_type]))
    config = load_validated_config(tmp_path)
    assert config.num_experts_per_tok == top_k and config.rope_parameters["rope_theta"] == 10000
    spec = describe_model(build_empty_model(config, torch.bfloat16))
    assert (len(spec.layers), spec.num_experts, spec.top_k, spec.intermediate) == (layers, experts, top_k, width)
    plan = plan_model(config, "bf16", gpu_memory=24 * 2**30, cpu_memory=64 * 2**30, context=4096)
    assert plan.model_type == model_type and plan.moe_layers == layers


def _edit(path, **keys):
    config = json.loads((path / "config.json").read_text())
    config.update(keys)
    (path / "config.json").write_text(json.dumps(config))


def test_checkpoint_code_is_never_run(tmp_path):
    """The published auto_map names code shipped with the checkpoint; it only names the family."""
    path = make_tiny_checkpoint(tmp_path / "ds", arch="deepseek_moe")
    marker = tmp_path / "ran"
    for module in ("configuration_deepseek", "modeling_deepseek"):
        (path / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    llm = offload_moe.load(path, device="cpu", slots_per_layer=2, progress=False)
    with torch.no_grad():
        assert torch.isfinite(llm.model(IDS).logits).all()
    assert type(llm.model).__module__ == "offload_moe.model.deepseek_moe" and not marker.exists()


@pytest.mark.parametrize("arch, keys, named", [
    ("deepseek_moe", dict(scoring_func="sigmoid"), "scoring_func='sigmoid'"),
    ("deepseek_moe", dict(norm_topk_prob=True), "norm_topk_prob=True"),
    ("deepseek_moe", dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling="),
    ("deepseek_moe", dict(pretraining_tp=2), "pretraining_tp=2"),
    ("llama_moe", dict(calculator_type="SwitchDropTokenCalculator"), "calculator_type='SwitchDropTokenCalculator'"),
    ("llama_moe", dict(size_experts=[[32, 96] + [64] * 6] * 2), "size_experts="),
    ("llama_moe", dict(add_weight_norm=True), "add_weight_norm=True"),
    ("llama_moe", dict(gate_type="SwitchBalancedGate"), "gate_type='SwitchBalancedGate'"),
    ("llama_moe", dict(score_scale_factor=[4.0]), "score_scale_factor=[4.0]"),
])
def test_settings_computed_otherwise_are_refused_by_name(tmp_path, arch, keys, named):
    path = make_tiny_checkpoint(tmp_path / arch, arch=arch)
    _edit(path, **keys)
    with pytest.raises(UnsupportedArchitectureError, match="not supported") as info:
        offload_moe.load(path, device="cpu", slots_per_layer=2, progress=False)
    assert named in str(info.value) and "config.json" in str(info.value)


@pytest.mark.parametrize("keys", [
    dict(model_type="llama_moe_residual", auto_map={"AutoConfig": "configuration_llama_moe_residual.X"}),
    dict(auto_map={"AutoConfig": "configuration_other.OtherConfig"}, architectures=["OtherForCausalLM"]),
])
def test_other_remote_code_families_are_still_refused(tmp_path, keys):
    path = make_tiny_checkpoint(tmp_path / "lm", arch="llama_moe")
    _edit(path, **keys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnsupportedArchitectureError, match="never runs checkpoint code"):
            offload_moe.load(path, device="cpu", slots_per_layer=2, progress=False)
