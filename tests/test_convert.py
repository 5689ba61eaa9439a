"""Conversion to a quantized, versioned directory, and loading it back without re-quantizing."""

from __future__ import annotations

import json

import pytest
import torch

import offload_moe
from offload_moe.checkpoint.converted import MANIFEST_NAME, expert_file_name
from offload_moe.conversion import convert
from offload_moe.errors import CheckpointError, ConfigError
from offload_moe.testing import make_tiny_checkpoint

from offload_moe.checkpoint import converted as converted_module


@pytest.fixture
def src(tmp_path):
    return make_tiny_checkpoint(tmp_path / "src", seed=4, num_shards=2, num_hidden_layers=3)


def test_converted_directory_loads_to_the_same_numbers(src, tmp_path):
    dst = convert(src, tmp_path / "dst", experts="hqq4", progress=False)
    manifest = json.loads((dst / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == 1
    assert manifest["experts"] == {"format": "hqq4", "bits": 4, "group_size": 64, "method": "rtn"}
    assert manifest["source"]["shards"] and len(manifest["source"]["config_sha256"]) == 64
    assert sorted(p.name for p in dst.glob("experts-*.safetensors")) == [expert_file_name(i) for i in range(3)]
    assert not list(tmp_path.glob("*.partial-*"))
    on_the_fly = offload_moe.load(src, experts="hqq4", slots_per_layer=3, progress=False)
    converted = offload_moe.load(dst, slots_per_layer=3, progress=False)
    assert converted.runtime.experts[0].fmt.name == "hqq4"
    ids = torch.arange(1, 30)[None]
    with torch.no_grad():
        assert torch.equal(on_the_fly.model(ids).logits, converted.model(ids).logits)
    assert converted.tokenizer is not None
    with pytest.raises(ConfigError, match="converted with experts='hqq4', not 'nf4'"):
        offload_moe.load(dst, experts="nf4", progress=False)


def test_refusals_come_before_any_work(src, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        convert(src, tmp_path / "taken", progress=False)
    with pytest.raises(ConfigError, match="unknown quantization format 'int3'"):
        convert(src, tmp_path / "x", experts="int3", progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        convert(tmp_path / "nowhere", tmp_path / "y", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "taken"]


def test_interrupted_conversion_leaves_nothing_that_looks_complete(src, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = converted_module.quantize_expert

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(converted_module, "quantize_expert", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "dst", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_damaged_converted_directory_is_named(src, tmp_path):
    dst = convert(src, tmp_path / "dst", experts="hqq3", progress=False)
    layer_file = dst / expert_file_name(1)
    with open(layer_file, "r+b") as f:
        f.truncate(layer_file.stat().st_size - 10)
    with pytest.raises(CheckpointError, match=rf"{expert_file_name(1)}: truncated"):
        offload_moe.load(dst, progress=False)
    manifest = json.loads((dst / MANIFEST_NAME).read_text())
    manifest["format_version"] = 99
    (dst / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format_version 99"):
        offload_moe.load(dst, progress=False)
