"""Corrupt, hostile or inconsistent checkpoint files get ONE CheckpointError naming the file, the
tensor or key, and the bad value, before weights are read where the fault is in the metadata:
NaN/Inf weights, dtypes that are not what the model holds, malformed or lying headers, unsafe
index entries, tensors stored twice, FIFOs and directories in a shard's place, missing buffers."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import offload_moe
from offload_moe.checkpoint.reader import Checkpoint
from offload_moe.errors import CheckpointError
from offload_moe.testing import make_tiny_checkpoint

EXPERT = "model.layers.1.block_sparse_moe.experts.3.w2.weight"  # [64, 128] float32
OTHER_EXPERT = "model.layers.1.block_sparse_moe.experts.4.w2.weight"
ROUTER = "model.layers.0.block_sparse_moe.gate.weight"
ATTN = "model.layers.0.self_attn.q_proj.weight"  # [64, 64]
NORM = "model.norm.weight"
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    return {"single": make_tiny_checkpoint(root / "single"),
            "sharded": make_tiny_checkpoint(root / "sharded", num_shards=2)}


@pytest.fixture
def single(pristine, tmp_path):
    return shutil.copytree(pristine["single"], tmp_path / "single")


@pytest.fixture
def sharded(pristine, tmp_path):
    return shutil.copytree(pristine["sharded"], tmp_path / "sharded")


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fail the test if the refusal came only after weights were read."""

    def forbidden(self, name, *args):
        raise AssertionError(f"read {name} before validation finished")

    monkeypatch.setattr(Checkpoint, "read_block", forbidden)


def refused(call, *parts) -> str:
    """Run `call`, which must raise exactly CheckpointError whose message names every part."""
    with pytest.raises(CheckpointError) as info:
        call()
    assert type(info.value) is CheckpointError
    message = str(info.value)
    for part in parts:
        assert str(part) in message, f"{part!r} not in {message!r}"
    return message


def load(path, **kwargs):
    return offload_moe.load(path, progress=False, **kwargs)


def raw_header(file) -> tuple[dict, bytes]:
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_raw(file, header_bytes: bytes, body: bytes, header_len: int | None = None) -> None:
    n = len(header_bytes) if header_len is None else header_len
    file.write_bytes(struct.pack("<Q", n) + header_bytes + body)


def edit_header(file, edit) -> None:
    header, body = raw_header(file)
    edit(header)
    write_raw(file, json.dumps(header).encode(), body)


def edit_tensors(file, edit) -> None:
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def set_value(key, value, index=(0, 0)):
    def edit(tensors):
        t = tensors[key].clone()
        t[index[: t.dim()]] = value
        tensors[key] = t
    return edit


# --- weights: NaN / Inf ----------------------------------------------------------------------


@pytest.mark.parametrize("key, value, experts", [
    (EXPERT, math.nan, None), (EXPERT, math.inf, "hqq4"), (ROUTER, math.inf, None), (ATTN, -math.inf, None),
    (NORM, math.nan, None),
])
def test_non_finite_weight_is_refused(single, key, value, experts):
    edit_tensors(single / "model.safetensors", set_value(key, value))
    msg = refused(lambda: load(single, experts=experts), single / "model.safetensors", repr(key), "non-finite")
    assert str(value) in msg


@pytest.mark.parametrize("key", [EXPERT, ATTN])
def test_convert_refuses_non_finite_and_leaves_nothing(single, tmp_path, key):
    edit_tensors(single / "model.safetensors", set_value(key, math.nan))
    dst = tmp_path / "out"
    refused(lambda: offload_moe.convert(single, dst, progress=False), repr(key), "non-finite")
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out.partial")]


def test_non_finite_expert_bias_is_refused(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "oss", arch="gpt_oss")
    file = path / "model.safetensors"
    key = next(k for k in sorted(load_file(str(file))) if ".experts." in k and k.endswith("bias") and "layers.1." in k)
    edit_tensors(file, set_value(key, math.nan, (5, 3)))
    refused(lambda: load(path), file, repr(key), "non-finite")


# --- dtypes the model does not hold ------------------------------------------------------------


@pytest.mark.parametrize("key", [EXPERT, ATTN, ROUTER])
def test_float_header_rewritten_as_int_is_refused(single, no_weight_reads, key):
    """Same bytes, so the length check passes: the dtype itself is refused."""
    file = single / "model.safetensors"
    edit_header(file, lambda h: h[key].update(dtype="I32"))
    refused(lambda: load(single), file, repr(key), "stored as I32")


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
@pytest.mark.parametrize("key", [EXPERT, NORM])
def test_integer_or_bool_values_where_floats_belong(single, no_weight_reads, key, dtype):
    file = single / "model.safetensors"

    def edit(tensors):
        tensors[key] = torch.ones(tensors[key].shape, dtype=dtype)

    edit_tensors(file, edit)
    name = {torch.int64: "I64", torch.bool: "BOOL"}[dtype]
    refused(lambda: load(single), file, repr(key), f"stored as {name}")


def test_zero_sized_weight_is_refused(single, no_weight_reads):
    file = single / "model.safetensors"
    edit_tensors(file, lambda t: t.update({ATTN: torch.zeros(0, 64)}))
    refused(lambda: load(single), file, repr(ATTN), "shape [0, 64], expected [64, 64]")


# --- header offsets ----------------------------------------------------------------------------


def _offsets(file, key):
    return raw_header(file)[0][key]["data_offsets"]


def test_dtype_with_other_size_than_its_bytes(single):
    file = single / "model.safetensors"
    edit_header(file, lambda h: h[EXPERT].update(dtype="F16"))
    refused(lambda: Checkpoint(single), file, repr(EXPERT), "hold 32768 bytes", "F16 needs 16384")


def test_overlapping_offsets_are_refused(single):
    file = single / "model.safetensors"
    edit_header(file, lambda h: h[EXPERT].update(data_offsets=h[OTHER_EXPERT]["data_offsets"]))
    refused(lambda: Checkpoint(single), file, repr(EXPERT), repr(OTHER_EXPERT), "overlap")


def test_partly_overlapping_offsets_are_refused(single):
    file = single / "model.safetensors"
    header, _ = raw_header(file)
    first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    edit_header(file, lambda h: h[first].update(data_offsets=[o + 4 for o in h[first]["data_offsets"]]))
    refused(lambda: Checkpoint(single), file, repr(first), "overlap")


def test_offsets_beyond_the_file(single):
    file = single / "model.safetensors"
    edit_header(file, lambda h: h[EXPERT].update(data_offsets=[o + 10**9 for o in h[EXPERT]["data_offsets"]]))
    refused(lambda: Checkpoint(single), file, repr(EXPERT), "truncated")


@pytest.mark.parametrize("change, words", [
    (lambda b, e: [e, b], "end before they begin"),
    (lambda b, e: [b, e - 4], "hold 32764 bytes"),
])
def test_reversed_or_short_offsets(single, change, words):
    file = single / "model.safetensors"
    edit_header(file, lambda h: h[EXPERT].update(data_offsets=change(*h[EXPERT]["data_offsets"])))
    refused(lambda: Checkpoint(single), file, repr(EXPERT), words)


def test_unknown_dtype(single):
    file = single / "model.safetensors"
    edit_header(file, lambda h: h[EXPERT].update(dtype="F12"))
    refused(lambda: Checkpoint(single), file, repr(EXPERT), "dtype 'F12' is not supported")


# --- malformed headers -------------------------------------------------------------------------


@pytest.mark.parametrize("edit, words", [
    (lambda h: h[EXPERT].pop("data_offsets"), "has no 'data_offsets'"),
    (lambda h: h[EXPERT].pop("dtype"), "has no 'dtype'"),
    (lambda h: h.update({EXPERT: "F32"}), "header entry is a JSON str"),
    (lambda h: h.update({EXPERT: [1, 2]}), "header entry is a JSON list"),
    (lambda h: h[EXPERT].update(data_offsets="0-4"), "data_offsets '0-4'"),
    (lambda h: h[EXPERT].update(data_offsets=[0]), "data_offsets [0]"),
    (lambda h: h[EXPERT].update(data_offsets=[0, 1.5]), "data_offsets [0, 1.5]"),
    (lambda h: h[EXPERT].update(data_offsets=[True, 4]), "data_offsets [True, 4]"),
    (lambda h: h[EXPERT].update(data_offsets=[-4, 0]), "data_offsets [-4, 0]"),
    (lambda h: h[EXPERT].update(shape="64x128"), "shape '64x128'"),
    (lambda h: h[EXPERT].update(shape=[-64, -128]), "shape [-64, -128]"),
    (lambda h: h[EXPERT].update(shape=[64.0, 128]), "shape [64.0, 128]"),
    (lambda h: h[EXPERT].update(shape=None), "shape None"),
    (lambda h: h[EXPERT].update(dtype=32), "dtype 32"),
])
def test_malformed_entry(single, edit, words):
    file = single / "model.safetensors"
    edit_header(file, edit)
    refused(lambda: Checkpoint(single), file, repr(EXPERT), words)


def test_metadata_not_an_object(single):
    file = single / "model.safetensors"
    edit_header(file, lambda h: h.update({"__metadata__": ["format", "pt"]}))
    refused(lambda: Checkpoint(single), file, "'__metadata__' is a JSON list")


@pytest.mark.parametrize("header, words", [
    (b"[1, 2, 3]", "header is a JSON list"),
    (b'"hello"', "header is a JSON str"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], '
     b'"data_offsets": [4, 8]}}', "key 'a' twice"),
    (b'{"\xff\xfe": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "not UTF-8"),
    (b"[" * 200000, "bad header"),
    (b"", "bad header"),
], ids=["list", "string", "duplicate-key", "not-utf8", "deep-nesting", "empty"])
def test_malformed_header(single, header, words):
    file = single / "model.safetensors"
    write_raw(file, header, b"\0" * 64)
    refused(lambda: Checkpoint(single), file, words)


@pytest.mark.parametrize("length, words", [(2**40, "over the"), (2**20, "truncated")])
def test_absurd_header_length(single, length, words):
    file = single / "model.safetensors"
    _, body = raw_header(file)
    write_raw(file, b"{}", body[:1000], header_len=length)
    refused(lambda: Checkpoint(single), file, words, str(length))


# --- the index ---------------------------------------------------------------------------------


def _set_index(path, edit) -> None:
    index = json.loads((path / INDEX).read_text())
    edit(index)
    (path / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("where", ["../outside.safetensors", "outside", "sub/../../outside.safetensors"])
def test_index_path_escaping_the_checkpoint_is_refused(sharded, no_weight_reads, where):
    """A copy of the real shard sits outside: were the path followed, the load would succeed."""
    outside = sharded.parent / "outside.safetensors"
    shutil.copy(sharded / SHARD2, outside)
    target = str(outside) if where == "outside" else where
    _set_index(sharded, lambda ix: ix["weight_map"].update(
        {k: target for k, v in ix["weight_map"].items() if v == SHARD2}))
    refused(lambda: load(sharded), sharded / INDEX, repr(target), "'..' are refused")


def test_index_naming_etc_passwd_is_refused_before_opening(sharded):
    _set_index(sharded, lambda ix: ix["weight_map"].update({ATTN: "/etc/passwd"}))
    refused(lambda: Checkpoint(sharded), sharded / INDEX, "'/etc/passwd'")


@pytest.mark.parametrize("text, words", [
    ("", "not a valid safetensors index"),
    ("{not json", "not a valid safetensors index"),
    ("[1, 2]", "no 'weight_map' object"),
    ('{"metadata": {}}', "no 'weight_map' object"),
    ('{"weight_map": ["model-00001-of-00002.safetensors"]}', "weight_map is a JSON list"),
    ('{"weight_map": {"lm_head.weight": 1}}', "weight_map['lm_head.weight'] = 1"),
    ('{"weight_map": {"lm_head.weight": "a", "lm_head.weight": "b"}}', "key 'lm_head.weight' twice"),
])
def test_bad_index(sharded, text, words):
    (sharded / INDEX).write_text(text)
    refused(lambda: Checkpoint(sharded), sharded / INDEX, words)


def test_tensor_in_two_shards_is_refused_naming_both(sharded):
    index = json.loads((sharded / INDEX).read_text())
    key = next(k for k, v in index["weight_map"].items() if v == SHARD1)
    extra = load_file(str(sharded / SHARD1))[key]
    edit_tensors(sharded / SHARD2, lambda t: t.update({key: extra}))
    refused(lambda: Checkpoint(sharded), sharded / SHARD1, sharded / SHARD2, repr(key))


# --- what stands in a shard's place ------------------------------------------------------------


def test_directory_in_a_shards_place(sharded):
    os.remove(sharded / SHARD2)
    (sharded / SHARD2).mkdir()
    refused(lambda: load(sharded), sharded / SHARD2, "is a directory")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("name", [SHARD2, INDEX, "config.json"])
def test_fifo_is_an_error_not_a_hang(sharded, name):
    """Through the CLI in a subprocess: a regression would hang in open(), not fail."""
    os.remove(sharded / name)
    os.mkfifo(sharded / name)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", "import sys; from offload_moe.cli import main; "
                           "sys.exit(main(sys.argv[1:]))", "generate", str(sharded), "--prompt", "hi"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=repo)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(sharded / name) in last and "not a regular file" in last


def test_symlinks_inside_the_checkpoint_are_fine(sharded):
    (sharded / "store").mkdir()
    os.replace(sharded / SHARD2, sharded / "store" / SHARD2)
    os.symlink(os.path.join("store", SHARD2), sharded / SHARD2)
    index = json.loads((sharded / INDEX).read_text())
    in_shard2 = sorted(k for k, v in index["weight_map"].items() if v == SHARD2)
    ckpt = Checkpoint(sharded)
    assert in_shard2 and all(ckpt.info(k).file == sharded / SHARD2 for k in in_shard2)
    assert torch.isfinite(ckpt.read(in_shard2[0])).all()


def test_symlink_leaving_the_checkpoint_is_refused(sharded):
    outside = sharded.parent / "elsewhere.safetensors"
    os.replace(sharded / SHARD2, outside)
    os.symlink(outside, sharded / SHARD2)
    refused(lambda: Checkpoint(sharded), sharded / SHARD2, str(outside), "outside the checkpoint directory")


def test_hugging_face_cache_layout_is_accepted(pristine, tmp_path):
    """snapshots/<rev>/shard -> ../../blobs/<hash>, as huggingface_hub lays out its cache."""
    repo = tmp_path / "models--tiny--mixtral"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(pristine["sharded"].iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        os.symlink(os.path.join("..", "..", "blobs", f"blob{i}"), snapshot / f.name)
    assert ATTN in Checkpoint(snapshot).tensors


def test_broken_symlink_shard(sharded):
    os.remove(sharded / SHARD2)
    os.symlink("gone.safetensors", sharded / SHARD2)
    refused(lambda: Checkpoint(sharded), sharded / SHARD2, "broken symlink")


# --- tensors the model needs -------------------------------------------------------------------


def test_deepseek_v3_without_its_correction_bias_is_refused(tmp_path, no_weight_reads):
    path = make_tiny_checkpoint(tmp_path / "dsv3", arch="deepseek_v3")
    key = "model.layers.1.mlp.gate.e_score_correction_bias"
    edit_tensors(path / "model.safetensors", lambda t: t.pop(key))
    refused(lambda: load(path), path, f"tensor {key!r} (the model's {key!r}) is missing")


def test_missing_non_expert_parameter_names_model_key_and_disk_name(single, no_weight_reads):
    edit_tensors(single / "model.safetensors", lambda t: t.pop(NORM))
    refused(lambda: load(single), f"tensor {NORM!r} (the model's {NORM!r}) is missing")


# --- GPTQ ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gptq_pristine(tmp_path_factory):
    sys.path.insert(0, os.path.dirname(__file__))
    from test_gptq_model import make_gptq_pair

    gptq, _ = make_gptq_pair(tmp_path_factory.mktemp("gptq"), desc_act=False)
    return gptq


@pytest.fixture
def gptq(gptq_pristine, tmp_path):
    return shutil.copytree(gptq_pristine, tmp_path / "gptq")


GPTQ_EXPERT = "model.layers.1.block_sparse_moe.experts.2.w1"


@pytest.mark.parametrize("field, dtype", [("scales", "I16"), ("qweight", "F32"), ("g_idx", "F32")])
def test_gptq_tensor_with_the_wrong_dtype(gptq, no_weight_reads, field, dtype):
    file = gptq / "model.safetensors"
    key = f"{GPTQ_EXPERT}.{field}"
    edit_header(file, lambda h: h[key].update(dtype=dtype))
    refused(lambda: load(gptq), file, repr(key), f"stored as {dtype}")


def test_gptq_scale_nan_is_refused(gptq):
    file = gptq / "model.safetensors"
    key = f"{GPTQ_EXPERT}.scales"
    edit_tensors(file, set_value(key, math.nan))
    refused(lambda: load(gptq), file, repr(key), "non-finite")
