"""Shared fixtures: tiny random checkpoints written once per test session; no network, ever."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from offload_moe.testing import make_tiny_checkpoint


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_fp32(tmp_path_factory):
    """A 2-shard float32 tiny Mixtral checkpoint."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_fp32"), seed=0, num_shards=2)


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory):
    """A single-file bfloat16 tiny Mixtral checkpoint."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_bf16"), seed=1, dtype=torch.bfloat16)
