"""Bad input gets one clear error naming the file and key, before any weights are read."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import offload_moe
from offload_moe.checkpoint.reader import Checkpoint
from offload_moe.errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from offload_moe.testing import make_tiny_checkpoint


@pytest.fixture
def sharded(tmp_path):
    return make_tiny_checkpoint(tmp_path / "ckpt", num_shards=2)


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fail the test if a validation error were only found after reading weights."""

    def forbidden(self, name):
        raise AssertionError(f"read {name} before validation finished")

    monkeypatch.setattr(Checkpoint, "read", forbidden)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        offload_moe.load(tmp_path / "nowhere", progress=False)


def test_missing_config(sharded, no_weight_reads):
    os.remove(sharded / "config.json")
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        offload_moe.load(sharded, progress=False)


def test_missing_shard(sharded, no_weight_reads):
    os.remove(sharded / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: shard file is missing"):
        offload_moe.load(sharded, progress=False)


def test_truncated_shard(sharded, no_weight_reads):
    shard = sharded / "model-00001-of-00002.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors: truncated"):
        offload_moe.load(sharded, progress=False)


def test_shard_cut_inside_its_header(sharded, no_weight_reads):
    shard = sharded / "model-00001-of-00002.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(20)
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors: truncated"):
        offload_moe.load(sharded, progress=False)


def _rewrite(path, shard_name, edit):
    tensors = load_file(str(path / shard_name))
    edit(tensors)
    save_file(tensors, str(path / shard_name), metadata={"format": "pt"})
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard_name or k in tensors}
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize(
    "key",
    ["model.layers.1.block_sparse_moe.experts.3.w2.weight", "model.layers.0.self_attn.q_proj.weight"],
)
def test_wrong_shape(sharded, no_weight_reads, key):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][key]

    def edit(tensors):
        tensors[key] = torch.zeros(3, 5)

    _rewrite(sharded, shard, edit)
    with pytest.raises(CheckpointError, match=rf"{shard}: tensor '{key}' has shape \[3, 5\], expected"):
        offload_moe.load(sharded, progress=False)


def test_missing_tensor(sharded, no_weight_reads):
    key = "model.layers.0.block_sparse_moe.experts.7.w3.weight"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    _rewrite(sharded, index["weight_map"][key], lambda tensors: tensors.pop(key))
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' is missing"):
        offload_moe.load(sharded, progress=False)


def test_unsupported_architecture(sharded, no_weight_reads):
    config = json.loads((sharded / "config.json").read_text())
    config["model_type"] = "llama"
    (sharded / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match=r"config\.json: model_type 'llama' is not supported"):
        offload_moe.load(sharded, progress=False)


def test_not_a_model_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="is not a Hugging Face model directory"):
        offload_moe.load(tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="not a directory"):
        offload_moe.load(tmp_path / "notes.txt", progress=False)


def test_index_naming_a_tensor_its_shard_lacks(sharded, no_weight_reads):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.extra.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="index lists tensor 'model.extra.weight'"):
        offload_moe.load(sharded, progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"slots_per_layer": 0}, "slots_per_layer=0"),
        ({"device": "tpu"}, "device='tpu'"),
        ({"dtype": "int3"}, "dtype='int3'"),
        ({"policy": "fifo"}, "policy='fifo'"),
    ],
)
def test_bad_settings(tmp_path, kwargs, message):
    path = make_tiny_checkpoint(tmp_path / "ok")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        offload_moe.load(path, progress=False, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal of device='cuda'")
def test_cuda_asked_without_cuda(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "ok")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        offload_moe.load(path, device="cuda", progress=False)
