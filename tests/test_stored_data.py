"""Stored data that offload_moe writes and reads back: converted directories and memory-mapped
stores. Tampered manifests and flipped bytes are named, full or read-only disks are refused
cleanly, killed or terminated writers leave nothing that looks complete, and concurrent
writers of one destination never collide."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import offload_moe
from offload_moe import loader
from offload_moe.checkpoint import converted as converted_module
from offload_moe.checkpoint.converted import MANIFEST_NAME, expert_file_name
from offload_moe.conversion import convert
from offload_moe.errors import CheckpointError, ConfigError
from offload_moe.quant.formats import parse_format
from offload_moe.runtime import disk_store
from offload_moe.runtime.disk_store import META_NAME, exclusive_lock
from offload_moe.testing import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
IDS = torch.arange(1, 30)[None]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("stored_src"), seed=11, num_shards=2, num_hidden_layers=3)


@pytest.fixture(scope="module")
def pristine(src, tmp_path_factory):
    """A converted directory no test writes into (tests copy it)."""
    return convert(src, tmp_path_factory.mktemp("stored_conv") / "hqq4", experts="hqq4", progress=False)


@pytest.fixture
def conv(pristine, tmp_path):
    """A private copy of the converted directory, free to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "conv"))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_MOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("OFFLOAD_MOE_VERIFY", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def no_long_work(monkeypatch):
    """Fail the test if an error were only found after the non-expert weights were loaded."""

    def forbidden(*args, **kwargs):
        raise AssertionError("weights loaded before the stored data was checked")

    monkeypatch.setattr(loader, "load_non_experts", forbidden)


@pytest.fixture
def mount(tmp_path):
    """mount(name, size_bytes, read_only=False) -> a fresh tmpfs; skipped where mount is refused."""
    mounted = []

    def make(name: str, size: int, read_only: bool = False) -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={max(4, size // 1024)}k", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {done.stderr.strip()}")
        mounted.append(point)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
        return point

    yield make
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


def logits(llm) -> torch.Tensor:
    with torch.no_grad():
        return llm.model(IDS).logits


def leftovers(folder: Path) -> list[str]:
    """Names under `folder` that an interrupted or refused writer could have left."""
    return sorted(p.name for p in folder.rglob("*") if ".partial-" in p.name or p.name.endswith(".lock"))


def edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    edit(manifest)
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------------------
# Manifest and expert-file headers against the model


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(manifest):
        target = manifest
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return edit


@pytest.mark.parametrize("edit, message", [
    (_set("moe_layers", [0, 1]), r"offload_moe\.json: moe_layers is \[0, 1\], but the model of .*config\.json has MoE layers \[0, 1, 2\]"),
    (_set("num_experts", 4), r"experts-00000\.safetensors: holds experts .*offload_moe\.json says num_experts 4"),
    (_set("model_type", "qwen2_moe"), r"offload_moe\.json: model_type is 'qwen2_moe', but .*config\.json says 'mixtral'"),
    (_set("experts", "bits", 3), r"offload_moe\.json: experts\.bits is 3, but format 'hqq4' has 4"),
    (_set("experts", "group_size", 32), r"offload_moe\.json: experts\.group_size is 32, but format 'hqq4' has 64"),
    (_set("experts", "format", "int3"), r"offload_moe\.json: experts\.format is 'int3', not a quantized format \(.*hqq4"),
    (_set("moe_layers", "all"), r"offload_moe\.json: key 'moe_layers' is 'all', not a list of layer indices"),
    (_set("checksums", "none"), r"offload_moe\.json: key 'checksums' is not a map"),
])
def test_tampered_manifest_is_named_before_long_work(conv, no_long_work, edit, message):
    edit_manifest(conv, edit)
    with pytest.raises(CheckpointError, match=message):
        offload_moe.load(conv, progress=False)


def test_manifest_format_that_the_files_do_not_hold_is_named(conv, no_long_work):
    nf4 = parse_format("nf4")
    edit_manifest(conv, _set("experts", {"format": "nf4", "bits": nf4.bits, "group_size": nf4.group_size}))
    with pytest.raises(CheckpointError, match=r"experts-00000\.safetensors: not the tensors of nf4 experts \(.*offload_moe\.json "
                                                r"experts\.format\) of this model \(missing \['0\.down\.absmax'"):
        offload_moe.load(conv, progress=False)


@pytest.mark.parametrize("tensor, change, message", [
    ("0.down.scale", lambda t: t.double(), r"tensor '0\.down\.scale' is F64 \[\d+, \d+\], hqq4 experts \(.*offload_moe\.json experts\.format\) "
                       r"of this model need F16"),
    ("3.gate_up.qweight", lambda t: t[:, :-1].contiguous(), r"tensor '3\.gate_up\.qweight' is U8 \[\d+, \d+\]"),
])
def test_expert_tensor_of_the_wrong_shape_or_dtype_is_named(conv, no_long_work, tensor, change, message):
    file = conv / expert_file_name(1)
    tensors = load_file(file)
    tensors[tensor] = change(tensors[tensor])
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{expert_file_name(1)}: {message}"):
        offload_moe.load(conv, progress=False)


# ---------------------------------------------------------------------------------------------
# Checksums


def flip_byte(file: Path, from_end: int = 4) -> None:
    """Invert one byte: with from_end=4 a low byte of the last elements (U8, F16, F32 alike), so
    the value stays finite and only the checksum can tell."""
    with open(file, "r+b") as f:
        f.seek(-from_end, os.SEEK_END)
        byte = f.read(1)
        f.seek(-from_end, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_convert_records_a_checksum_per_expert_file(pristine):
    manifest = json.loads((pristine / MANIFEST_NAME).read_text())
    assert sorted(manifest["checksums"]) == [expert_file_name(i) for i in range(3)]
    for name, digest in manifest["checksums"].items():
        assert digest == converted_module.file_checksum(pristine / name)


def test_flipped_byte_in_an_expert_file_is_named_unless_verification_is_off(conv, pristine, monkeypatch):
    flip_byte(conv / expert_file_name(2))
    with pytest.raises(CheckpointError, match=rf"{expert_file_name(2)}: checksum mismatch"):
        offload_moe.load(conv, progress=False)
    monkeypatch.setenv("OFFLOAD_MOE_VERIFY", "0")
    offload_moe.load(conv, progress=False)  # the documented way to skip the check: it loads
    monkeypatch.setenv("OFFLOAD_MOE_VERIFY", "maybe")
    with pytest.raises(ConfigError, match=r"OFFLOAD_MOE_VERIFY='maybe': use 1 .* or 0"):
        offload_moe.load(pristine, progress=False)


def test_flipped_byte_in_a_mapped_store_is_rebuilt_with_a_warning(conv):
    first = offload_moe.load(conv, slots_per_layer=8, cpu_memory="1KiB", progress=False)
    reference = logits(first)
    folder = first.runtime.store.backing_dir
    meta = json.loads((folder / META_NAME).read_text())
    assert sorted(meta["checksums"]) == [f"layer-0000{i}.bin" for i in range(3)]
    del first
    flip_byte(folder / "layer-00001.bin", from_end=100)
    with pytest.warns(UserWarning, match=r"rebuilding it: .*layer-00001\.bin: checksum mismatch"):
        again = offload_moe.load(conv, slots_per_layer=8, cpu_memory="1KiB", progress=False)
    assert torch.equal(reference, logits(again))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt store is reused silently
        offload_moe.load(conv, slots_per_layer=8, cpu_memory="1KiB", progress=False)


# ---------------------------------------------------------------------------------------------
# Full and read-only disks


def _store_bytes(path: Path) -> int:
    return offload_moe.load(path, slots_per_layer=1, progress=False).runtime.store.nbytes


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_convert_onto_a_full_disk_is_refused_with_sizes_and_leaves_nothing(src, pristine, mount, monkeypatch):
    small = mount("small", _tree_bytes(pristine) // 4)
    with pytest.raises(ConfigError, match=rf"{small}: not enough free disk space for the converted directory: "
                                          r"it needs [\d.]+ \w+, [\d.]+ \w+ free"):
        convert(src, small / "dst", progress=False)
    assert list(small.iterdir()) == []
    monkeypatch.setattr(disk_store, "check_free_space", lambda *args: None)  # as if the disk filled meanwhile
    with pytest.raises(ConfigError, match=r"cannot write .*No space left on device"):
        convert(src, small / "dst", progress=False)
    assert list(small.iterdir()) == []


def test_store_onto_a_full_disk_is_refused_with_sizes_and_leaves_nothing(src, mount, monkeypatch):
    needed = _store_bytes(src)
    small = mount("small", needed // 3)
    monkeypatch.setenv("OFFLOAD_MOE_CACHE", str(small))
    with pytest.raises(ConfigError, match=r"not enough free disk space for the memory-mapped expert store: "
                                          r"it needs [\d.]+ \w+, [\d.]+ \w+ free"):
        offload_moe.load(src, slots_per_layer=1, cpu_memory="1KiB", progress=False)
    monkeypatch.setattr(disk_store, "check_free_space", lambda *args: None)
    with pytest.raises(ConfigError, match=r"cannot allocate layer-0000\d\.bin .*No space left on device"):
        offload_moe.load(src, slots_per_layer=1, cpu_memory="1KiB", progress=False)
    assert [p for p in small.rglob("*") if p.is_file() or p.name.startswith("store-")] == []


def test_read_only_destination_is_one_config_error_before_long_work(src, mount, monkeypatch):
    read_only = mount("ro", 1 << 20, read_only=True)

    def forbidden(*args, **kwargs):
        raise AssertionError("quantized before the destination was checked")

    monkeypatch.setattr(converted_module, "quantize_expert", forbidden)
    with pytest.raises(ConfigError, match=rf"{read_only}: cannot write there \(Read-only file system\)"):
        convert(src, read_only / "dst", progress=False)
    monkeypatch.setenv("OFFLOAD_MOE_CACHE", str(read_only / "cache"))
    with pytest.raises(ConfigError, match=rf"{read_only}/cache/stores/\w+: cannot create the folder .*Read-only"):
        offload_moe.load(src, slots_per_layer=1, cpu_memory="1KiB", progress=False)


# ---------------------------------------------------------------------------------------------
# Locks and stale partial folders (in process)


def test_convert_refuses_a_destination_another_convert_is_writing(src, tmp_path):
    dst = tmp_path / "dst"
    with exclusive_lock(dst, wait=False):
        with pytest.raises(ConfigError, match=rf"{dst}: is being written by another process \(pid {os.getpid()},"):
            convert(src, dst, progress=False)
    assert not dst.exists() and leftovers(tmp_path) == []


def test_partials_of_dead_runs_are_removed_and_live_ones_kept(src, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"dst.partial-{dead.pid}"
    live = tmp_path / f"dst.partial-{os.getppid()}"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    convert(src, tmp_path / "dst", progress=False)
    assert not stale.exists() and live.exists()
    assert (tmp_path / "dst" / MANIFEST_NAME).is_file()


# ---------------------------------------------------------------------------------------------
# Faults in other processes: killed and terminated writers, concurrent writers

CHILD = r"""
import json, os, sys, time
import torch
mode, path, dst, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
import offload_moe
from offload_moe.errors import OffloadMoeError
from offload_moe.checkpoint import converted, expert_sources
calls = {"n": 0}
def slow(real):
    def wrapper(*args, **kwargs):
        calls["n"] += 1
        time.sleep(delay)
        return real(*args, **kwargs)
    return wrapper
converted.quantize_expert = slow(converted.quantize_expert)
expert_sources.prepare_expert_for_cpu = slow(expert_sources.prepare_expert_for_cpu)
expert_sources._store_expert = slow(expert_sources._store_expert)
try:
    if mode == "convert":
        offload_moe.convert(path, dst, experts="hqq4", progress=False)
        print(json.dumps({"ok": True, "filled": calls["n"]}))
    else:
        llm = offload_moe.load(path, slots_per_layer=2, cpu_memory="1KiB", progress=False)
        with torch.no_grad():
            total = float(llm.model(torch.arange(1, 30)[None]).logits.double().sum())
        print(json.dumps({"ok": True, "filled": calls["n"], "logits": total}))
except OffloadMoeError as exc:
    print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)}))
"""


def start_child(tmp_path: Path, mode: str, path: Path, dst: Path, delay: float) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(script), mode, str(path), str(dst), str(delay)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(pattern_dir: Path, pattern: str, proc: subprocess.Popen, timeout: float = 240) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(pattern_dir.glob(pattern)) if pattern_dir.is_dir() else []
        if found:
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"child ended before writing {pattern}: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no {pattern} under {pattern_dir} within {timeout}s")


def child_result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_or_terminated_convert_leaves_nothing_complete_and_the_next_run_cleans_up(src, tmp_path, sig):
    dst = tmp_path / "dst"
    proc = start_child(tmp_path, "convert", src, dst, delay=0.3)
    partial = wait_for(tmp_path, "dst.partial-*", proc)
    wait_for(partial, "model.safetensors", proc)  # mid-way through the experts
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    assert proc.returncode == -sig
    assert not dst.exists()
    if sig == signal.SIGTERM:  # handled: its partial folder and lock went with it
        assert leftovers(tmp_path) == []
    convert(src, dst, progress=False)
    assert leftovers(tmp_path) == [] and (dst / MANIFEST_NAME).is_file()
    offload_moe.load(dst, slots_per_layer=1, progress=False)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_or_terminated_store_build_leaves_nothing_complete_and_the_next_load_cleans_up(conv, tmp_path, sig):
    proc = start_child(tmp_path, "load", conv, tmp_path / "unused", delay=0.3)
    partial = wait_for(conv, "store-*.partial-*", proc)
    wait_for(partial, "layer-00002.bin", proc)
    time.sleep(0.5)
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    assert proc.returncode == -sig
    if sig == signal.SIGTERM:
        assert leftovers(conv) == []
    assert [p.name for p in conv.glob("store-*") if ".partial-" not in p.name and not p.name.endswith(".lock")] == []
    llm = offload_moe.load(conv, slots_per_layer=2, cpu_memory="1KiB", progress=False)
    assert llm.runtime.store.mapped and leftovers(conv) == []
    assert (llm.runtime.store.backing_dir / META_NAME).is_file()


def test_two_converts_to_one_destination_one_wins_the_other_fails_cleanly(src, tmp_path):
    dst = tmp_path / "dst"
    procs = [start_child(tmp_path, "convert", src, dst, delay=0.1) for _ in range(2)]
    results = [child_result(p) for p in procs]
    assert sorted(r["ok"] for r in results) == [False, True], results
    failed = next(r for r in results if not r["ok"])
    assert failed["error"] == "ConfigError"
    assert str(dst) in failed["message"] and ("being written" in failed["message"] or "already exists" in failed["message"])
    assert leftovers(tmp_path) == []
    offload_moe.load(dst, slots_per_layer=1, progress=False)


def test_two_loads_building_one_store_build_it_once_and_agree(conv, tmp_path):
    procs = [start_child(tmp_path, "load", conv, tmp_path / "unused", delay=0.05) for _ in range(2)]
    results = [child_result(p) for p in procs]
    assert all(r["ok"] for r in results), results
    assert sorted(r["filled"] > 0 for r in results) == [False, True], results  # one built, one reused
    assert results[0]["logits"] == results[1]["logits"]
    assert leftovers(conv) == [] and len(list(conv.glob("store-*"))) == 1
