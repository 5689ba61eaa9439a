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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models (hidden 64): one intra-op thread computes them as fast as two, and is not
    stalled by a busy machine. With two threads every bf16 matmul and convolution (oneDNN)
    opens an OpenMP parallel region even at 16 x 64; when another process holds a core, each
    waits for its second thread to be scheduled, and a test that runs ~10^5 of them (jamba-bf16,
    deepseek_v3-bf16) took minutes instead of seconds. Reference and offloaded model run with
    the same thread count, so the exactness asserted is the same. A module uses it with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
