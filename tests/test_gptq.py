"""GPTQ (auto-gptq layout) reading: unpacking, exact conversion to our affine format, errors,
and a fixture written by auto-gptq 0.7.1's own packer (tests/data/make_autogptq_fixture.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from offload_moe.quant import matmul as qkernels
from offload_moe.quant import quantize as quant
from offload_moe.checkpoint.reader import Checkpoint
from offload_moe.errors import CheckpointError
from offload_moe.checkpoint.gptq import (
    dequantize_gptq,
    gptq_to_affine,
    gptq_to_affine_permuted,
    read_gptq_config,
    read_gptq_expert,
)

from gptq_util import make_tiny_gptq_tensors  # tests/ is on sys.path (rootdir conftest, prepend mode)

class _MixtralNames:
    """Mixtral's per-expert tensor names, as a CheckpointMap gives them to the GPTQ reader."""

    @staticmethod
    def disk_expert_name(layer: int, expert: int, role: str) -> str:
        matrix = {"gate": "w1", "up": "w3", "down": "w2"}[role]
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{matrix}.weight"


MIXTRAL = _MixtralNames()
FIXTURE = Path(__file__).parent / "data" / "autogptq_fixture.safetensors"


def _weight(out_f=64, in_f=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=gen) * torch.rand(in_f, generator=gen)


def _fields(t):
    return t["qweight"], t["qzeros"], t["scales"], t["g_idx"]


@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_matches_independent_packer(bits, group, desc_act):
    t = make_tiny_gptq_tensors(_weight(seed=bits * group), bits, group, desc_act, seed=7)
    w = dequantize_gptq(*_fields(t), bits)
    assert w.dtype == torch.float32 and w.shape == (64, 256)
    assert torch.equal(w, t["dequantized"])
    if desc_act:
        assert not torch.equal(t["g_idx"].long(), torch.arange(256) // group)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_to_affine_exact_and_kernel(bits, group):
    t = make_tiny_gptq_tensors(_weight(seed=group + bits), bits, group, False, seed=3)
    w = dequantize_gptq(*_fields(t), bits)
    qt = gptq_to_affine(*_fields(t), bits, group)
    assert qt is not None and qt.fmt.bits == bits and qt.fmt.group_size == group
    assert torch.equal(quant.dequantize(qt), w)
    # round trip through our canonical packing, then the int4 CPU kernel
    fields = quant.pack(qt)
    assert torch.equal(quant.dequantize(quant.unpack(fields, qt.fmt, qt.shape)), w)
    prepared = qkernels.prepare_for_cpu(fields, qt.fmt, *qt.shape)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    y = qkernels.linear(x, prepared, qt.fmt)
    ref = x @ w.T
    assert (y - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_act_order_permuted_conversion(bits):
    group = 32
    t = make_tiny_gptq_tensors(_weight(seed=5), bits, group, True, seed=11)
    w = dequantize_gptq(*_fields(t), bits)
    assert gptq_to_affine(*_fields(t), bits, group) is None  # non-trivial g_idx
    qt, perm = gptq_to_affine_permuted(*_fields(t), bits, group)
    assert perm is not None and torch.equal(torch.sort(perm).values, torch.arange(256))
    assert torch.equal(quant.dequantize(qt), w[:, perm])
    prepared = qkernels.prepare_for_cpu(quant.pack(qt), qt.fmt, *qt.shape)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(2))
    y = qkernels.linear(x[:, perm], prepared, qt.fmt)
    ref = x @ w.T
    assert (y - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_act_order_with_identity_g_idx_converts_directly():
    # desc_act=True with static groups stores g_idx = i // group: plain conversion applies
    t = make_tiny_gptq_tensors(_weight(seed=9), 4, 64, False, seed=0)
    qt, perm = gptq_to_affine_permuted(*_fields(t), 4, 64)
    assert perm is None and qt.fmt.name == "hqq4"  # same parameters as our registered 4/64 format


def test_per_row_group_and_8bit():
    t = make_tiny_gptq_tensors(_weight(out_f=32, in_f=512, seed=4), 4, -1, False, seed=0)
    w = dequantize_gptq(*_fields(t), 4)
    assert torch.equal(w, t["dequantized"])
    qt = gptq_to_affine(*_fields(t), 4, -1)  # one group of 512 -> four groups of 128, same params
    assert qt.fmt.group_size == 128 and torch.equal(quant.dequantize(qt), w)
    t8 = make_tiny_gptq_tensors(_weight(seed=4), 8, 64, False, seed=0)
    assert gptq_to_affine(*_fields(t8), 8, 64) is None  # no 8-bit kernel: caller dequantizes


def test_g_idx_none_means_consecutive_groups():
    t = make_tiny_gptq_tensors(_weight(seed=6), 4, 64, False, seed=0)
    assert torch.equal(dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], None, 4), t["dequantized"])


def test_bad_shapes_raise():
    t = make_tiny_gptq_tensors(_weight(seed=6), 4, 64, False, seed=0)
    with pytest.raises(CheckpointError, match=r"layer\.qweight: shape \[31, 64\]"):
        dequantize_gptq(t["qweight"][:31], t["qzeros"], t["scales"], t["g_idx"], 4, name="layer")
    with pytest.raises(CheckpointError, match="bits = 5"):
        dequantize_gptq(*_fields(t), 5)


# ---------------------------------------------------------------------------------------------
# config and checkpoint reading


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_read_config_from_quantize_config(tmp_path):
    _write_json(tmp_path / "quantize_config.json", {"bits": 4, "group_size": 128, "desc_act": True, "sym": True})
    cfg = read_gptq_config(tmp_path)
    assert (cfg.bits, cfg.group_size, cfg.desc_act, cfg.sym) == (4, 128, True, True)
    assert cfg.zero_offset == 1 and cfg.source.name == "quantize_config.json"


def test_read_config_from_config_json(tmp_path):
    qc = {"quant_method": "gptq", "bits": 3, "group_size": -1, "desc_act": False, "checkpoint_format": "gptq_v2"}
    _write_json(tmp_path / "config.json", {"model_type": "mixtral", "quantization_config": qc})
    cfg = read_gptq_config(tmp_path)
    assert (cfg.bits, cfg.group_size, cfg.zero_offset) == (3, -1, 0)
    assert cfg.effective_group_size(4096) == 4096


def test_config_errors(tmp_path):
    _write_json(tmp_path / "config.json", {"model_type": "mixtral"})
    with pytest.raises(CheckpointError, match=r"config\.json: no 'quantization_config'.*quantize_config\.json is missing"):
        read_gptq_config(tmp_path)
    _write_json(tmp_path / "config.json", {"quantization_config": {"quant_method": "awq", "bits": 4}})
    with pytest.raises(CheckpointError, match="quant_method is 'awq', not 'gptq'"):
        read_gptq_config(tmp_path)
    with pytest.raises(CheckpointError, match="nowhere: does not exist"):
        read_gptq_config(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty/quantize_config\.json: missing, and so is .*empty/config\.json"):
        read_gptq_config(tmp_path / "empty")
    qc = _write_json(tmp_path / "quantize_config.json", {"bits": 5, "group_size": 128})
    with pytest.raises(CheckpointError, match=r"quantize_config\.json: bits = 5 is not supported"):
        read_gptq_config(tmp_path)
    _write_json(qc, {"group_size": 128})
    with pytest.raises(CheckpointError, match=r"quantize_config\.json: key 'bits' is missing"):
        read_gptq_config(tmp_path)
    _write_json(qc, {"bits": 4, "group_size": 128, "checkpoint_format": "marlin"})
    with pytest.raises(CheckpointError, match="checkpoint_format = 'marlin' is not supported"):
        read_gptq_config(tmp_path)


def _tiny_gptq_checkpoint(path: Path, *, break_qweight: bool = False):
    """A 1-layer, 2-expert Mixtral-named GPTQ checkpoint; returns {(expert, role): packer dict}."""
    hidden, inter, bits, group = 128, 64, 4, 32
    _write_json(path / "config.json", {"model_type": "mixtral"})
    _write_json(path / "quantize_config.json", {"bits": bits, "group_size": group, "desc_act": True, "sym": True})
    tensors, made = {}, {}
    for expert in range(2):
        for role, (out_f, in_f) in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
            t = make_tiny_gptq_tensors(_weight(out_f, in_f, seed=expert * 10 + len(role)), bits, group, True, seed=expert)
            prefix = MIXTRAL.disk_expert_name(0, expert, role)[: -len(".weight")]
            for field in ("qweight", "qzeros", "scales", "g_idx"):
                tensors[f"{prefix}.{field}"] = t[field]
            made[expert, role] = t
    if break_qweight:
        name = "model.layers.0.block_sparse_moe.experts.1.w2.qweight"
        tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, str(path / "model.safetensors"))
    return made


def test_read_gptq_expert(tmp_path):
    made = _tiny_gptq_checkpoint(tmp_path)
    ckpt = Checkpoint(tmp_path)
    cfg = read_gptq_config(tmp_path)
    for (expert, role), t in made.items():
        shape = (64, 128) if role != "down" else (128, 64)
        got = read_gptq_expert(ckpt, MIXTRAL, 0, expert, role, config=cfg, shape=shape)
        assert got.prefix.endswith({"gate": "w1", "up": "w3", "down": "w2"}[role])
        assert got.bias is None
        assert torch.equal(got.dequantize(cfg.bits, zero_offset=cfg.zero_offset), t["dequantized"])
    assert read_gptq_expert(ckpt, MIXTRAL, 0, 0, "gate").prefix == "model.layers.0.block_sparse_moe.experts.0.w1"


def test_read_gptq_expert_errors(tmp_path):
    _tiny_gptq_checkpoint(tmp_path, break_qweight=True)
    ckpt = Checkpoint(tmp_path)
    cfg = read_gptq_config(tmp_path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.block_sparse_moe\.experts\.1\.w2\.qweight' has shape \[7, 128\], expected \[8, 128\]"):
        read_gptq_expert(ckpt, MIXTRAL, 0, 1, "down", config=cfg, shape=(128, 64))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*experts\.1\.w2\.qweight: shape \[7, 128\]"):
        read_gptq_expert(ckpt, MIXTRAL, 0, 1, "down", config=cfg)  # no shape: checked from the tensors
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.block_sparse_moe\.experts\.5\.w1\.qweight' is missing"):
        read_gptq_expert(ckpt, MIXTRAL, 0, 5, "gate", config=cfg)


# ---------------------------------------------------------------------------------------------
# third-party fixture: written by auto-gptq 0.7.1 (GPTQ.fasterquant + QuantLinear.pack)

FIXTURE_CASES = [  # (name, bits, group_size, g_idx trivial)
    ("b4_g32_act", 4, 32, False),
    ("b4_g64", 4, 64, True),
    ("b4_g128_act_asym", 4, 128, True),
    ("b3_g32_act", 3, 32, False),
    ("b2_g64", 2, 64, True),
    ("b8_g32_act", 8, 32, False),
]


@pytest.mark.parametrize("name,bits,group,trivial", FIXTURE_CASES)
def test_autogptq_fixture(name, bits, group, trivial):
    t = {k.split(".", 1)[1]: v for k, v in load_file(str(FIXTURE)).items() if k.startswith(name + ".")}
    w = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, name=name)
    # auto-gptq dequantizes in fp16: our fp32 weight rounds to exactly its values
    assert torch.equal(w.half(), t["ref_weight"])
    y = t["ref_x"].float() @ w.T + t["bias"].float()
    assert (y - t["ref_y"].float()).abs().max() <= 2e-3 * t["ref_y"].float().abs().max()
    res = gptq_to_affine_permuted(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, group)
    if bits == 8:
        assert res is None
        return
    qt, perm = res
    assert (perm is None) == trivial
    assert torch.equal(quant.dequantize(qt), w if perm is None else w[:, perm])
