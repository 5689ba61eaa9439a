"""NLLB-MoE (issue 14): every sparse layer of encoder and decoder offloaded, exact against an
independent reference of the intended equation.

transformers 5.24's NllbMoeExperts.forward one-hot encodes the router's [T, E] 0/1 top-1 mask, so
only expert_0 and expert_1 ever run; offload_moe computes what the model means (transformers
4.x's and fairseq's NLLB-MoE). The reference here is the transformers model for everything but
the experts: a forward hook on each router keeps its combine weights [T, E], and a forward hook
on each experts module replaces its output by, written out in plain PyTorch from the
checkpoint's own tensors,

    out[t] = sum over experts e with combine[t, e] != 0, ascending, of
             (fc2(relu(fc1(x[t]))) * combine[t, e]) * (1 - moe_token_dropout)

(nn.Linear's biases in fc1/fc2; eval, so no dropout). The tiny model's eval capacity (half the
call's tokens per expert) makes the router drop tokens of the 24-token source, so some tokens
have two experts, some one, some none.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from logits_util import assert_quantized_logits_close
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
from transformers.activations import ACT2FN

import offload_moe
from offload_moe.errors import ConfigError, UnsupportedArchitectureError
from offload_moe.model.arch import ExpertsKind, describe_model
from offload_moe.planning.planner import plan_model
from offload_moe.quant.quantize import dequantize, quantize
from offload_moe.testing import TINY_LANGUAGE_CODES, make_tiny_checkpoint, tiny_config

SOURCE = torch.tensor([[17, 200, 45, 99, 3, 250, 61, 7, 128, 33, 310, 90, 12, 5, 77, 41, 42, 43, 180, 181, 66, 9, 23, 2]])
DECODER = torch.tensor([[2, 55, 120, 7, 300, 18]])  # starts with decoder_start_token_id (2, </s>)
PROMPT = "the house is wonderful and the garden is green."


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def nllb(tmp_path_factory):
    return {dtype: make_tiny_checkpoint(tmp_path_factory.mktemp(f"nllb-{str(dtype)[6:]}"), arch="nllb_moe",
                                        dtype=dtype, num_shards=2)
            for dtype in (torch.float32, torch.bfloat16)}


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def intended_experts(x, combine, experts, act, scale):
    """The equation of the module docstring; `experts` [(fc1.weight, fc1.bias, fc2.weight, fc2.bias)]."""
    out = torch.zeros_like(x)
    for e, (w1, b1, w2, b2) in enumerate(experts):
        rows = (combine[:, e] != 0).nonzero().squeeze(-1)
        if rows.numel() == 0:
            continue
        y = F.linear(act(F.linear(x[rows], w1, b1)), w2, b2) * combine[rows, e, None]
        if scale is not None:
            y = y * scale
        out.index_add_(0, rows, y.to(out.dtype))
    return out


def reference(path, dtype=torch.float32, intended=True, round_trip=None, routed=None):
    """The transformers model; `intended`: its experts' outputs replaced by the intended equation
    (forward hooks), with each expert matrix passed through `round_trip` if given; `routed`
    collects (layer, number of experts per token) of every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype).eval()
    for param in model.parameters():
        param.data = param.data.clone()  # 64-byte aligned, as tests/test_architectures.py explains
    if not intended:
        return model
    config, disk = model.config, checkpoint_tensors(Path(path))
    act = ACT2FN[config.activation_function]
    scale = 1 - config.moe_token_dropout if config.moe_token_dropout > 0 else None
    matrix = round_trip or (lambda w: w)
    for name, module in model.named_modules():
        if not name.endswith("ffn.experts"):
            continue
        experts = []
        for e in range(config.num_experts):
            fc1, fc2 = (f"{name}.expert_{e}.{linear}" for linear in ("fc1", "fc2"))
            experts.append((matrix(disk[f"{fc1}.weight"]), disk[f"{fc1}.bias"], matrix(disk[f"{fc2}.weight"]),
                            disk[f"{fc2}.bias"]))
        captured = {}

        def keep(router, args, output, captured=captured):
            captured["combine"] = output[1]  # (top_1_mask, combine weights, logits)

        def replace(module, args, output, captured=captured, experts=experts, name=name):
            combine = captured.pop("combine")
            assert args[2] is combine  # the weights the sparse MLP hands its experts
            if routed is not None:
                routed.append((name, (combine != 0).sum(dim=-1).tolist()))
            return intended_experts(args[0], combine, experts, act, scale)

        model.get_submodule(name.rpartition(".")[0] + ".router").register_forward_hook(keep)
        module.register_forward_hook(replace)
    return model


def test_describes_both_stacks(nllb):
    spec = describe_model(reference(nllb[torch.float32], intended=False))
    assert spec.kind is ExpertsKind.DENSE_ACT_DENSE and spec.top_k == 2 and not spec.gated
    assert spec.combine_routing and spec.expert_bias and spec.linears == ("fc1", "fc2")
    assert spec.output_scale == pytest.approx(0.8)
    assert spec.stack_layers() == {"encoder": [1, 3], "decoder": [5, 7]}
    assert [layer.router_path for layer in spec.layers] == [
        "model.encoder.layers.1.ffn.router.classifier", "model.encoder.layers.3.ffn.router.classifier",
        "model.decoder.layers.1.ffn.router.classifier", "model.decoder.layers.3.ffn.router.classifier"]
    assert {name: shape for name, shape, _ in spec.dense_fields(torch.float32)} == {
        "gate_up": (128, 64), "gate_up_bias": (128,), "down": (64, 128), "down_bias": (64,)}


def test_changed_experts_forward_is_refused(nllb):
    """A NllbMoeExperts whose forward is not the checked 5.24 one is refused by name."""
    from transformers.models.nllb_moe import modeling_nllb_moe

    class NllbMoeExperts(modeling_nllb_moe.NllbMoeExperts):
        def forward(self, hidden_states, router_mask, router_probs):
            return hidden_states

    model = reference(nllb[torch.float32], intended=False)
    for name, module in model.named_modules():
        if name.endswith("ffn.experts"):
            module.__class__ = NllbMoeExperts
    with pytest.raises(UnsupportedArchitectureError, match="NllbMoeExperts's eager forward is not transformers 5.24's"):
        describe_model(model)


def test_transformers_forward_is_not_the_intended_one(nllb):
    """Why offload_moe does not match transformers 5.24's own forward: it runs only experts 0
    and 1, and its logits differ from the intended equation's."""
    path = nllb[torch.float32]
    ran = set()
    buggy = reference(path, intended=False)
    for name, module in buggy.named_modules():
        if name.rpartition(".")[0].endswith(".experts"):
            module.register_forward_hook(lambda m, a, o, name=name: ran.add(name.rpartition(".")[2]))
    with torch.no_grad():
        wrong = buggy(input_ids=SOURCE, decoder_input_ids=DECODER).logits
        right = reference(path)(input_ids=SOURCE, decoder_input_ids=DECODER).logits
    assert ran == {"expert_0", "expert_1"}
    assert not torch.allclose(wrong, right, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_exact_for_every_slot_count(nllb, dtype):
    path = nllb[dtype]
    routed = []
    ref = reference(path, dtype, routed=routed)
    with torch.no_grad():
        want_logits = ref(input_ids=SOURCE, decoder_input_ids=DECODER).logits
    counts = [n for _, per_token in routed for n in per_token]
    assert {0, 1, 2} <= set(counts), "capacity should leave tokens with two, one and no experts"
    assert {name.split(".")[1] for name, _ in routed} == {"encoder", "decoder"}
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


def _hqq4(weight: torch.Tensor) -> torch.Tensor:
    return dequantize(quantize(weight.float(), "hqq4", optimize=False), torch.float32)


def test_quantized_converted_and_plan(nllb, tmp_path):
    """hqq4 experts (biases kept at 32 bits; 3 slots, prefetch, hybrid) against the intended
    reference with hqq4 round-tripped expert matrices, within the Switch test's tolerance; a
    converted directory reloads to the same logits; the planner counts both stacks."""
    path = nllb[torch.float32]
    with torch.no_grad():
        want = reference(path, round_trip=_hqq4)(input_ids=SOURCE, decoder_input_ids=DECODER).logits
    llm = offload_moe.load(path, device="cpu", experts="hqq4", slots_per_layer=3, prefetch_top_n=1, hybrid=True,
                           progress=False)
    assert {"gate_up_bias", "down_bias"} <= {f.name for f in llm.runtime.store.layout.fields}
    with torch.no_grad():
        got = llm.model(input_ids=SOURCE, decoder_input_ids=DECODER).logits
    assert_quantized_logits_close(want, got, "nllb_moe")
    llm.generate(SOURCE, max_new_tokens=8, do_sample=False)
    assert llm.stats()["total"]["cpu_computed"] > 0

    converted = offload_moe.convert(path, tmp_path / "hqq4", experts="hqq4", progress=False)
    reloaded = offload_moe.load(converted, device="cpu", slots_per_layer=3, progress=False)
    with torch.no_grad():
        assert torch.equal(reloaded.model(input_ids=SOURCE, decoder_input_ids=DECODER).logits, got)

    plan = plan_model(tiny_config("nllb_moe"), "hqq4", gpu_memory=2**30, cpu_memory=2**30, context=256)
    assert plan.moe_layers == 4 and plan.num_experts == 8 and plan.experts_per_token == 2
    assert plan.stacks == {"encoder": [1, 3], "decoder": [5, 7]} and plan.decode_layers == 2


def test_published_plan_offline():
    """`offload-moe plan facebook/nllb-moe-54b --gpu-memory 24GiB`, without a download: 128
    experts every 4th layer of both 24-layer stacks, top-2, fc1/fc2 with biases."""
    from offload_moe.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["plan", "facebook/nllb-moe-54b", "--gpu-memory", "24GiB", "--cpu-memory", "64GiB", "--json"]) == 0
    plan = json.loads(out.getvalue())
    assert plan["model_type"] == "nllb-moe"
    assert plan["experts"]["per_layer"] == 128 and plan["experts"]["per_token"] == 2
    assert plan["experts"]["moe_layers"] == 12
    assert plan["stacks"] == {"encoder": {"moe_layers": 6, "layer_keys": [3, 7, 11, 15, 19, 23]},
                              "decoder": {"moe_layers": 6, "layer_keys": [27, 31, 35, 39, 43, 47]}}
    assert plan["device"]["slots_per_layer"] >= 1
    text = io.StringIO()
    with redirect_stdout(text):
        assert main(["plan", "facebook/nllb-moe-54b", "--gpu-memory", "24GiB"]) == 0
    assert "encoder" in text.getvalue() and "decoder" in text.getvalue()


def test_routing_trace_keeps_stacks_apart(nllb, tmp_path):
    from offload_moe.planning.replay import load_trace, replay_stats
    from offload_moe.runtime.cache import CacheStats

    trace_file = tmp_path / "routing.jsonl"
    llm = offload_moe.load(nllb[torch.float32], device="cpu", slots_per_layer=1, record_routing=trace_file,
                           progress=False)
    llm.generate(SOURCE, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    live = llm.stats()["total"]
    llm.close()
    rows = [json.loads(line) for line in trace_file.read_text().splitlines()]
    by_stack = {s: {r["layer"] for r in rows if r["stack"] == s} for s in ("encoder", "decoder")}
    assert by_stack == {"encoder": {1, 3}, "decoder": {5, 7}}
    encoder_rows = [r for r in rows if r["stack"] == "encoder"]
    assert len(encoder_rows) == 2 * SOURCE.shape[1] and {r["phase"] for r in encoder_rows} == {"prefill"}
    assert {len(r["experts"]) for r in encoder_rows} == {0, 1, 2}  # capacity dropped some, never id 8
    assert all(r["experts"] == sorted(r["experts"]) and all(e < 8 for e in r["experts"]) for r in rows)
    assert len([r for r in rows if r["stack"] == "decoder"]) == 2 * 6
    stats = sum(replay_stats(load_trace(trace_file), "markov", 1, 8, warm=True).values(), CacheStats())
    assert (stats.hits, stats.misses) == (live["hits"], live["misses"])


SAMPLED = dict(do_sample=True, temperature=1.0, top_p=1.0, repetition_penalty=1.0)  # as the CLI's --temperature 1


def _want_translation(path, src_lang, tgt_lang, tokens=20):
    """The reference's reply, sampled with seed 0 (a random tiny model's greedy reply repeats one
    token; samples from bit-equal logits with the same seed are equal too)."""
    ref, tok = reference(path), AutoTokenizer.from_pretrained(path)
    tok.src_lang = src_lang
    inputs = tok(PROMPT, return_tensors="pt")
    assert inputs["input_ids"][0, 0] == tok.convert_tokens_to_ids(src_lang)  # NLLB: the code starts the source
    forced = tok.convert_tokens_to_ids(tgt_lang)
    torch.manual_seed(0)
    out = ref.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, forced_bos_token_id=forced, **SAMPLED)
    assert out[0, 1] == forced
    return tok.decode(out[0], skip_special_tokens=True)


def test_translate_with_language_codes(nllb, monkeypatch):
    path = nllb[torch.float32]
    want = _want_translation(path, "fra_Latn", "deu_Latn")  # fra_Latn: not the tokenizer's default source
    assert len(set(want)) > 3
    llm = offload_moe.load(path, device="cpu", slots_per_layer=2, progress=False)
    sources = []  # the first token of every source the encoder gets: its language code
    llm.model.get_encoder().register_forward_pre_hook(
        lambda module, args, kwargs: sources.append(int(kwargs["input_ids"][0, 0])), with_kwargs=True)
    kwargs = dict(max_new_tokens=20, min_new_tokens=20, src_lang="fra_Latn", tgt_lang="deu_Latn", **SAMPLED)
    torch.manual_seed(0)
    assert llm.generate(PROMPT, **kwargs) == want
    torch.manual_seed(0)
    assert "".join(llm.stream(PROMPT, **kwargs)) == want
    assert sources == [llm.tokenizer.convert_tokens_to_ids("fra_Latn")] * 2
    assert llm.tokenizer.src_lang == TINY_LANGUAGE_CODES[0]  # the caller's tokenizer is put back
    with pytest.raises(ConfigError, match="tgt_lang='xyz_Latn' is not one of the tokenizer's language codes"):
        llm.generate(PROMPT, src_lang="eng_Latn", tgt_lang="xyz_Latn")
    with pytest.raises(ConfigError, match="src_lang='deu' is not one"):
        list(llm.stream(PROMPT, src_lang="deu", tgt_lang="deu_Latn"))
    with pytest.raises(ConfigError, match="src_lang='eng_Latn' applies to a text prompt"):
        llm.generate(SOURCE, src_lang="eng_Latn")

    from offload_moe.cli import main

    argv = ["generate", str(path), "--prompt", PROMPT, "--max-new-tokens", "20", "--ignore-eos", "--device", "cpu",
            "--slots", "1", "--temperature", "1", "--seed", "0"]
    out = io.StringIO()
    with redirect_stdout(out):
        assert main([*argv, "--src-lang", "fra_Latn", "--tgt-lang", "deu_Latn"]) == 0
    assert out.getvalue() == want + "\n"
    monkeypatch.setitem(os.environ, "OFFLOAD_MOE_SRC_LANG", "fra_Latn")
    monkeypatch.setitem(os.environ, "OFFLOAD_MOE_TGT_LANG", "deu_Latn")
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(argv) == 0
    assert out.getvalue() == want + "\n"
    assert main([*argv, "--tgt-lang", "deu"]) == 2  # refused, naming the code


def test_language_codes_refused_without_them(tmp_path):
    """A model whose tokenizer has no language codes (Switch) refuses src_lang/tgt_lang."""
    path = make_tiny_checkpoint(tmp_path / "switch", arch="switch_transformers")
    llm = offload_moe.load(path, device="cpu", slots_per_layer=2, progress=False)
    with pytest.raises(ConfigError, match="tgt_lang='deu_Latn'.*no language codes"):
        llm.generate("translate English to German: hi", tgt_lang="deu_Latn", max_new_tokens=2)
    with pytest.raises(ConfigError, match="src_lang='eng_Latn'.*no language codes"):
        list(llm.stream("hi", src_lang="eng_Latn", max_new_tokens=2))
