"""Building offload_moe's C kernels: compile a source file once per machine, load it with ctypes.

Each kernel file (moe_kernel.c, dense_kernel.c) is compiled with the system C compiler (``$CC``, else ``cc``)
into ``<cache>/kernels/`` (offload_moe.paths) under a name hashing the source, the flags and the
compiler's version, written under a temporary name then renamed (no half-written library is ever
loaded), and loaded with ctypes. ``-fopenmp`` links the libgomp torch has already loaded, so the
kernels share torch's OpenMP threads (``torch.set_num_threads`` applies to them). SIMD targets
are function attributes inside the C files, so every file compiles with any x86-64 gcc or clang
and says at run time which variants the CPU runs.

Where a kernel cannot run (not x86-64, no compiler, a failed build, or
``OFFLOAD_MOE_CPU_KERNEL=torch`` in the environment) `load_library` gives None and callers use
torch's kernels; a missing compiler or a failed build warns once.

What is measured with a kernel on the running CPU (where one loop or path starts beating another)
is cached next to it by `cached_measurement`: one JSON file per measurement, keyed by what the
answer depends on, rewritten atomically, a corrupt file or entry measured over.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from offload_moe.paths import default_cache_dir

FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]
DISABLE_ENV = "OFFLOAD_MOE_CPU_KERNEL"  # set to "torch" to use torch's kernels only
T = TypeVar("T")


def compiler() -> str | None:
    """The C compiler to build with: `$CC`, else `cc`; None if neither is on PATH."""
    return shutil.which(os.environ.get("CC", "cc"))


def call(name: str, entry: Callable, *args):
    """entry(*args) (a native function), as a row `name` in torch.profiler tables while a profiler
    records (record_function costs about as much as a small kernel call, so only then). The
    arguments are evaluated before, so a profile charges the kernel its call only."""
    if getattr(torch.autograd.profiler, "_is_profiler_enabled", True):
        with torch.profiler.record_function(name):
            return entry(*args)
    return entry(*args)


def disabled() -> bool:
    """True when the environment asks for torch's kernels only (read on every call)."""
    return os.environ.get(DISABLE_ENV, "").lower() == "torch"


def kernel_dir() -> Path:
    """Where built kernels (and what is measured with them) are cached."""
    return default_cache_dir() / "kernels"


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (what measurements made with a kernel are keyed by)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_key(source: Path, cc: str) -> str:
    """A hash of the source, the headers beside it (what it may include), the flags and the
    compiler: what a built library depends on."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    headers = b"".join(h.name.encode() + h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    return hashlib.sha256(source.read_bytes() + headers + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]


def build(source: Path, cache_dir: Path, cc: str) -> Path:
    """Compile `source` into cache_dir (reused if already there); the path of the library.

    Raises RuntimeError with the compiler's output if compilation fails.
    """
    target = cache_dir / f"{source.stem}-{build_key(source, cc)}.so"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=cache_dir)
    os.close(fd)
    try:
        result = subprocess.run([cc, *FLAGS, str(source), "-o", tmp, "-lm"], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{cc} failed on {source}:\n{result.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_library(source: Path, what: str) -> ctypes.CDLL | None:
    """`source` built and loaded, or None where it cannot run (see the module docstring).

    `what` names the kernel in the warnings ("int4 CPU kernel"). Callers memoise the answer:
    whether a kernel runs is a fact of the machine, fixed for the process.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    cc = compiler()
    if cc is None:
        warnings.warn(f"no C compiler (cc or $CC) found: using torch's kernels instead of offload_moe's "
                      f"{what}, slower (install gcc to get it)", stacklevel=3)
        return None
    try:
        return ctypes.CDLL(str(build(source, kernel_dir(), cc)))
    except (OSError, RuntimeError) as error:
        warnings.warn(f"could not build offload_moe's {what}, using torch's kernels (slower): {error}",
                      stacklevel=3)
        return None


def cached_measurement(name: str, key: str, measure: Callable[[], object], parse: Callable[[object], T | None]) -> T:
    """kernel_dir()/name's entry for `key` read by `parse` (None: not a valid entry), else
    measure() (a JSON value) stored there and parsed. The file is rewritten atomically (temp file
    + rename) with the other valid entries, another process's included; an unreadable or corrupt
    file or entry is measured over; an unwritable cache only costs a measurement per process."""
    path = kernel_dir() / name
    value = parse(_json_entries(path).get(key))
    if value is not None:
        return value
    entry = measure()
    value = parse(entry)
    if value is None:
        raise ValueError(f"cached_measurement: {name!r} measured an invalid entry {entry!r} for {key!r}")
    entries = {k: v for k, v in _json_entries(path).items() if parse(v) is not None}
    entries[key] = entry
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".json.tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return value


def count_entry(entry: object) -> int | None:
    """A stored count (an int >= 1) as `cached_measurement` parses it, else None."""
    return entry if isinstance(entry, int) and not isinstance(entry, bool) and entry >= 1 else None


def _json_entries(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}
