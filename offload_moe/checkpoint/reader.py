"""Lazy, validated reading of a Hugging Face safetensors checkpoint directory.

Only headers are read up front: every shard named by the index must exist, parse and be as long
as its header says, so a missing or truncated shard is reported (with its file name) before any
weight is loaded. Tensors are then read one at a time, on demand, with plain file reads.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from offload_moe.errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it looks like, from the shard header."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets of the data in the file
    end: int


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a shard's header and check the file holds all the bytes the header promises."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8:
                raise CheckpointError(f"{file}: truncated safetensors file (header says {header_len} bytes)")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: shard file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not a safetensors file (bad header: {exc})") from None
    header.pop("__metadata__", None)
    infos: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        data_end = max(data_end, end)
        infos[name] = TensorInfo(file, entry["dtype"], tuple(entry["shape"]), 8 + header_len + begin, 8 + header_len + end)
    expected = 8 + header_len + data_end
    if size < expected:
        raise CheckpointError(
            f"{file}: truncated safetensors file ({size} bytes, header needs {expected}); re-download or re-convert it"
        )
    return infos


class Checkpoint:
    """A checkpoint directory: config.json plus one or more safetensors shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: model path does not exist")
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: model path is not a directory")
        self.config_path = self.path / "config.json"
        if not self.config_path.is_file():
            raise CheckpointError(f"{self.config_path}: missing; {self.path} is not a Hugging Face model directory")
        self.tensors: dict[str, TensorInfo] = self._read_headers()

    def load_config(self):
        """The transformers config (no weights touched)."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.path, local_files_only=True)
        except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self.config_path}: cannot be read as a model config ({exc})") from None

    def _read_headers(self) -> dict[str, TensorInfo]:
        index_path = self.path / INDEX_NAME
        if index_path.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({exc})") from None
            shards = sorted(set(weight_map.values()))
        elif (self.path / SINGLE_NAME).is_file():
            weight_map, shards = {}, [SINGLE_NAME]
        else:
            raise CheckpointError(f"{self.path}: no {SINGLE_NAME} or {INDEX_NAME} found")
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            tensors.update(read_safetensors_header(self.path / shard))
        for name, shard in weight_map.items():
            if name not in tensors or tensors[name].file.name != Path(shard).name:
                raise CheckpointError(f"{self.path / shard}: index lists tensor {name!r} but the shard does not hold it")
        return tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint") from None

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        info = self.info(name)
        if tuple(info.shape) != tuple(shape):
            raise CheckpointError(
                f"{info.file}: tensor {name!r} has shape {list(info.shape)}, expected {list(shape)} from config.json"
            )

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor (CPU, dtype as stored) into fresh memory.

        Plain reads, not a memory map: pages of the shards never count in this process's RSS,
        so streaming a 90 GB checkpoint holds only what the caller keeps."""
        return self.read_block(name, 0, 1)

    def read_block(self, name: str, block: int, blocks: int) -> torch.Tensor:
        """Block `block` of `blocks` equal blocks of rows (first dimension) of a tensor: one
        expert of a fused [E, ...] tensor without reading the others. Shape [rows/blocks, ...]."""
        info = self.info(name)
        try:
            dtype = SAFETENSORS_DTYPES[info.dtype]
        except KeyError:
            raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, which is not supported") from None
        rows = info.shape[0] if info.shape else 1
        if rows % blocks:
            raise CheckpointError(f"{info.file}: tensor {name!r} of shape {list(info.shape)} does not split into {blocks}")
        nbytes = (info.end - info.begin) // blocks
        data = torch.empty(nbytes, dtype=torch.uint8)
        with open(info.file, "rb") as f:
            f.seek(info.begin + block * nbytes)
            if f.readinto(data.numpy()) != data.numel():
                raise CheckpointError(f"{info.file}: truncated while reading tensor {name!r}")
        shape = (rows // blocks, *info.shape[1:]) if info.shape else ()
        return data.view(dtype).reshape(shape)

    def close(self) -> None:
        """Nothing stays open between reads; kept so callers can say when they are done."""
