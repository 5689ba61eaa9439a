"""Memory-mapped expert stores: when the experts do not fit the host-RAM budget, the ExpertStore's
per-layer buffers are files on disk, mapped into memory, so the OS page cache serves them and
the process's anonymous memory stays bounded.

The store holds the CPU kernel's layout of quantized experts, which depends on the machine
(offload_moe.quant.matmul), not the canonical packing of a converted directory. So the mapped store
is its own folder, named by a key over everything its bytes depend on (format, optimiser,
layout fields, the int4 kernel's block size, the dtype, layers and expert count):

    <converted dir>/store-<format>-<key>/          when the source is a writable converted dir
    <cache>/stores/<source hash>/store-<format>-<key>/   otherwise ($OFFLOAD_MOE_CACHE, ...)
        store.json            what the bytes are: the key fields, the source's identity, sizes
        layer-LLLLL.bin       one [num_experts, expert_bytes] uint8 array per MoE layer

It is written once under `store-....partial-<pid>` and renamed when complete, so an interrupted
run never leaves a folder that looks finished; the next load reuses it when store.json matches
(same key fields, same source files, full-size layer files) and otherwise rebuilds it, saying why.

Pinned memory is impossible for a mapping: on CUDA, copies from a mapped store are pageable.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from offload_moe.paths import default_cache_dir
from offload_moe.runtime.store import ExpertLayout, ExpertStore

STORE_VERSION = 1
META_NAME = "store.json"
# Files whose size and mtime identify a source checkpoint or converted directory.
_SOURCE_PATTERNS = ("*.safetensors", "config.json", "offload_moe.json", "quantize_config.json")

Fill = Callable[[ExpertStore], None]


def spills_to_disk(store_bytes: int, cpu_memory: int | None) -> bool:
    """The one rule `plan` and `load` share: the store goes to disk when it exceeds the budget."""
    return cpu_memory is not None and store_bytes > cpu_memory


def store_key_fields(layout: ExpertLayout, layers: list[int], num_experts: int, **extra: Any) -> dict[str, Any]:
    """Everything the store's bytes depend on besides the source (JSON-able)."""
    return {
        "store_version": STORE_VERSION,
        "layout": [[f.name, list(f.shape), str(f.dtype), f.offset] for f in layout.fields],
        "expert_bytes": layout.nbytes,
        "layers": list(layers),
        "num_experts": num_experts,
        **extra,
    }


def store_dir_name(key_fields: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    return f"store-{key_fields.get('format', 'dense')}-{digest}"


def source_identity(source: Path) -> dict[str, Any]:
    """Path, sizes and mtimes of the files a store is built from: any change means rebuild."""
    files = sorted({f for pattern in _SOURCE_PATTERNS for f in source.glob(pattern) if f.is_file()})
    return {"path": str(source.resolve()),
            "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}}


def store_parent(source: Path, converted: bool, cache_dir: Path | None = None) -> Path:
    """Where the store folder goes: inside a writable converted dir, else under the cache."""
    if converted and os.access(source, os.W_OK):
        return source
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    return cache / "stores" / hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]


def _layer_file(folder: Path, layer: int) -> Path:
    return folder / f"layer-{layer:05d}.bin"


def _map(file: Path, size: int, writable: bool) -> tuple[mmap.mmap, torch.Tensor]:
    with open(file, "r+b" if writable else "rb") as f:
        mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_COPY)
    # ACCESS_COPY: reads come from the page cache; a stray write would stay private, never reach the file.
    return mapped, torch.frombuffer(mapped, dtype=torch.uint8)


def check_store(folder: Path, key_fields: dict[str, Any], identity: dict[str, Any]) -> str | None:
    """Why the store at `folder` cannot be reused (None: it can)."""
    meta_path = folder / META_NAME
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"{meta_path}: unreadable ({exc})"
    for name, want in key_fields.items():
        if meta.get("key", {}).get(name) != want:
            return f"{meta_path}: {name} is {meta.get('key', {}).get(name)!r}, this load needs {want!r}"
    if meta.get("source") != identity:
        return f"{meta_path}: built from other source files than {identity['path']} has now"
    size = key_fields["num_experts"] * key_fields["expert_bytes"]
    for layer in key_fields["layers"]:
        file = _layer_file(folder, layer)
        actual = file.stat().st_size if file.is_file() else None
        if actual != size:
            return f"{file}: {'missing' if actual is None else f'{actual} bytes'}, expected {size} bytes (truncated?)"
    return None


def _remove_dead_partials(parent: Path, name: str) -> None:
    """Partial folders of interrupted runs (their process is gone)."""
    for partial in parent.glob(f"{name}.partial-*"):
        try:
            os.kill(int(partial.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def open_mapped_store(
    parent: Path, layout: ExpertLayout, layers: list[int], num_experts: int, key_fields: dict[str, Any],
    identity: dict[str, Any], fill: Fill,
) -> ExpertStore:
    """The memory-mapped store under `parent`: reused when complete and matching, else built
    with `fill` (which writes every expert through the store's views) and then renamed."""
    folder = parent / store_dir_name(key_fields)
    if folder.is_dir():
        problem = check_store(folder, key_fields, identity)
        if problem is None:
            buffers = {layer: _map(_layer_file(folder, layer), num_experts * layout.nbytes, False)[1] for layer in layers}
            return ExpertStore(layout, layers, num_experts, buffers=buffers, backing_dir=folder)
        warnings.warn(f"memory-mapped expert store not reused, rebuilding it: {problem}", stacklevel=3)
        shutil.rmtree(folder)
    parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(parent, folder.name)
    partial = parent / f"{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    size = num_experts * layout.nbytes
    maps: dict[int, mmap.mmap] = {}
    buffers: dict[int, torch.Tensor] = {}
    for layer in layers:
        file = _layer_file(partial, layer)
        with open(file, "wb") as f:
            f.truncate(size)
        maps[layer], buffers[layer] = _map(file, size, True)
    store = ExpertStore(layout, layers, num_experts, buffers=buffers, backing_dir=folder)
    try:
        fill(store)
        for mapped in maps.values():
            mapped.flush()  # on disk before the folder is renamed into place
            mapped.madvise(mmap.MADV_DONTNEED)  # drop the written pages from this process; the page cache keeps them
        (partial / META_NAME).write_text(json.dumps({"key": key_fields, "source": identity}, indent=1))
        os.rename(partial, folder)
    except BaseException:
        del store, buffers
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return store


def make_store(
    source: Path, layout: ExpertLayout, layers: list[int], num_experts: int, *, fill: Fill,
    cpu_memory: int | None, pin: bool, converted: bool, key_fields: dict[str, Any] | None = None,
) -> ExpertStore:
    """The host store of a load: in RAM (pinned if asked) when it fits `cpu_memory`, else
    memory-mapped from disk (reused across loads). `fill` writes the experts into it."""
    store_bytes = len(layers) * num_experts * layout.nbytes
    if not spills_to_disk(store_bytes, cpu_memory):
        store = ExpertStore(layout, layers, num_experts, pin=pin)
        fill(store)
        return store
    if pin:
        warnings.warn(f"experts ({store_bytes / 2**30:.2f} GiB) exceed cpu_memory ({cpu_memory / 2**30:.2f} GiB): "
                      "they are memory-mapped from disk, which cannot be pinned, so copies to the GPU are "
                      "pageable and slower", stacklevel=3)
    key = store_key_fields(layout, layers, num_experts, **(key_fields or {}))
    return open_mapped_store(store_parent(source, converted), layout, layers, num_experts, key,
                             source_identity(source), fill)


def cpu_slots_for_mapped_store(cpu_memory: int, expert_bytes: int, layers: int, num_experts: int) -> int:
    """On a CPU device the slots are host RAM too: as many per layer as `cpu_memory` holds (>= 1)."""
    return max(1, min(num_experts, cpu_memory // (layers * expert_bytes)))
