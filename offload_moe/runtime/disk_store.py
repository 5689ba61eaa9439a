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
(same key fields, same source files, full-size layer files whose checksums match the ones
store.json records, unless OFFLOAD_MOE_VERIFY=0) and otherwise rebuilds it, saying why.

Building takes an exclusive lock (`store-....lock`, fcntl.flock) so that two loads never build one
store at once: the second waits, then reuses what the first built. Free space is checked and every
layer file's blocks are allocated (posix_fallocate) before anything is mapped, so a full disk is
a ConfigError naming the folder, never SIGBUS on a write into the mapping. The same staging
(lock, partial folder, dead partials removed, SIGTERM unwinding) serves `offload_moe.convert`.
A file truncated by another process while it is mapped still faults on access: nothing in a
process can prevent that; the sizes are checked every time a store is opened.

Pinned memory is impossible for a mapping: on CUDA, copies from a mapped store are pageable.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import mmap
import os
import shutil
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from offload_moe.checkpoint.converted import bytes_checksum, file_checksum, verify_enabled
from offload_moe.errors import ConfigError
from offload_moe.paths import default_cache_dir
from offload_moe.runtime.store import ExpertLayout, ExpertStore
from offload_moe.units import format_bytes

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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{meta_path}: unreadable ({exc})"
    if not isinstance(meta, dict) or not isinstance(meta.get("key"), dict):
        return f"{meta_path}: not a store description (no 'key' object)"
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
    return _checksum_problem(folder, meta.get("checksums"), key_fields["layers"])


def _checksum_problem(folder: Path, recorded: Any, layers: list[int]) -> str | None:
    """Why the layer files' bytes are not the ones written (None: they are, or OFFLOAD_MOE_VERIFY=0)."""
    if not verify_enabled():
        return None
    if not isinstance(recorded, dict):
        return f"{folder / META_NAME}: no checksums recorded (built by an older offload_moe)"
    for layer in layers:
        file = _layer_file(folder, layer)
        try:
            actual = file_checksum(file)
        except OSError as exc:
            return f"{file}: unreadable ({exc.strerror})"
        if actual != recorded.get(file.name):
            return f"{file}: checksum mismatch, its bytes changed since the store was written"
    return None


def remove_dead_partials(parent: Path, name: str) -> None:
    """Partial folders `name.partial-<pid>` of interrupted runs whose process is gone."""
    for partial in parent.glob(f"{name}.partial-*"):
        try:
            os.kill(int(partial.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except (ValueError, PermissionError):
            pass  # not a pid of ours to judge, or a live process of another user


@contextlib.contextmanager
def exclusive_lock(target: Path, wait: bool) -> Iterator[None]:
    """Hold `target.lock` (next to `target`) exclusively: waits for another holder, or, without
    `wait`, a ConfigError naming the holder. SIGTERM while it is held unwinds the block (so its
    cleanup runs and the lock file goes), then ends the process by the signal."""
    with _sigterm_unwinds(), _locked(target, wait):
        yield


@contextlib.contextmanager
def _locked(target: Path, wait: bool) -> Iterator[None]:
    """The lock file is removed on release, so a waiter that locked a removed file retries on
    the new one."""
    lock_path = target.with_name(f"{target.name}.lock")
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"{target.parent}: cannot write there ({exc.strerror}); choose a writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"{target}: is being written by another process (pid {holder}, lock {lock_path}); "
                              "wait for it to finish or choose another destination") from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """ConfigError naming `folder` and both sizes when `needed` bytes do not fit its file system."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ConfigError(f"{folder}: not enough free disk space for {what}: it needs {format_bytes(needed)}, "
                          f"{format_bytes(free)} free; free some space or choose another folder")


class _Terminated(BaseException):
    """SIGTERM arrived while a partial folder was being written."""


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While the block runs, SIGTERM unwinds it (so its cleanup runs), then the process dies by
    the signal as it would have. Left alone where SIGTERM is not at its default (the caller
    handles it) or off the main thread (Python runs signal handlers there only)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        raise _Terminated

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def staged_directory(target: Path, needed: int, what: str) -> Iterator[Path]:
    """A fresh `target.partial-<pid>` to fill, renamed to `target` when the block completes and
    removed when it fails (SIGTERM included: the caller holds exclusive_lock(target)). Partials
    of dead processes go first; free space is checked before anything is written."""
    remove_dead_partials(target.parent, target.name)
    check_free_space(target.parent, needed, what)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir()
    except OSError as exc:
        raise ConfigError(f"{target.parent}: cannot create {partial.name} ({exc.strerror})") from None
    try:
        yield partial
        try:
            os.rename(partial, target)
        except OSError as exc:
            raise ConfigError(f"{target}: cannot be put in place ({exc.strerror})") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def allocate(fd: int, size: int) -> None:
    """Reserve `size` bytes of disk for an open file, so that running out of space is an OSError
    now rather than SIGBUS on a later write through a mapping of it."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)  # a file system without allocation (or size 0): a sparse file, as before


def write_file(file: Path, data: bytes) -> None:
    """`data` as the new file `file`, its blocks allocated first; ConfigError naming the folder."""
    try:
        with open(file, "xb") as f:
            allocate(f.fileno(), len(data))
            f.write(data)
    except OSError as exc:
        raise ConfigError(f"{file.parent}: cannot write {file.name} ({format_bytes(len(data))}): {exc.strerror}") from None


def _allocate_mapped(file: Path, size: int) -> tuple[mmap.mmap, torch.Tensor]:
    try:
        with open(file, "xb") as f:
            allocate(f.fileno(), size)
    except OSError as exc:
        raise ConfigError(f"{file.parent}: cannot allocate {file.name} ({format_bytes(size)}): {exc.strerror}") from None
    return _map(file, size, True)


def _reuse(folder: Path, layout: ExpertLayout, layers: list[int], num_experts: int, key_fields: dict[str, Any],
           identity: dict[str, Any]) -> tuple[ExpertStore | None, str | None]:
    """The complete store at `folder`, mapped read-only, or why not (None, None: there is none)."""
    if not folder.is_dir():
        return None, None
    problem = check_store(folder, key_fields, identity)
    if problem is not None:
        return None, problem
    try:
        buffers = {layer: _map(_layer_file(folder, layer), num_experts * layout.nbytes, False)[1] for layer in layers}
    except (OSError, ValueError) as exc:  # removed or shortened since it was checked
        return None, f"{folder}: cannot be mapped ({exc})"
    return ExpertStore(layout, layers, num_experts, buffers=buffers, backing_dir=folder), None


def _build(folder: Path, layout: ExpertLayout, layers: list[int], num_experts: int, key_fields: dict[str, Any],
           identity: dict[str, Any], fill: Fill) -> ExpertStore:
    """Write the store under a partial folder with `fill`, checksum it, and rename it into place."""
    size = num_experts * layout.nbytes
    with staged_directory(folder, size * len(layers), "the memory-mapped expert store") as partial:
        maps: dict[int, mmap.mmap] = {}
        buffers: dict[int, torch.Tensor] = {}
        for layer in layers:
            maps[layer], buffers[layer] = _allocate_mapped(_layer_file(partial, layer), size)
        store = ExpertStore(layout, layers, num_experts, buffers=buffers, backing_dir=folder)
        fill(store)
        checksums = {}
        for layer, mapped in maps.items():
            try:
                mapped.flush()  # on disk before the folder is renamed into place
            except OSError as exc:
                raise ConfigError(f"{partial}: cannot write layer {layer} ({exc.strerror})") from None
            checksums[_layer_file(partial, layer).name] = bytes_checksum(mapped)
            mapped.madvise(mmap.MADV_DONTNEED)  # drop the written pages from this process; the page cache keeps them
        meta = {"key": key_fields, "source": identity, "checksums": checksums}
        write_file(partial / META_NAME, json.dumps(meta, indent=1).encode())
    return store


def open_mapped_store(
    parent: Path, layout: ExpertLayout, layers: list[int], num_experts: int, key_fields: dict[str, Any],
    identity: dict[str, Any], fill: Fill,
) -> ExpertStore:
    """The memory-mapped store under `parent`: reused when complete and matching, else built
    with `fill` (which writes every expert through the store's views) and then renamed. Builds
    are serialised by a lock: a load that waited reuses what the other built."""
    folder = parent / store_dir_name(key_fields)
    store, _ = _reuse(folder, layout, layers, num_experts, key_fields, identity)
    if store is not None:  # a complete store is never written again, so reading needs no lock
        return store
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{parent}: cannot create the folder for the memory-mapped expert store ({exc.strerror}); "
                          "set OFFLOAD_MOE_CACHE to a writable folder") from None
    with exclusive_lock(folder, wait=True):
        store, problem = _reuse(folder, layout, layers, num_experts, key_fields, identity)
        if store is not None:
            return store
        if problem is not None:
            warnings.warn(f"memory-mapped expert store not reused, rebuilding it: {problem}", stacklevel=3)
            shutil.rmtree(folder)
        return _build(folder, layout, layers, num_experts, key_fields, identity, fill)


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
