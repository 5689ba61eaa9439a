"""Every supported MoE family: exact against transformers' eager reference, and the runtime
features (quantized experts, conversion, prefetch, hybrid compute, planning) on each.

The reference's weights are re-allocated after from_pretrained: safetensors hands it tensors at
8-byte-aligned file offsets, and torch's CPU matrix-vector kernels round differently on
unaligned memory (seen on Granite in fp32, ~2e-7). Fresh allocations are 64-byte aligned, like
the offloaded store; the reference computes the same function either way.
"""

from __future__ import annotations

import warnings

import pytest
from logits_util import assert_quantized_logits_close
import torch
from transformers import AutoModelForCausalLM

import offload_moe
from offload_moe.model.arch import ExpertsKind, describe_model
from offload_moe.errors import UnsupportedArchitectureError
from offload_moe.planning.planner import plan_model
from offload_moe.quant.quantize import dequantize, quantize
from offload_moe.runtime.store import ExpertLayout
from offload_moe.testing import REMOTE_CODE_ARCHS, TINY_DEFAULTS, make_tiny_checkpoint, tiny_config

ARCHS = [arch for arch in TINY_DEFAULTS if arch != "mixtral"  # Mixtral: tests/test_exactness.py
         and arch not in REMOTE_CODE_ARCHS]  # DeepSeekMoE-16B, LLaMA-MoE: tests/test_remote_families.py
IDS = torch.tensor([[1, 17, 200, 45, 99, 3, 250, 61, 7, 128, 33, 310, 90, 12, 5, 77]])


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


def aligned_reference(path, dtype: torch.dtype):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager").eval()
    for param in model.parameters():
        param.data = param.data.clone()  # 64-byte aligned, see the module docstring
    return model


@pytest.fixture(scope="module", params=ARCHS)
def arch_checkpoints(request, tmp_path_factory):
    arch = request.param
    paths = {}
    for dtype in (torch.float32, torch.bfloat16):
        path = tmp_path_factory.mktemp(f"{arch}-{str(dtype)[6:]}")
        paths[dtype] = make_tiny_checkpoint(path, arch=arch, dtype=dtype, num_shards=2)
    return arch, paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_exact_for_every_slot_count(arch_checkpoints, dtype):
    arch, paths = arch_checkpoints
    path = paths[dtype]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = aligned_reference(path, dtype)
        with torch.no_grad():
            want_logits = ref(IDS).logits
        want_ids = ref.generate(IDS, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    num_experts = describe_model(ref).num_experts
    for slots in range(1, num_experts + 1):
        llm = offload_moe.load(path, device="cpu", slots_per_layer=slots, prefetch_top_n=2, progress=False)
        with torch.no_grad():
            got = llm.model(IDS).logits
        assert torch.equal(want_logits, got), f"{arch} slots={slots}: max diff {(want_logits - got).abs().max()}"
        assert torch.equal(want_ids, llm.generate(IDS, max_new_tokens=32, min_new_tokens=32, do_sample=False)), \
            f"{arch} slots={slots}: greedy tokens differ"
        total = llm.stats()["total"]
        assert (total["misses"] > 0) == (slots < num_experts)


def _requantized(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """dequantize(quantize(W)) in hqq4 for a weight held [out, in] (or [in, out] if transposed)."""
    canonical = weight.t() if transposed else weight
    out = dequantize(quantize(canonical.float(), "hqq4", optimize=False), torch.float32)
    return out.t() if transposed else out


def dequantized_reference(path):
    """The eager transformers model with every expert matrix replaced by its hqq4 round trip
    (row-wise groups: quantizing gate and up apart equals quantizing gate_up at once)."""
    model = aligned_reference(path, torch.float32)
    spec = describe_model(model)
    with torch.no_grad():
        for layer in spec.layers:
            experts = model.get_submodule(layer.experts_path)
            if spec.kind is ExpertsKind.DBRX:  # [E*F, H]; w2 is used as x @ w2
                for name, transposed in (("w1", False), ("v1", False), ("w2", True)):
                    param = getattr(experts.mlp, name)
                    blocks = param.view(spec.num_experts, spec.intermediate, spec.hidden)
                    for e in range(spec.num_experts):
                        blocks[e] = _requantized(blocks[e], transposed)
                continue
            transposed = spec.kind is ExpertsKind.TRANSPOSED
            for param in (experts.gate_up_proj, experts.down_proj):
                for e in range(spec.num_experts):
                    param[e] = _requantized(param[e], transposed)
    return model


def test_quantized_converted_prefetch_hybrid_and_plan(arch_checkpoints, tmp_path):
    """hqq4 experts with fewer slots than experts, prefetch and hybrid on: the transformers
    model with dequantized experts, up to the int4 kernel's bf16 rounding; a converted directory
    reloads to the same logits; the planner plans the family from its config."""
    arch, paths = arch_checkpoints
    path = paths[torch.float32]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            want = dequantized_reference(path)(IDS).logits
    llm = offload_moe.load(path, device="cpu", experts="hqq4", slots_per_layer=3, prefetch_top_n=2, hybrid=True,
                           progress=False)
    with torch.no_grad():
        got = llm.model(IDS).logits
    assert_quantized_logits_close(want, got, arch)
    llm.generate(IDS, max_new_tokens=8, do_sample=False)
    total = llm.stats()["total"]
    assert total["cpu_computed"] > 0  # hybrid served misses on the CPU (same memory: never copied)

    prefetching = offload_moe.load(path, device="cpu", experts="hqq4", slots_per_layer=3, prefetch_top_n=2,
                                   progress=False)
    prefetching.generate(IDS, max_new_tokens=8, do_sample=False)
    moe_layers = len(prefetching.runtime.spec.layers)
    assert (prefetching.stats()["total"]["prefetch_issued"] > 0) == (moe_layers > 1)

    attention = offload_moe.load(path, device="cpu", experts="hqq4", attention="hqq4", slots_per_layer=3,
                                 progress=False)
    quantized = [name for name, m in attention.model.named_modules() if type(m).__name__ == "QuantizedLinear"]
    # The family's attention projections, wherever its attention lives, and nothing else (routers,
    # norms, embeddings, lm_head, shared experts and Mamba mixers stay 16-bit).
    assert quantized and all(name.rpartition(".")[0].rpartition(".")[2] in ("self_attn", "attn") for name in quantized)
    with torch.no_grad():
        assert torch.isfinite(attention.model(IDS).logits).all()

    converted = offload_moe.convert(path, tmp_path / "hqq4", experts="hqq4", progress=False)
    reloaded = offload_moe.load(converted, device="cpu", slots_per_layer=3, progress=False)
    with torch.no_grad():
        assert torch.equal(reloaded.model(IDS).logits, got)

    config = tiny_config(arch)
    plan = plan_model(config, "hqq4", gpu_memory=2**30, cpu_memory=2**30, context=256)
    spec = prefetching.runtime.spec
    assert plan.moe_layers == len(spec.layers) and plan.num_experts == spec.num_experts
    # 4-bit codes plus a 16-bit scale and zero per 64 weights: ~0.28 of the 16-bit expert.
    assert 0.25 < plan.expert_bytes / ExpertLayout(spec.dense_fields(torch.bfloat16)).nbytes < 0.35


def test_unknown_experts_forward_is_refused():
    """A family whose experts compute something else (NemotronH: no gate) is refused by name."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("nemotron_h", hidden_size=64, num_hidden_layers=2, vocab_size=320)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitectureError, match=r"model_type 'nemotron_h' is not supported: the eager "
                                                           r"forward of NemotronHExperts"):
        describe_model(model)


# Shrinks any transformers config to a tiny one (attributes it does not have are left alone).
_SHRINK = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=64, moe_intermediate_size=64,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_local_experts=4,
               n_routed_experts=4, vocab_size=320, num_experts_per_tok=2, shared_expert_intermediate_size=64,
               first_k_dense_replace=0, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16,
               qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=512)


def _keep_each_kind(per_layer: list, n: int) -> list:
    """n entries of a per-layer list that keep one of each kind where possible (a hybrid model's
    2 tiny layers: one linear-attention and one full-attention layer, not two of the first)."""
    kinds: dict[str, int] = {}  # kind -> its first layer
    for i, kind in enumerate(per_layer):
        kinds.setdefault(str(kind), i)
    keep = sorted(kinds.values())[:n]
    keep += [i for i in range(len(per_layer)) if i not in keep][: n - len(keep)]
    return [per_layer[i] for i in sorted(keep)]


def _tiny_any(model_type: str):
    """A tiny config and meta model of any causal-LM model type, or None if transformers cannot
    build one from these generic overrides."""
    from transformers import AutoConfig

    try:
        if model_type in TINY_DEFAULTS:
            config = tiny_config(model_type)
        else:
            config = AutoConfig.for_model(model_type)
        text = config.get_text_config()
        layers = getattr(text, "num_hidden_layers", None)
        for key, value in vars(text).items():  # per-layer lists follow the layer count
            if model_type not in TINY_DEFAULTS and isinstance(value, list) and layers and len(value) == layers:
                setattr(text, key, _keep_each_kind(value, _SHRINK["num_hidden_layers"]))
        for key, value in _SHRINK.items():
            if model_type not in TINY_DEFAULTS and getattr(text, key, None) is not None:
                setattr(text, key, value)
        for key, value in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
            if isinstance(getattr(text, key, None), int) and getattr(text, key) >= 320:
                setattr(text, key, value)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - transformers' own validation of a shrunk config
        return None
    return config, model


def test_every_moe_family_in_transformers_is_exact_or_refused(tmp_path):
    """Walk every causal-LM model type of the installed transformers; for each with an experts
    module, build a tiny random checkpoint and either match the eager reference bit for bit
    (2 slots per layer) or refuse it with a message that names the model type (describe_model)
    or the checkpoint (any later step of load). Families a newer transformers adds land in one of
    the three lists (exact, refused, no tiny config); only wrong numbers or an error that is not
    offload_moe's refusal fail the walk."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from offload_moe.model.arch import _is_experts_module
    from offload_moe.testing import make_tiny_tokenizer, random_disk_tensors, write_safetensors_shards

    exact, refused, untestable = [], [], []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        built = _tiny_any(model_type)
        if built is None:
            untestable.append(model_type)
            continue
        config, meta = built
        if not any(_is_experts_module(m) for m in meta.modules()):
            continue  # not a MoE family
        try:
            describe_model(meta)
        except UnsupportedArchitectureError as exc:
            assert f"model_type {model_type!r} is not supported" in str(exc)
            refused.append(model_type)
            continue
        path = tmp_path / model_type
        path.mkdir()
        try:
            write_safetensors_shards(random_disk_tensors(config, seed=0, dtype=torch.float32), path, 1)
            config.save_pretrained(path)
            make_tiny_tokenizer().save_pretrained(path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = aligned_reference(path, torch.float32)
                ids = IDS[:, :8]
                with torch.no_grad():
                    want = ref(ids).logits
        except Exception:  # noqa: BLE001 - the tiny config does not run in transformers itself
            untestable.append(model_type)
            continue
        try:
            llm = offload_moe.load(path, device="cpu", slots_per_layer=2, progress=False)
        except UnsupportedArchitectureError as exc:  # refused at a later step of load (e.g. checkpoint names)
            assert f"{model_type!r}" in str(exc) or str(path) in str(exc), f"{model_type}: refused unnamed: {exc}"
            refused.append(model_type)
            continue
        with torch.no_grad():
            got = llm.model(ids).logits
        assert torch.equal(want, got), f"{model_type}: max diff {(want - got).abs().max()}"
        exact.append(model_type)
    print(f"exact: {exact}\nrefused: {refused}\nno tiny config: {untestable}")
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "phimoe", "gpt_oss",
            "granitemoe", "jamba"} <= set(exact)
    assert len(exact) >= 25 and refused
