"""The user-facing API: load(), generate() for text and ids, stats(), device memory use."""

from __future__ import annotations

import warnings

import pytest
import torch

import offload_moe
from offload_moe.runtime.store import ExpertLayout, ExpertStore, HostArena


def test_generate_text_ids_and_hf_generate(tiny_fp32):
    llm = offload_moe.load(tiny_fp32, slots_per_layer=3, progress=False)
    assert llm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    text = llm.generate("Hello", max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert isinstance(text, str) and len(text) > 0
    ids = llm.tokenizer("Hello", return_tensors="pt").input_ids.to(llm.device)
    out = llm.generate(ids[0].tolist(), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert isinstance(out, torch.Tensor) and out.shape == (1, ids.shape[1] + 8)
    assert llm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == text
    # The transformers model's own generate() runs through the offloaded experts too.
    assert torch.equal(llm.model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False), out)


def test_stats_layout_and_reset(tiny_fp32):
    llm = offload_moe.load(tiny_fp32, slots_per_layer=2, progress=False)
    llm.generate(torch.arange(1, 30), max_new_tokens=4, do_sample=False)
    stats = llm.stats()
    assert [row["layer"] for row in stats["layers"]] == [0, 1]
    for row in stats["layers"]:
        assert set(row) >= {"hits", "misses", "hit_rate", "bytes_copied", "slots"}
        assert row["hit_rate"] == pytest.approx(row["hits"] / (row["hits"] + row["misses"]))
    assert stats["total"]["misses"] > 0
    llm.reset_stats()
    assert llm.stats()["total"]["hits"] == llm.stats()["total"]["misses"] == 0


def test_experts_live_in_host_store_and_device_holds_only_slots(tiny_fp32):
    llm = offload_moe.load(tiny_fp32, slots_per_layer=3, progress=False)
    assert not [n for n, _ in llm.model.named_parameters() if "experts" in n]
    layout = llm.runtime.store.layout
    config = llm.model.config
    assert layout.nbytes >= 3 * config.hidden_size * config.intermediate_size * 4
    assert llm.stats()["device_expert_bytes"] == config.num_hidden_layers * 3 * layout.nbytes
    assert llm.stats()["host_expert_bytes"] == config.num_hidden_layers * config.num_local_experts * layout.nbytes
    for module in llm.runtime.experts.values():
        assert module.pool.buffers.shape == (3, layout.nbytes)


def test_all_experts_fit_by_default(tiny_bf16):
    llm = offload_moe.load(tiny_bf16, progress=False)
    assert llm.config.dtype == torch.bfloat16  # the checkpoint's dtype
    llm.generate(torch.arange(1, 20), max_new_tokens=4, do_sample=False)
    assert llm.stats()["total"]["misses"] == 0
    assert llm.stats()["total"]["hit_rate"] == 1.0


def test_dtype_override(tiny_bf16):
    llm = offload_moe.load(tiny_bf16, dtype="float32", slots_per_layer=2, progress=False)
    assert next(llm.model.parameters()).dtype == torch.float32
    assert llm.runtime.store.layout.fields[0].dtype == torch.float32


def test_store_buffers_are_contiguous_per_expert():
    layout = ExpertLayout.dense(hidden=8, intermediate=24, dtype=torch.bfloat16)
    assert [f.offset % 64 for f in layout.fields] == [0, 0]
    store = ExpertStore(layout, layers=[0, 2], num_experts=4)
    buf = store.buffer(2, 3)
    assert buf.is_contiguous() and buf.numel() == layout.nbytes
    views = store.views(2, 3)
    views["down"].fill_(1.5)
    assert views["down"].data_ptr() >= buf.data_ptr()
    assert store.views(2, 3)["down"].float().sum() == 1.5 * 8 * 24


class FakePinner:
    """Records what the store pins and unpins; fails when told to."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.registered: list[tuple[int, int]] = []
        self.unregistered: list[int] = []

    def register(self, buffer):
        if self.fail:
            raise RuntimeError("no page-locked memory left")
        self.registered.append((buffer.data_ptr(), buffer.numel()))

    def unregister(self, buffer):
        self.unregistered.append(buffer.data_ptr())


def test_store_pins_one_arena_of_exactly_its_size():
    layout = ExpertLayout.dense(hidden=8, intermediate=24, dtype=torch.bfloat16)
    pinner = FakePinner()
    store = ExpertStore(layout, layers=[0, 2, 5], num_experts=4, pin=True, pinner=pinner)
    assert store.pinned
    ((ptr, size),) = pinner.registered  # one registration for the whole store, no rounding
    assert size == store.nbytes == 3 * 4 * layout.nbytes
    starts = sorted(store.buffer(layer, 0).data_ptr() for layer in store.layers)
    assert starts == [ptr + i * 4 * layout.nbytes for i in range(3)]  # per-layer views of it, back to back
    store.views(2, 3)["down"].fill_(0.0)
    store.views(5, 3)["down"].fill_(2.0)
    assert store.views(2, 3)["down"].abs().sum() == 0  # disjoint
    store.release()
    assert pinner.unregistered == [ptr] and not store.pinned


def test_pinning_falls_back_to_pageable_with_a_warning():
    layout = ExpertLayout.dense(hidden=8, intermediate=24, dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = ExpertStore(layout, layers=[0], num_experts=2, pin=True, pinner=FakePinner(fail=True))
    assert not store.pinned and store.buffer(0, 1).numel() == layout.nbytes
    assert any("could not pin" in str(w.message) and "no page-locked memory" in str(w.message) for w in caught)


@pytest.mark.skipif(torch.cuda.is_available(), reason="pinning works where CUDA is present")
def test_default_pinner_without_cuda_warns():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        arena = HostArena([16, 32], pin=True)
    assert not arena.pinned and [p.numel() for p in arena.parts] == [16, 32]
    assert any("could not pin" in str(w.message) for w in caught)


def test_repr_names_the_settings(tiny_fp32):
    llm = offload_moe.load(tiny_fp32, slots_per_layer=2, progress=False)
    assert "slots_per_layer=2" in repr(llm) and "markov" in repr(llm)


def test_generate_leaves_the_callers_tokenizer_as_it_found_it(tiny_fp32):
    llm = offload_moe.load(tiny_fp32, slots_per_layer=2, progress=False)
    tok = llm.tokenizer
    tok.padding_side, tok.pad_token = "right", None
    replies = llm.generate(["Hello", "Hello there world"], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert len(replies) == 2
    assert tok.padding_side == "right" and tok.pad_token is None


def test_close_releases_the_runtime_and_with_closes_it(tiny_fp32, tmp_path):
    trace = tmp_path / "run.jsonl"
    with offload_moe.load(tiny_fp32, slots_per_layer=2, record_routing=trace, progress=False) as llm:
        llm.generate(torch.arange(1, 10), max_new_tokens=2, do_sample=False)
        runtime = llm.runtime
        assert runtime.store.nbytes > 0 and runtime.device_expert_bytes > 0
    assert runtime.recorder._file.closed and trace.stat().st_size > 0
    assert runtime.store.nbytes == 0 and runtime.device_expert_bytes == 0  # host store and slots dropped
    assert all(not module.host_views for module in runtime.experts.values())
    with pytest.raises(RuntimeError):
        runtime.engine.copy(torch.zeros(1), torch.zeros(1)).wait()  # the copy worker has stopped
    llm.close()  # a second close is harmless


def test_chat_session_turns_print_no_deprecation_warning(tiny_fp32):
    """transformers 5.24 renamed generate()'s past_key_values to cache: chat passes the new name."""
    llm = offload_moe.load(tiny_fp32, slots_per_layer=2, progress=False)
    session = llm.chat_session()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for text in ("Hi", "And again"):
            session.send(text, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert session.cache.get_seq_length() > 0
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


def test_record_routing_into_a_missing_folder_is_refused_before_loading(tiny_fp32, tmp_path, monkeypatch):
    from offload_moe.checkpoint.reader import Checkpoint
    from offload_moe.errors import ConfigError

    def forbidden(self, name):
        raise AssertionError(f"read {name} before refusing the routing path")

    monkeypatch.setattr(Checkpoint, "read", forbidden)
    missing = tmp_path / "nowhere" / "run.jsonl"
    with pytest.raises(ConfigError, match=rf"record_routing='{missing}': folder '{missing.parent}' does not exist"):
        offload_moe.load(tiny_fp32, record_routing=missing, progress=False)
