"""Experts memory-mapped from disk when they exceed the host-RAM budget (cpu_memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import offload_moe
from offload_moe.conversion import convert
from offload_moe.runtime.disk_store import META_NAME, open_mapped_store, store_key_fields
from offload_moe.errors import ConfigError
from offload_moe.planning.planner import plan_model
from offload_moe.runtime.store import ExpertLayout
from offload_moe.testing import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
IDS = torch.arange(1, 40)[None]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("disk_src"), seed=7, num_shards=2, num_hidden_layers=3)


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
    return convert(src, tmp_path_factory.mktemp("disk_conv") / "hqq4", experts="hqq4", progress=False)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_MOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def logits(llm) -> torch.Tensor:
    with torch.no_grad():
        return llm.model(IDS).logits


def store_files(folder: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime_ns) of every file of a store folder."""
    return {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in sorted(folder.iterdir())}


def test_budget_below_expert_bytes_maps_the_store_and_keeps_logits(src, cache):
    in_ram = offload_moe.load(src, slots_per_layer=3, progress=False)
    budget = in_ram.runtime.store.nbytes - 1
    mapped = offload_moe.load(src, slots_per_layer=3, cpu_memory=budget, progress=False)
    store = mapped.runtime.store
    assert not in_ram.runtime.store.mapped and store.mapped
    assert store.backing_dir.parent.parent == cache / "stores"  # an HF checkpoint is not written into
    assert sorted(p.name for p in store.backing_dir.iterdir()) == [f"layer-0000{i}.bin" for i in range(3)] + [META_NAME]
    assert torch.equal(logits(in_ram), logits(mapped))
    # Generation too, with misses copied from the mapping (3 of 8 slots).
    assert torch.equal(in_ram.generate(IDS, max_new_tokens=8, do_sample=False),
                       mapped.generate(IDS, max_new_tokens=8, do_sample=False))
    assert mapped.stats()["total"]["misses"] > 0


def test_converted_dir_keeps_its_store_inside_and_the_second_load_reuses_it(converted, cache):
    in_ram = offload_moe.load(converted, slots_per_layer=8, progress=False)
    first = offload_moe.load(converted, slots_per_layer=8, cpu_memory="1KiB", progress=False)
    folder = first.runtime.store.backing_dir
    assert folder.parent == converted and folder.name.startswith("store-hqq4-")
    assert not list(converted.glob("*.partial-*"))
    before = store_files(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "rebuilding" warning
        second = offload_moe.load(converted, slots_per_layer=8, cpu_memory="1KiB", progress=False)
    assert second.runtime.store.backing_dir == folder
    assert store_files(folder) == before  # not rewritten: same inodes, same mtimes
    assert torch.equal(logits(in_ram), logits(first))
    assert torch.equal(logits(in_ram), logits(second))


def test_cpu_device_keeps_slots_within_the_budget_and_computes_from_the_mapping(converted):
    in_ram = offload_moe.load(converted, progress=False)
    expert = in_ram.runtime.store.layout.nbytes
    mapped = offload_moe.load(converted, cpu_memory=3 * 2 * expert, progress=False)  # 3 layers x 2 slots
    assert {m.cache.num_slots for m in mapped.runtime.experts.values()} == {2}
    assert mapped.runtime.hybrid is not None
    assert torch.equal(logits(in_ram), logits(mapped))
    total = mapped.stats()["total"]
    assert total["cpu_computed"] > 0 and total["bytes_copied"] == 0


def test_truncated_store_file_is_rebuilt_with_a_message(converted):
    first = offload_moe.load(converted, slots_per_layer=8, cpu_memory="1KiB", progress=False)
    reference = logits(first)
    layer_file = first.runtime.store.backing_dir / "layer-00001.bin"
    del first
    os.truncate(layer_file, layer_file.stat().st_size // 2)
    with pytest.warns(UserWarning, match=r"not reused, rebuilding.*layer-00001\.bin: \d+ bytes, expected \d+ bytes"):
        again = offload_moe.load(converted, slots_per_layer=8, cpu_memory="1KiB", progress=False)
    assert torch.equal(reference, logits(again))
    assert layer_file.stat().st_size == again.runtime.store.layout.nbytes * 8


def test_mismatched_store_metadata_or_changed_source_is_rebuilt(src, converted):
    first = offload_moe.load(converted, slots_per_layer=8, cpu_memory="1KiB", progress=False)
    folder = first.runtime.store.backing_dir
    meta = json.loads((folder / META_NAME).read_text())
    meta["key"]["int4_block_n"] = 7  # as if written on a machine whose int4 kernel lays bytes out differently
    (folder / META_NAME).write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"store\.json: int4_block_n is 7, this load needs"):
        offload_moe.load(converted, slots_per_layer=8, cpu_memory="1KiB", progress=False)
    # A source file changed after the store was built (HF checkpoint source, store in the cache).
    offload_moe.load(src, slots_per_layer=8, cpu_memory="1KiB", progress=False)
    shard = next(src.glob("*.safetensors"))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    with pytest.warns(UserWarning, match="built from other source files"):
        offload_moe.load(src, slots_per_layer=8, cpu_memory="1KiB", progress=False)


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path):
    layout = ExpertLayout.dense(8, 16, torch.float32)
    key = store_key_fields(layout, [0, 1], 4, format="float32")

    def fail(store):
        store.buffer(0, 0).fill_(1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        open_mapped_store(tmp_path, layout, [0, 1], 4, key, {"path": "x", "files": {}}, fail)
    assert list(tmp_path.iterdir()) == []
    built = open_mapped_store(tmp_path, layout, [0, 1], 4, key, {"path": "x", "files": {}},
                              lambda store: store.buffer(1, 3).fill_(7))
    assert built.mapped and int(built.buffer(1, 3)[0]) == 7 and int(built.buffer(0, 0)[0]) == 0
    reused = open_mapped_store(tmp_path, layout, [0, 1], 4, key, {"path": "x", "files": {}}, fail)  # no fill
    assert int(reused.buffer(1, 3)[-1]) == 7


@pytest.mark.parametrize("experts", ["hqq4", "hqq2"])
def test_plan_and_load_agree_on_when_experts_spill(src, experts):
    config = offload_moe.checkpoint.reader.Checkpoint(src).load_config()
    store_bytes = offload_moe.load(src, experts=experts, slots_per_layer=1, progress=False).runtime.store.nbytes
    for budget in (store_bytes - 1, store_bytes):
        plan = plan_model(config, experts, 2**40, budget, 64)
        llm = offload_moe.load(src, experts=experts, slots_per_layer=1, cpu_memory=budget, progress=False)
        assert (plan.disk_expert_bytes > 0) == llm.runtime.store.mapped == (budget < store_bytes)
        assert plan.host_expert_bytes + plan.disk_expert_bytes == store_bytes


def test_bad_cpu_memory_is_refused_before_loading(src):
    with pytest.raises(ConfigError, match=r"cpu_memory='lots' is not a size"):
        offload_moe.load(src, cpu_memory="lots", progress=False)
    with pytest.raises(ConfigError, match=r"cpu_memory=-5 must be positive"):
        offload_moe.load(src, cpu_memory=-5, progress=False)


def test_cli_option_and_environment_variable(src, cache):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_MOE_")}
    env.update(HF_HUB_OFFLINE="1", OFFLOAD_MOE_CACHE=str(cache), OFFLOAD_MOE_CPU_MEMORY="1KiB")
    run = lambda *extra: subprocess.run(  # noqa: E731
        [sys.executable, str(ROOT / "cli.py"), "generate", str(src), "--prompt", "hi", "--max-new-tokens", "2",
         "--json", *extra], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    res = run()
    assert res.returncode == 0, res.stderr
    assert len(list(cache.glob("stores/*/store-*/layer-*.bin"))) == 3
    bad = run("--cpu-memory", "lots")
    assert bad.returncode != 0 and "cpu_memory='lots' is not a size" in bad.stderr and "Traceback" not in bad.stderr
