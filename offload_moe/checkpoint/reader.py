"""Lazy, validated reading of a Hugging Face safetensors checkpoint directory.

Only headers are read up front: every shard named by the index must be a regular file inside the
checkpoint, parse as a well-formed safetensors header (entries with a known dtype, a shape of
non-negative ints and in-file, non-overlapping offsets of exactly shape * itemsize bytes) and be
as long as its header says, so a bad shard is reported (with its file name and tensor) before any
weight is loaded. Tensors are then read one at a time, on demand, with plain file reads, and a
floating-point tensor holding NaN or Inf is refused as it is read.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from offload_moe.errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "C64": torch.complex64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
FLOAT_DTYPES = frozenset(name for name, dt in SAFETENSORS_DTYPES.items() if dt.is_floating_point)
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# The safetensors library refuses larger headers too; a bigger length is corruption, not a model.
MAX_HEADER_BYTES = 100 * 2**20
_FINITE_CHUNK = 1 << 24  # elements checked at a time: bounds the temporary mask of a huge tensor


def _unique_keys(where: str):
    """A json object_pairs_hook refusing a repeated key (which json would silently collapse)."""

    def unique(pairs: list[tuple[str, object]]) -> dict:
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise CheckpointError(f"{where} lists key {key!r} twice")
            seen[key] = value
        return seen

    return unique


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it looks like, from the shard header."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets of the data in the file
    end: int


def open_regular(file: Path, what: str = "shard file"):
    """`file` opened for binary reading, and its size; it must be a regular file (a symlink to one
    is fine). Opened non-blocking and checked on the open descriptor: a FIFO would block a plain
    open() forever, and checking before opening could race with the file being replaced."""
    try:
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        if file.is_symlink():
            raise CheckpointError(f"{file}: {what} is a broken symlink (to {os.readlink(file)})") from None
        raise CheckpointError(f"{file}: {what} is missing") from None
    except OSError as exc:
        raise CheckpointError(f"{file}: {what} cannot be opened ({exc.strerror or exc})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, socket or device)"
        raise CheckpointError(f"{file}: {what} is {kind}; refusing to read it")
    return os.fdopen(fd, "rb"), st.st_size


def _read_header_bytes(file: Path) -> tuple[int, bytes, int]:
    """(header length, header bytes, file size), the length checked against the file and a sane
    bound."""
    f, size = open_regular(file)
    try:
        with f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(f"{file}: not a safetensors file (header length {header_len} bytes is over "
                                      f"the {MAX_HEADER_BYTES} byte limit)")
            if header_len > size - 8:
                raise CheckpointError(f"{file}: truncated safetensors file (header says {header_len} bytes, "
                                      f"the file has {size})")
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) < header_len:
        raise CheckpointError(f"{file}: truncated safetensors file (header cut at {len(raw)} of {header_len} bytes)")
    return header_len, raw, size


def _parse_header_json(file: Path, raw: bytes) -> dict:
    """The header object; a repeated key (which json would silently collapse) is refused."""

    unique = _unique_keys(f"{file}: header")

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique)
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{file}: not a safetensors file (header is not UTF-8: {exc})") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{file}: not a safetensors file (bad header: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a safetensors file (header is a JSON {type(header).__name__}, "
                              "not an object)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{file}: header '__metadata__' is a JSON {type(metadata).__name__}, not an object")
    return header


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_info(file: Path, name: str, entry, base: int) -> TensorInfo:
    """One header entry, checked: known dtype, shape of non-negative ints, offsets [begin, end]
    with exactly prod(shape) * itemsize bytes between them."""
    where = f"{file}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry is a JSON {type(entry).__name__}, not an object with "
                              "'dtype', 'shape' and 'data_offsets'")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise CheckpointError(f"{where}: header entry has no {key!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{where}: dtype {dtype!r} is not supported (one of {', '.join(SAFETENSORS_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a list of two non-negative integers")
    begin, end = offsets
    if end < begin:
        raise CheckpointError(f"{where}: data_offsets {offsets} end before they begin")
    needed = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if end - begin != needed:
        raise CheckpointError(f"{where}: data_offsets {offsets} hold {end - begin} bytes, but shape {shape} "
                              f"of {dtype} needs {needed}")
    return TensorInfo(file, dtype, tuple(shape), base + begin, base + end)


def _check_layout(file: Path, infos: dict[str, TensorInfo], size: int) -> None:
    """No two tensors share bytes, and the file holds every byte the header promises."""
    previous: tuple[str, TensorInfo] | None = None
    for name, info in sorted(infos.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.end == info.begin:
            continue  # an empty tensor shares no bytes
        if previous is not None and info.begin < previous[1].end:
            raise CheckpointError(
                f"{file}: tensors {previous[0]!r} and {name!r} overlap (bytes {info.begin}-"
                f"{min(info.end, previous[1].end)} of the file belong to both); the header is corrupt"
            )
        previous = (name, info)
    last = max(infos.items(), key=lambda item: item[1].end, default=None)
    if last is not None and size < last[1].end:
        raise CheckpointError(
            f"{file}: truncated safetensors file ({size} bytes, header needs {last[1].end} for tensor "
            f"{last[0]!r}); re-download or re-convert it"
        )


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a shard's header, checked entry by entry, and check the file holds all the bytes
    the header promises. Never opens anything but a regular file."""
    header_len, raw, size = _read_header_bytes(file)
    header = _parse_header_json(file, raw)
    infos = {name: _tensor_info(file, name, entry, 8 + header_len) for name, entry in header.items()}
    _check_layout(file, infos, size)
    return infos


def check_finite(tensor: torch.Tensor, where: str) -> None:
    """CheckpointError naming `where` (file and tensor) if a floating or complex tensor holds NaN
    or Inf: such a weight gives NaN logits or quantizes into finite garbage, never a clear error."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        chunk = flat[start:start + _FINITE_CHUNK]
        if chunk.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            chunk = chunk.float()  # isfinite has no float8 kernel everywhere
        bad = ~torch.isfinite(chunk)
        if bool(bad.any()):
            index = start + int(bad.nonzero()[0, 0])
            raise CheckpointError(f"{where} holds a non-finite value ({flat[index].item()} at flat index "
                                  f"{index}); the checkpoint is corrupt")


def read_tensor(info: TensorInfo, name: str, block: int = 0, blocks: int = 1) -> torch.Tensor:
    """Block `block` of `blocks` equal blocks of rows (first dimension) of the tensor `info`
    describes, read into fresh memory and checked finite. Shape [rows/blocks, ...]."""
    dtype = SAFETENSORS_DTYPES[info.dtype]  # known: the header reader checked it
    rows = info.shape[0] if info.shape else 1
    if rows % blocks:
        raise CheckpointError(f"{info.file}: tensor {name!r} of shape {list(info.shape)} does not split into {blocks}")
    nbytes = (info.end - info.begin) // blocks
    data = torch.empty(nbytes, dtype=torch.uint8)
    f, _ = open_regular(info.file)  # it may have been replaced since its header was read
    try:
        with f:
            f.seek(info.begin + block * nbytes)
            got = f.readinto(data.numpy())
    except OSError as exc:
        raise CheckpointError(f"{info.file}: cannot read tensor {name!r} ({exc.strerror or exc})") from None
    if got != data.numel():
        raise CheckpointError(f"{info.file}: truncated while reading tensor {name!r}")
    shape = (rows // blocks, *info.shape[1:]) if info.shape else ()
    tensor = data.view(dtype).reshape(shape)
    check_finite(tensor, f"{info.file}: tensor {name!r}" + (f" (block {block} of {blocks})" if blocks > 1 else ""))
    return tensor


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
            if self.config_path.exists():
                raise CheckpointError(f"{self.config_path}: is not a regular file")
            raise CheckpointError(f"{self.config_path}: missing; {self.path} is not a Hugging Face model directory")
        self.tensors: dict[str, TensorInfo] = self._read_headers()

    def load_config(self):
        """The transformers config, validated, with the tokenizer, chat-template and generation
        files beside it: every bad value is refused here, naming file, key and value, before
        any weight is read (no weights touched; checkpoint code never run)."""
        from offload_moe.checkpoint.config_check import load_validated_config

        return load_validated_config(self.path)

    def _read_headers(self) -> dict[str, TensorInfo]:
        index_path = self.path / INDEX_NAME
        if index_path.exists() or index_path.is_symlink():
            weight_map = read_index(index_path)
            shards = sorted(set(weight_map.values()))
        elif (self.path / SINGLE_NAME).exists() or (self.path / SINGLE_NAME).is_symlink():
            weight_map, shards = {}, [SINGLE_NAME]
        else:
            raise CheckpointError(f"{self.path}: no {SINGLE_NAME} or {INDEX_NAME} found")
        first_key: dict[str, str] = {}
        for name, shard in weight_map.items():
            first_key.setdefault(shard, name)
        files = {shard: self._shard_file(shard, f"{index_path}: weight_map[{first_key[shard]!r}] = {shard!r}"
                                         if weight_map else f"{self.path / shard}:") for shard in shards}
        tensors: dict[str, TensorInfo] = {}
        for file in sorted(set(files.values())):  # "./a" and "a" are one file, read once
            for name, info in read_safetensors_header(file).items():
                if name in tensors:
                    raise CheckpointError(f"{info.file}: tensor {name!r} is also in {tensors[name].file}; a tensor "
                                          "must be stored once (which copy is right cannot be told)")
                tensors[name] = info
        for name, shard in weight_map.items():
            if name not in tensors or tensors[name].file != files[shard]:
                raise CheckpointError(f"{files[shard]}: index lists tensor {name!r} but the shard does not hold it"
                                      + (f" ({tensors[name].file} does)" if name in tensors else ""))
        return tensors

    def _shard_file(self, shard: str, where: str) -> Path:
        """The path of a shard the index names (or model.safetensors), checked BEFORE anything is
        opened: a relative path inside the checkpoint, whose symlinks (if any) resolve inside it or
        to the Hugging Face cache's blob store the snapshot belongs to. `where` names the index
        entry for messages."""
        parts = PurePosixPath(shard.replace("\\", "/")).parts
        if not shard or "\x00" in shard or Path(shard).is_absolute() or shard.startswith(("/", "\\")) or ".." in parts:
            raise CheckpointError(f"{where} is not a file name inside the checkpoint directory (absolute paths "
                                  "and '..' are refused)")
        file = self.path / shard
        try:
            root, target = self.path.resolve(), file.resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise CheckpointError(f"{file}: cannot be resolved ({exc})") from None
        allowed = [root]
        if root.parent.name == "snapshots":  # huggingface_hub's cache: snapshots/<rev>/x -> ../../blobs/<hash>
            allowed.append(root.parent.parent / "blobs")
        if not any(target.is_relative_to(base) for base in allowed):
            raise CheckpointError(f"{file}: resolves to {target}, outside the checkpoint directory {root}; refusing it")
        return file

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

    def check_floating(self, name: str, holder: str) -> None:
        """The tensor is stored in a floating dtype: it fills `holder` (a floating-point weight),
        and integer or bool bytes (a rewritten header, a wrong export) would be cast silently."""
        info = self.info(name)
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{info.file}: tensor {name!r} is stored as {info.dtype}, but it fills {holder}, which is "
                f"floating point; expected one of {', '.join(sorted(FLOAT_DTYPES))}"
            )

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor (CPU, dtype as stored) into fresh memory.

        Plain reads, not a memory map: pages of the shards never count in this process's RSS,
        so streaming a 90 GB checkpoint holds only what the caller keeps."""
        return self.read_block(name, 0, 1)

    def read_block(self, name: str, block: int, blocks: int) -> torch.Tensor:
        """Block `block` of `blocks` equal blocks of rows (first dimension) of a tensor: one
        expert of a fused [E, ...] tensor without reading the others. Shape [rows/blocks, ...].
        A floating tensor with NaN or Inf is a CheckpointError naming file and tensor."""
        return read_tensor(self.info(name), name, block, blocks)

    def close(self) -> None:
        """Nothing stays open between reads; kept so callers can say when they are done."""


def read_index(index_path: Path) -> dict[str, str]:
    """The weight_map of a safetensors index (tensor name -> shard file), checked: a JSON object
    whose weight_map maps names to shard-name strings, each tensor listed once."""

    unique = _unique_keys(f"{index_path}:")

    f, _ = open_regular(index_path, "index file")
    try:
        with f:
            text = f.read().decode("utf-8")
        index = json.loads(text, object_pairs_hook=unique)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{index_path}: not a valid safetensors index ({exc})") from None
    if not isinstance(index, dict) or "weight_map" not in index:
        raise CheckpointError(f"{index_path}: not a valid safetensors index (no 'weight_map' object)")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: weight_map is a JSON {type(weight_map).__name__}, not an object")
    if not weight_map:
        raise CheckpointError(f"{index_path}: weight_map is empty; the index names no tensor")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index_path}: weight_map[{name!r}] = {shard!r} is not a shard file name")
    return weight_map
