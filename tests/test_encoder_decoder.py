"""Encoder-decoder MoE (issue 14): Switch Transformers with every sparse layer of encoder and
decoder offloaded, exact against transformers' eager reference (NLLB-MoE: tests/test_nllb_moe.py).

The tiny Switch model routes top-1 with an expert capacity of 4 tokens, so a 24-token source
overflows experts and the reference drops tokens (their expert output is zero, the residual
carries them); the offloaded model must drop the same ones. Reference weights are re-allocated
after from_pretrained, as in tests/test_architectures.py (aligned memory, same function).
"""

from __future__ import annotations

import io
import json
import warnings
from contextlib import redirect_stdout

import pytest
from logits_util import assert_quantized_logits_close
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import offload_moe
from offload_moe.checkpoint.published import published_config
from offload_moe.errors import ConfigError
from offload_moe.model.arch import ExpertsKind, describe_model
from offload_moe.planning.planner import plan_model
from offload_moe.quant.quantize import dequantize, quantize
from offload_moe.testing import make_tiny_checkpoint, tiny_config

SOURCE = torch.tensor([[17, 200, 45, 99, 3, 250, 61, 7, 128, 33, 310, 90, 12, 5, 77, 41, 42, 43, 180, 181, 66, 9, 23, 1]])
DECODER = torch.tensor([[0, 55, 120, 7, 300, 18]])  # starts with decoder_start_token_id (0)
PROMPT = "translate English to German: the house is wonderful and the garden is green."


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def switch(tmp_path_factory):
    return {dtype: make_tiny_checkpoint(tmp_path_factory.mktemp(f"switch-{str(dtype)[6:]}"), arch="switch_transformers",
                                        dtype=dtype, num_shards=2)
            for dtype in (torch.float32, torch.bfloat16)}


def reference(path, dtype=torch.float32):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype).eval()
    for param in model.parameters():
        param.data = param.data.clone()  # 64-byte aligned
    return model


def dropped_tokens(model) -> int:
    """Tokens the routers of `model` dropped at expert capacity in the calls since this was set up."""
    counts = []

    def hook(router, args, output):
        counts.append(int((output[0].sum(dim=-1) == 0).sum()))

    handles = [m.register_forward_hook(hook) for name, m in model.named_modules() if name.endswith("mlp.router")]
    return counts, handles


def test_describes_both_stacks(switch):
    spec = describe_model(reference(switch[torch.float32]))
    assert spec.kind is ExpertsKind.DENSE_ACT_DENSE and spec.top_k == 1 and not spec.gated
    assert spec.stack_layers() == {"encoder": [1, 3], "decoder": [5, 7]}  # decoder blocks 1, 3 after 4 encoder blocks
    assert [layer.experts_path for layer in spec.layers] == [
        "encoder.block.1.layer.1.mlp.experts", "encoder.block.3.layer.1.mlp.experts",
        "decoder.block.1.layer.2.mlp.experts", "decoder.block.3.layer.2.mlp.experts"]
    assert {name: shape for name, shape, _ in spec.dense_fields(torch.float32)} == {"gate_up": (128, 64), "down": (64, 128)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_exact_for_every_slot_count(switch, dtype):
    path = switch[dtype]
    ref = reference(path, dtype)
    counts, handles = dropped_tokens(ref)
    with torch.no_grad():
        want_logits = ref(input_ids=SOURCE, decoder_input_ids=DECODER).logits
    for handle in handles:
        handle.remove()
    assert sum(counts) > 0, "the test source should overflow an expert's capacity"
    want_ids = ref.generate(SOURCE, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    for slots in range(1, 9):
        llm = offload_moe.load(path, device="cpu", slots_per_layer=slots, prefetch_top_n=1, progress=False)
        assert sorted(llm.runtime.experts) == [1, 3, 5, 7]  # both stacks offloaded
        with torch.no_grad():
            got = llm.model(input_ids=SOURCE, decoder_input_ids=DECODER).logits
        assert got.dtype == dtype
        assert torch.equal(want_logits, got), f"slots={slots}: max diff {(want_logits - got).abs().max()}"
        have_ids = llm.generate(SOURCE, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        assert have_ids.shape[1] == 33 and torch.equal(want_ids, have_ids), f"slots={slots}: greedy tokens differ"
        total = llm.stats()["total"]
        if slots <= 2:
            assert total["misses"] > 0 and total["evictions"] > 0  # the cache was at work
        if slots == 8:
            assert total["misses"] == 0


def _dequantized_reference(path):
    """The eager model with every expert's wi and wo replaced by their hqq4 round trip."""
    model = reference(path)
    with torch.no_grad():
        for layer in describe_model(model).layers:
            for expert in model.get_submodule(layer.experts_path).values():
                for linear in (expert.wi, expert.wo):
                    linear.weight.copy_(dequantize(quantize(linear.weight.float(), "hqq4", optimize=False), torch.float32))
    return model


def test_quantized_converted_and_plan(switch, tmp_path):
    """hqq4 experts (3 slots, prefetch, hybrid) against the reference with dequantized experts, up
    to the int4 kernel's rounding; a converted directory reloads to the same logits; the planner
    counts the encoder's and the decoder's MoE layers."""
    path = switch[torch.float32]
    with torch.no_grad():
        want = _dequantized_reference(path)(input_ids=SOURCE, decoder_input_ids=DECODER).logits
    llm = offload_moe.load(path, device="cpu", experts="hqq4", slots_per_layer=3, prefetch_top_n=1, hybrid=True,
                           progress=False)
    with torch.no_grad():
        got = llm.model(input_ids=SOURCE, decoder_input_ids=DECODER).logits
    assert_quantized_logits_close(want, got, "switch_transformers")
    llm.generate(SOURCE, max_new_tokens=8, do_sample=False)
    assert llm.stats()["total"]["cpu_computed"] > 0

    converted = offload_moe.convert(path, tmp_path / "hqq4", experts="hqq4", progress=False)
    reloaded = offload_moe.load(converted, device="cpu", slots_per_layer=3, progress=False)
    with torch.no_grad():
        assert torch.equal(reloaded.model(input_ids=SOURCE, decoder_input_ids=DECODER).logits, got)

    plan = plan_model(tiny_config("switch_transformers"), "hqq4", gpu_memory=2**30, cpu_memory=2**30, context=256)
    assert plan.moe_layers == 4 and plan.num_experts == 8 and plan.experts_per_token == 1
    assert plan.stacks == {"encoder": [1, 3], "decoder": [5, 7]} and plan.decode_layers == 2


def test_text_to_text_generate_stream_and_cli(switch, capsys):
    path = switch[torch.float32]
    ref, tok = reference(path), AutoTokenizer.from_pretrained(path)
    inputs = tok(PROMPT, return_tensors="pt")
    # min_new_tokens: a random model may end at once; a reply of 20 tokens is never empty
    want = tok.decode(ref.generate(**inputs, max_new_tokens=20, min_new_tokens=20, do_sample=False)[0],
                      skip_special_tokens=True)
    llm = offload_moe.load(path, device="cpu", slots_per_layer=2, progress=False)
    assert llm.is_encoder_decoder
    text = llm.generate(PROMPT, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert text == want and text
    assert "".join(llm.stream(PROMPT, max_new_tokens=20, min_new_tokens=20, do_sample=False)) == want
    with pytest.raises(ConfigError, match="encoder-decoder"):
        llm.chat([{"role": "user", "content": "hi"}])

    from offload_moe.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["generate", str(path), "--prompt", PROMPT, "--max-new-tokens", "20", "--ignore-eos",
                     "--device", "cpu", "--slots", "1"]) == 0
    assert out.getvalue() == want + "\n"


def test_routing_trace_keeps_stacks_apart(switch, tmp_path):
    from offload_moe.planning.replay import load_trace, replay_stats
    from offload_moe.runtime.cache import CacheStats

    trace_file = tmp_path / "routing.jsonl"
    llm = offload_moe.load(switch[torch.float32], device="cpu", slots_per_layer=1, record_routing=trace_file,
                           progress=False)
    llm.generate(SOURCE, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    live = llm.stats()["total"]
    llm.close()
    rows = [json.loads(line) for line in trace_file.read_text().splitlines()]
    by_stack = {s: {r["layer"] for r in rows if r["stack"] == s} for s in ("encoder", "decoder")}
    assert by_stack == {"encoder": {1, 3}, "decoder": {5, 7}}
    encoder_rows = [r for r in rows if r["stack"] == "encoder"]
    assert len(encoder_rows) == 2 * SOURCE.shape[1] and {r["phase"] for r in encoder_rows} == {"prefill"}
    assert any(r["experts"] == [] for r in encoder_rows)  # dropped at capacity: no expert, not id 8
    assert all(len(r["experts"]) <= 1 and all(e < 8 for e in r["experts"]) for r in rows)
    decoder_rows = [r for r in rows if r["stack"] == "decoder"]
    assert len(decoder_rows) == 2 * 6
    # The recorded trace replays to the live counters (same cache protocol, warm start as load).
    stats = sum(replay_stats(load_trace(trace_file), "markov", 1, 8, warm=True).values(), CacheStats())
    assert (stats.hits, stats.misses) == (live["hits"], live["misses"])


def test_published_switch_configs_plan_offline():
    """`offload-moe plan google/switch-c-2048 --gpu-memory 24GiB`: 2048 experts in each of the 15
    encoder blocks (its config's 12 decoder blocks and 15 sparse ones make transformers build a
    dense decoder); hqq4's groups of 64 do not divide d_model 2080, so the default plans the
    experts 16-bit, as load would keep them."""
    from offload_moe.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["plan", "google/switch-c-2048", "--gpu-memory", "24GiB", "--cpu-memory", "64GiB", "--json"]) == 0
    plan = json.loads(out.getvalue())
    assert plan["model_type"] == "switch_transformers"
    assert plan["experts"] == {"format": "bf16", "bytes_per_expert": 2 * 2080 * 6144 * 2, "per_layer": 2048,
                               "per_token": 1, "moe_layers": 15}
    assert plan["stacks"] == {"encoder": {"moe_layers": 15, "layer_keys": list(range(15))}}
    assert plan["device"]["slots_per_layer"] >= 1 and plan["host"]["disk_expert_bytes"] > 0
    assert plan["bytes_moved_per_token"] == 0  # the decoder, which generates, has no experts
    base = plan_model(published_config("google/switch-base-128"), "hqq4", 24 * 2**30, 2**36, 4096)
    assert (base.moe_layers, base.num_experts, base.stacks["decoder"]) == (12, 128, [13, 15, 17, 19, 21, 23])
