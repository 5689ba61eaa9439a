"""Generated bad inputs and faults, each run in its own subprocess, each outcome classified.

For every kind of bad input below a generator writes a few concrete cases, each from a copy of
one small valid tiny checkpoint built once per session. Each (case, surface) runs the Python
API (`offload_moe.load(...)` then a 2-token generate) or the CLI (`python -m offload_moe.cli
generate PATH --prompt hi --max-new-tokens 2`) in a fresh interpreter with a timeout, and its
outcome is classified:

    clean           exit code != 0 with one of our error types (API) or an `error:` line without
                    a traceback (CLI), naming the culprit file / key / option and the bad value
    unclear         a traceback, an error of another type, or one that does not name the culprit
    silently wrong  exit code 0 despite the bad input (or checkpoint code was executed)
    crash           killed by a signal
    hang            still running at the timeout

Every test asserts "clean". The subprocesses run in parallel (BAD_INPUTS_JOBS, default the CPU
count + 1) from one session fixture, which also writes a per-kind summary table at the end.
A process per case is the point: a case must not be able to leave state behind for the next,
and a crash or hang must be seen as one rather than take the test run down.

Importing torch and transformers' model code costs seconds of CPU per interpreter, most of each
case, so by default the cases are forked from one server process that has imported them (and
nothing of offload_moe, which every case imports afresh); each fork then runs exactly what
`python -c ...` or `python -m offload_moe.cli ...` would. BAD_INPUTS_FORK=0 starts a fresh
interpreter per case instead. The fault tests always do.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from offload_moe.testing import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
API, CLI = "api", "cli"
VERDICTS = ("clean", "unclear", "silently wrong", "crash", "hang")
INDEX = "model.safetensors.index.json"
MANIFEST = "offload_moe.json"
ERROR_TAG = "@@offload_moe_error@@"
DEFAULT_TIMEOUT = 120.0
CHECKPOINT_ERRORS = ("CheckpointError",)
CONFIG_ERRORS = ("ConfigError",)
ANY_ERROR = ("CheckpointError", "ConfigError", "UnsupportedArchitectureError")

# Run by `python -c SCRIPT SPEC`: our errors are printed tagged (type and message); any other
# exception is left to print its traceback, which is what makes it "unclear".
API_SCRIPT = f"""
import json, sys
spec = json.loads(sys.argv[1])
import offload_moe
try:
    llm = offload_moe.load(spec["path"], progress=False, **spec["load"])
    if spec["action"] == "ids":
        import torch
        llm.generate(torch.tensor(spec["ids"]), max_new_tokens=2)
    elif spec["action"] == "chat":
        llm.chat([{{"role": "user", "content": "hi"}}], max_new_tokens=2)
    else:
        llm.generate("hi", **{{"max_new_tokens": 2, **spec["generate"]}})
except offload_moe.OffloadMoeError as exc:
    print("\\n{ERROR_TAG}" + json.dumps({{"type": type(exc).__name__, "message": str(exc)}}), file=sys.stderr)
    sys.exit(2)
"""
CLI_GENERATE = ("generate", "{path}", "--prompt", "hi", "--max-new-tokens", "2")

# What every case imports before any offload_moe code runs; names that do not exist are skipped.
PRELOAD = ("torch", "safetensors.torch", "psutil", "tqdm.auto", "jinja2", "tokenizers", "transformers",
           "transformers.models.mixtral.modeling_mixtral", "transformers.models.gpt_oss.modeling_gpt_oss",
           "transformers.generation.utils", "transformers.tokenization_utils_fast", "hqq.core.quantize")

# The fork server: reads one JSON request a line on stdin ({"id", "kind": "api"|"cli", "args",
# "env", "cwd", "stdin", "out"}), forks, and reports {"id", "pid"} then {"id", "rc"} (rc as
# subprocess gives it: negative for a signal). Single-threaded, so a fork never inherits a lock
# held by another thread; the child rebuilds its standard streams on the redirected descriptors
# and ends like an interpreter does (traceback and exit 1 on an uncaught exception, atexit, threads).
ZYGOTE_SCRIPT = """
import importlib, json, os, select, sys
for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
    except Exception:
        pass
API_SCRIPT = sys.argv[2]

def run_child(req):
    os.setsid()
    os.chdir(req["cwd"])
    os.dup2(os.open(req["stdin"] or os.devnull, os.O_RDONLY), 0)
    out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(out, 2)
    enc, errs = sys.stdin.encoding, sys.stdin.errors
    sys.stdin = open(0, "r", closefd=False, encoding=enc, errors=errs)
    sys.stdout = open(1, "w", closefd=False, encoding=enc, errors=sys.stdout.errors)
    sys.stderr = open(2, "w", buffering=1, closefd=False, encoding=enc, errors="backslashreplace")
    os.environ.clear()
    os.environ.update(req["env"])
    code = 1
    try:
        if req["kind"] == "cli":
            import runpy
            sys.argv = [os.path.join(os.getcwd(), "offload_moe", "cli.py"), *req["args"]]
            runpy.run_module("offload_moe.cli", run_name="__main__", alter_sys=True)
        else:
            sys.argv = ["-c", *req["args"]]
            exec(compile(API_SCRIPT, "<string>", "exec"), {"__name__": "__main__"})
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        import atexit, threading
        threading._shutdown()
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)

def report(msg):
    os.write(1, (json.dumps(msg) + "\\n").encode())

report({"ready": True})
buf, running, done = b"", {}, False
while not done or running:
    if not done and select.select([0], [], [], 0.02)[0]:
        chunk = os.read(0, 1 << 16)
        done = not chunk
        buf += chunk
        while b"\\n" in buf:
            line, buf = buf.split(b"\\n", 1)
            req = json.loads(line)
            pid = os.fork()
            if pid == 0:
                run_child(req)
            running[pid] = req["id"]
            report({"id": req["id"], "pid": pid})
    elif done:
        select.select([], [], [], 0.02)
    while running:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            break
        report({"id": running.pop(pid), "rc": os.waitstatus_to_exitcode(status)})
"""


# ---------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class Prepared:
    """A case written to disk: the model path to run on, plus what only the files know."""

    path: Path
    names: tuple[tuple[str, ...], ...] = ()  # more culprit groups (e.g. the shard a key is in)
    marker: Path | None = None  # must not exist afterwards: checkpoint code wrote it
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Case:
    """One bad input. `names`: groups of strings; the error must contain one string of every
    group (case-insensitive). `cli` is the CLI's arguments after the program, `{path}` and
    `{work}` filled in; the default is CLI_GENERATE plus `cli_extra`."""

    id: str
    kind: str
    prepare: Callable[[Path, "Bases"], Prepared]
    names: tuple[tuple[str, ...], ...] = ()
    surfaces: tuple[str, ...] = (API,)
    types: tuple[str, ...] = CHECKPOINT_ERRORS
    action: str = "generate"
    load: dict = field(default_factory=dict)
    generate: dict = field(default_factory=dict)
    ids: list | None = None
    cli: tuple[str, ...] | None = None
    cli_extra: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    stdin: bytes | None = None
    timeout: float = DEFAULT_TIMEOUT
    allow_success: bool = False  # exit 0 is fine too (input we may accept), a traceback is not

    def cli_args(self) -> tuple[str, ...]:
        return self.cli if self.cli is not None else CLI_GENERATE + self.cli_extra


class Bases:
    """The valid checkpoints every case starts from, each built on first use, once a session."""

    def __init__(self, root: Path):
        self.root = root

    @functools.cached_property
    def tiny(self) -> Path:
        """The smallest tiny Mixtral, in two shards so that the index has something to map."""
        return make_tiny_checkpoint(self.root / "tiny", seed=0, num_shards=2)

    @functools.cached_property
    def biased(self) -> Path:
        """A tiny gpt-oss: the family with expert and router biases."""
        return make_tiny_checkpoint(self.root / "gpt_oss", arch="gpt_oss", seed=2)

    @functools.cached_property
    def converted(self) -> Path:
        import offload_moe

        return offload_moe.convert(self.tiny, self.root / "tiny-hqq4", experts="hqq4", progress=False)

    @functools.cached_property
    def slow_source(self) -> Path:
        """Big enough that `convert --optimize` is still running when the fault tests interrupt it."""
        return make_tiny_checkpoint(self.root / "slow", seed=3, num_hidden_layers=6, intermediate_size=256)


def copy_of(base: str, edit: Callable[[Path], tuple | None] | None = None) -> Callable[[Path, Bases], Prepared]:
    """A prepare step: copy base `base` to WORK/ckpt and apply `edit`, which returns extra
    culprit groups (or None)."""

    def prepare(work: Path, bases: Bases) -> Prepared:
        ckpt = Path(shutil.copytree(getattr(bases, base), work / "ckpt"))
        extra = edit(ckpt) if edit is not None else None
        return extra if isinstance(extra, Prepared) else Prepared(ckpt, tuple(extra or ()))

    return prepare


def shared(base: str) -> Callable[[Path, Bases], Prepared]:
    """A prepare step for cases that only pass bad options: the base itself, read only."""
    return lambda work, bases: Prepared(getattr(bases, base))


# ---------------------------------------------------------------------------------------------
# Editing checkpoints on disk (independent of the project's own reader, on purpose)


def read_header(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_header(file: Path, header, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def edit_header(file: Path, edit: Callable[[dict], object]) -> None:
    """Rewrite a shard's header with `edit(header)` (its return value, when not None, replaces
    the header); the data bytes stay as they are."""
    header, data = read_header(file)
    replaced = edit(header)
    write_header(file, header if replaced is None else replaced, data)


def shard_of(ckpt: Path, key: str) -> Path:
    index = ckpt / INDEX
    if index.is_file():
        return ckpt / json.loads(index.read_text())["weight_map"][key]
    return ckpt / "model.safetensors"


def all_keys(ckpt: Path) -> list[str]:
    index = ckpt / INDEX
    if index.is_file():
        return sorted(json.loads(index.read_text())["weight_map"])
    header, _ = read_header(ckpt / "model.safetensors")
    return sorted(k for k in header if k != "__metadata__")


def find_key(ckpt: Path, *fragments: str) -> str:
    """The first tensor name containing every fragment (names differ between families)."""
    for key in all_keys(ckpt):
        if all(f in key for f in fragments):
            return key
    raise LookupError(f"{ckpt}: no tensor name contains all of {fragments}: {all_keys(ckpt)}")


def poke(ckpt: Path, key: str, value: float) -> Path:
    """Overwrite the middle element of float32 tensor `key` in place; returns its shard."""
    shard = shard_of(ckpt, key)
    header, _ = read_header(shard)
    entry = header[key]
    assert entry["dtype"] == "F32", f"{key}: poke writes float32, the tensor is {entry['dtype']}"
    (n,) = struct.unpack("<Q", shard.read_bytes()[:8])
    begin, end = entry["data_offsets"]
    middle = (end - begin) // 4 // 2 * 4
    with open(shard, "r+b") as f:
        f.seek(8 + n + begin + middle)
        f.write(struct.pack("<f", value))
    return shard


def edit_json(file: Path, edit: Callable[[object], object]) -> None:
    data = json.loads(file.read_text())
    replaced = edit(data)
    file.write_text(json.dumps(data if replaced is None else replaced, indent=2))


def set_keys(**values) -> Callable[[dict], None]:
    return lambda data: data.update(values)


def two_shards(ckpt: Path) -> tuple[Path, Path]:
    shards = sorted(set(json.loads((ckpt / INDEX).read_text())["weight_map"].values()))
    return ckpt / shards[0], ckpt / shards[-1]


# ---------------------------------------------------------------------------------------------
# Generators, one per kind


def nan_cases() -> list[Case]:
    """NaN / Inf in experts, router, biases and non-expert tensors: data, found when read."""
    spots = [
        ("nan-expert", "tiny", ("layers.1.", "experts.3.", "w2"), math.nan),
        ("inf-expert", "tiny", ("layers.0.", "experts.0.", "w1"), -math.inf),
        ("nan-router", "tiny", ("layers.0.", ".gate.weight"), math.nan),
        ("nan-attention", "tiny", ("layers.0.", "q_proj.weight"), math.nan),
        ("inf-embedding", "tiny", ("embed_tokens",), math.inf),
        ("nan-expert-bias", "biased", ("layers.0.", "experts", "bias"), math.nan),
        ("inf-router-bias", "biased", ("layers.1.", "router.bias"), math.inf),
    ]

    def edit(fragments, value):
        def apply(ckpt: Path):
            key = find_key(ckpt, *fragments)
            poke(ckpt, key, value)
            return ((key,), ("nan", "inf", "finite"))

        return apply

    return [Case(name, "nan", copy_of(base, edit(fragments, value)), surfaces=(API, CLI) if name == "nan-expert" else (API,))
            for name, base, fragments, value in spots]


def dtype_cases() -> list[Case]:
    """A header's dtype rewritten: same bytes read as integers, or a size that no longer fits."""
    spots = [("dtype-i32-expert", ("layers.0.", "experts.1.", "w1"), "I32"),
             ("dtype-i32-attention", ("layers.1.", "k_proj.weight"), "I32"),
             ("dtype-bool-expert", ("layers.1.", "experts.2.", "w3"), "BOOL")]

    def edit(fragments, dtype):
        def apply(ckpt: Path):
            key = find_key(ckpt, *fragments)
            shard = shard_of(ckpt, key)
            edit_header(shard, lambda h: h[key].update(dtype=dtype))
            return ((shard.name,), (key,), (dtype,))

        return apply

    return [Case(name, "dtype", copy_of("tiny", edit(fragments, dtype))) for name, fragments, dtype in spots]


def _expert_pair(header: dict) -> tuple[str, str]:
    """Two expert tensors of the same dtype and shape in one header."""
    seen: dict[tuple, str] = {}
    for key, entry in sorted(header.items()):
        if key == "__metadata__" or "experts" not in key:
            continue
        sig = (entry["dtype"], tuple(entry["shape"]))
        if sig in seen:
            return seen[sig], key
        seen[sig] = key
    raise LookupError("no two expert tensors of one shape in the header")


def overlap_cases() -> list[Case]:
    """Two tensors whose data_offsets overlap: one reads the other's bytes."""

    def edit(shift_half: bool):
        def apply(ckpt: Path):
            shard = two_shards(ckpt)[0]
            header, _ = read_header(shard)
            a, b = _expert_pair(header)
            begin, end = header[a]["data_offsets"]
            shift = (end - begin) // 2 if shift_half else 0
            edit_header(shard, lambda h: h[b].update(data_offsets=[begin + shift, end + shift]))
            return ((shard.name,), (a, b))

        return apply

    return [Case("overlap-identical", "overlap", copy_of("tiny", edit(False))),
            Case("overlap-partial", "overlap", copy_of("tiny", edit(True)))]


def header_cases() -> list[Case]:
    """Headers that parse as JSON but are not safetensors headers."""

    def edit(change: Callable[[dict, str], object], name_key: bool = True):
        def apply(ckpt: Path):
            key = find_key(ckpt, "layers.0.", "q_proj.weight")
            shard = shard_of(ckpt, key)
            edit_header(shard, lambda h: change(h, key))
            return ((shard.name,), (key,)) if name_key else ((shard.name,),)

        return apply

    def reversed_offsets(h, key):
        h[key]["data_offsets"] = h[key]["data_offsets"][::-1]

    def without_offsets(h, key):
        del h[key]["data_offsets"]

    def short_offsets(h, key):
        begin = h[key]["data_offsets"][0]
        h[key]["data_offsets"] = [begin, begin + 4]

    return [
        Case("header-list", "header", copy_of("tiny", edit(lambda h, key: list(h.values()), name_key=False)),
             surfaces=(API, CLI)),
        Case("header-entry-without-offsets", "header", copy_of("tiny", edit(without_offsets))),
        Case("header-string-entry", "header", copy_of("tiny", edit(lambda h, key: h.update({key: "F32"})))),
        Case("header-reversed-offsets", "header", copy_of("tiny", edit(reversed_offsets))),
        Case("header-short-offsets", "header", copy_of("tiny", edit(short_offsets))),
    ]


def _outside_copy(ckpt: Path) -> Path:
    """Shard 2 copied next to (outside) the checkpoint directory."""
    outside = ckpt.parent / "outside.safetensors"
    shutil.copy(two_shards(ckpt)[1], outside)
    return outside


def _remap(ckpt: Path, to: Callable[[str, str], object]) -> None:
    """Every weight_map entry of shard 2 pointed somewhere else."""
    second = two_shards(ckpt)[1].name
    edit_json(ckpt / INDEX, lambda index: index["weight_map"].update(
        {k: to(k, v) for k, v in index["weight_map"].items() if v == second}))


def _index_dotdot(ckpt: Path):
    _outside_copy(ckpt)
    _remap(ckpt, lambda k, v: "../outside.safetensors")


def _index_absolute(ckpt: Path):
    outside = _outside_copy(ckpt)
    _remap(ckpt, lambda k, v: str(outside))


def _index_one_value(value_of: Callable[[str], object]) -> Callable[[Path], tuple]:
    def apply(ckpt: Path):
        key = find_key(ckpt, "layers.0.", "q_proj.weight")
        edit_json(ckpt / INDEX, lambda index: index["weight_map"].update({key: value_of(index["weight_map"][key])}))
        return ((key,),)

    return apply


def _key_in_two_shards(ckpt: Path):
    from safetensors.torch import load_file, save_file

    first, second = two_shards(ckpt)
    key = sorted(load_file(str(first)))[0]
    tensors = load_file(str(second))
    tensors[key] = load_file(str(first))[key] + 1.0  # a different copy: which one would win?
    save_file(tensors, str(second), metadata={"format": "pt"})
    return ((key,), (first.name, second.name))


def _fifo_shard(ckpt: Path):
    second = two_shards(ckpt)[1]
    second.unlink()
    os.mkfifo(second)  # opening it for reading blocks until a writer comes: never
    return ((second.name,),)


def _directory_shard(ckpt: Path):
    second = two_shards(ckpt)[1]
    second.unlink()
    second.mkdir()
    return ((second.name,),)


def _directory_config(ckpt: Path):
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").mkdir()


def path_cases() -> list[Case]:
    """The index and the files it names: paths leaving the directory, wrong JSON types, a key
    in two shards, a FIFO or a directory where a file belongs."""
    index_names = ((INDEX,),)
    return [
        Case("index-dotdot-path", "paths", copy_of("tiny", _index_dotdot), index_names + (("..",),)),
        Case("index-absolute-path", "paths", copy_of("tiny", _index_absolute), index_names + (("outside.safetensors",),)),
        Case("index-weight-map-list", "paths",
             copy_of("tiny", lambda c: edit_json(c / INDEX, lambda i: i.update(weight_map=list(i["weight_map"].items())))),
             index_names + (("weight_map",),)),
        Case("index-value-list", "paths", copy_of("tiny", _index_one_value(lambda v: [v])), index_names),
        Case("index-value-int", "paths", copy_of("tiny", _index_one_value(lambda v: 7)), index_names),
        Case("key-in-two-shards", "paths", copy_of("tiny", _key_in_two_shards)),
        Case("fifo-shard", "paths", copy_of("tiny", _fifo_shard), timeout=60.0),
        Case("directory-shard", "paths", copy_of("tiny", _directory_shard)),
        Case("directory-config", "paths", copy_of("tiny", _directory_config), (("config.json",),), types=ANY_ERROR),
    ]


REMOTE_CODE = 'open({marker!r}, "w").write("checkpoint code ran")\n'


def _auto_map(model_type: str | None):
    """config.json with an auto_map and the code it names, which would leave a marker if run."""

    def apply(ckpt: Path):
        marker = ckpt.parent / "ran_checkpoint_code"
        for module in ("configuration_evil", "modeling_evil"):
            (ckpt / f"{module}.py").write_text(REMOTE_CODE.format(marker=str(marker)))
        auto_map = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
        edit_json(ckpt / "config.json", set_keys(auto_map=auto_map, **({"model_type": model_type} if model_type else {})))
        return Prepared(ckpt, marker=marker)

    return apply


def config_cases() -> list[Case]:
    """config.json values that cannot describe this (or any) model."""
    values = [
        ("config-experts-per-token-0", "num_experts_per_tok", 0),
        ("config-experts-per-token-above-experts", "num_experts_per_tok", 9),
        ("config-layers-0", "num_hidden_layers", 0),
        ("config-layers-negative", "num_hidden_layers", -1),
        ("config-vocab-huge", "vocab_size", 10**12),
        ("config-kv-heads-0", "num_key_value_heads", 0),
        ("config-string-number", "num_local_experts", "8"),
        ("config-heads-not-divisible", "num_key_value_heads", 3),
        ("config-eos-past-vocab", "eos_token_id", 5000),
    ]
    cases = [
        Case(name, "config", copy_of("tiny", lambda c, k=key, v=value: edit_json(c / "config.json", set_keys(**{k: v}))),
             (("config.json",), (key, "embed_tokens") if key == "vocab_size" else (key,), (str(value),)),
             surfaces=(API, CLI) if name == "config-experts-per-token-0" else (API,), types=ANY_ERROR)
        for name, key, value in values
    ]
    return cases + [
        # A known model_type with an auto_map (as published DeepSeek-V3 has) may load with
        # transformers' own code; what must never happen is running the shipped code.
        Case("config-auto-map", "config", copy_of("tiny", _auto_map(None)), (("config.json",), ("auto_map",)),
             types=ANY_ERROR, allow_success=True),
        Case("config-auto-map-unknown-type", "config", copy_of("tiny", _auto_map("evil_moe")),
             (("config.json",), ("evil_moe", "auto_map", "trust_remote_code")), types=ANY_ERROR),
    ]


def _write(name: str, content: str) -> Callable[[Path], None]:
    def apply(ckpt: Path) -> None:
        (ckpt / name).write_text(content)

    return apply


def _break_chat_template(ckpt: Path):
    jinja = ckpt / "chat_template.jinja"
    broken = "{% for message in messages %}{{ message['content'] }"  # unclosed tag
    if jinja.is_file():
        jinja.write_text(broken)
    else:
        edit_json(ckpt / "tokenizer_config.json", set_keys(chat_template=broken))


def tokenizer_cases() -> list[Case]:
    """Tokenizer and generation files that are empty, corrupt or name what does not exist."""
    corrupt = [("tokenizer-json-corrupt", "tokenizer.json", '{"version": "1.0", "model": {'),
               ("tokenizer-json-empty", "tokenizer.json", ""),
               ("tokenizer-config-corrupt", "tokenizer_config.json", "{not json"),
               ("tokenizer-config-empty", "tokenizer_config.json", ""),
               ("generation-config-corrupt", "generation_config.json", '{"eos_token_id": '),
               ("generation-config-empty", "generation_config.json", "")]
    types = ("CheckpointError", "ConfigError")
    cases = [Case(name, "tokenizer", copy_of("tiny", _write(file, content)), ((file,),), types=types,
                  surfaces=(API, CLI) if name == "tokenizer-json-corrupt" else (API,))
             for name, file, content in corrupt]
    return cases + [
        Case("tokenizer-class-unknown", "tokenizer",
             copy_of("tiny", lambda c: edit_json(c / "tokenizer_config.json", set_keys(tokenizer_class="NoSuchTokenizerFast"))),
             (("NoSuchTokenizerFast",),), types=types),
        Case("chat-template-broken", "tokenizer", copy_of("tiny", _break_chat_template), (("chat_template",),),
             types=types, action="chat", surfaces=(API, CLI), cli_extra=("--chat-template",)),
        Case("generation-config-eos-past-vocab", "tokenizer",
             copy_of("tiny", _write("generation_config.json", json.dumps({"eos_token_id": 5000, "bos_token_id": 1}))),
             (("generation_config.json",), ("eos_token_id",), ("5000",)), types=types),
    ]


def token_id_cases() -> list[Case]:
    """Token ids handed to generate() that the embedding does not have (vocab_size 320)."""
    return [Case("token-id-past-vocab", "token_ids", shared("tiny"), (("5000",), ("320", "vocab")),
                 types=CONFIG_ERRORS, action="ids", ids=[[1, 5000]]),
            Case("token-id-negative", "token_ids", shared("tiny"), (("-3",), ("320", "vocab")),
                 types=CONFIG_ERRORS, action="ids", ids=[[1, -3]])]


def _manifest_edit(change: Callable[[dict], object]) -> Callable[[Path], None]:
    return lambda ckpt: edit_json(ckpt / MANIFEST, change)


def _flip_expert_bytes(ckpt: Path):
    file = sorted(ckpt.glob("experts-*.safetensors"))[0]
    size = file.stat().st_size
    with open(file, "r+b") as f:  # the middle of the file: packed weights, not the header
        f.seek(size // 2)
        chunk = f.read(16)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    return ((file.name,),)


def converted_cases() -> list[Case]:
    """A converted directory whose manifest was tampered with, or whose expert bytes changed."""
    edits = [
        ("converted-bits", lambda m: m["experts"].update(bits=3), ("bits",)),
        ("converted-group-size", lambda m: m["experts"].update(group_size=7), ("group_size",)),
        ("converted-moe-layers-extra", lambda m: m.update(moe_layers=m["moe_layers"] + [max(m["moe_layers"]) + 1]),
         ("moe_layers",)),
        ("converted-moe-layers-missing", lambda m: m.update(moe_layers=m["moe_layers"][:-1]), ("moe_layers",)),
        ("converted-format-other", lambda m: m["experts"].update(format="nf4"), ("format", "nf4")),
        ("converted-format-unknown", lambda m: m["experts"].update(format="hqq9"), ("hqq9",)),
        ("converted-manifest-list", lambda m: [m], ()),
    ]
    cases = [Case(name, "converted", copy_of("converted", _manifest_edit(change)),
                  ((MANIFEST,),) + ((extra,) if extra else ()))
             for name, change, extra in edits]
    return cases + [Case("converted-flipped-bytes", "converted", copy_of("converted", _flip_expert_bytes))]


def option(flag: str, value: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Culprit groups of a bad option: its name (flag, key or env form) and the value."""
    key = flag.lstrip("-").replace("-", "_")
    return ((flag, key, f"OFFLOAD_MOE_{key.upper()}"), (value,))


def _cli_option_cases() -> list[Case]:
    bad = [("--max-new-tokens", "0"), ("--max-new-tokens", "-1"), ("--top-p", "2"), ("--top-p", "-0.1"),
           ("--top-k", "-1"), ("--repetition-penalty", "0"), ("--repetition-penalty", "-1"),
           ("--repetition-penalty", "nan"), ("--seed", str(2**80)), ("--temperature", "nan"),
           ("--temperature", "-1"), ("--temperature", "inf")]
    cases = [Case(f"option{flag}-{value}", "options", shared("tiny"), option(flag, value), surfaces=(CLI,),
                  types=CONFIG_ERRORS, cli_extra=(flag, value)) for flag, value in bad]
    cases[0] = Case("option--max-new-tokens-0", "options", shared("tiny"), option("--max-new-tokens", "0"),
                    surfaces=(CLI, API), types=CONFIG_ERRORS, cli_extra=("--max-new-tokens", "0"),
                    generate={"max_new_tokens": 0})
    return cases


def _load_option_cases() -> list[Case]:
    """Options that are load() arguments too: both surfaces."""
    bad = [("--context", "-1", "context", -1), ("--gpu-memory", "-5GiB", "gpu_memory", "-5GiB"),
           ("--cpu-memory", "nan", "cpu_memory", "nan"),
           ("--record-routing", "/nonexistent/x.jsonl", "record_routing", "/nonexistent/x.jsonl")]
    return [Case(f"option{flag}-{value}".replace("/", "_"), "options", shared("tiny"), option(flag, value),
                 surfaces=(CLI, API),
                 types=CONFIG_ERRORS, cli_extra=(f"{flag}={value}",), load={key: api_value})
            for flag, value, key, api_value in bad]


def _cache_is_a_file(work: Path, bases: Bases) -> Prepared:
    (work / "cache-file").write_text("not a directory")
    return Prepared(bases.tiny, env={"OFFLOAD_MOE_CACHE": str(work / "cache-file")})


def _without_tokenizer(ckpt: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (ckpt / name).unlink(missing_ok=True)


def option_cases() -> list[Case]:
    """Options, environment and CLI input that cannot work."""
    return _cli_option_cases() + _load_option_cases() + [
        Case("env-hybrid-maybe", "options", shared("tiny"), (("OFFLOAD_MOE_HYBRID", "hybrid"), ("maybe",)),
             surfaces=(CLI,), env={"OFFLOAD_MOE_HYBRID": "maybe"}),
        # The cache is only used for a store that spills to disk: a 1KiB budget makes it spill.
        Case("env-cache-is-a-file", "options", _cache_is_a_file, (("OFFLOAD_MOE_CACHE", "cache-file"),),
             surfaces=(CLI,), cli_extra=("--cpu-memory", "1KiB")),
        Case("chat-binary-stdin", "options", shared("tiny"), (("stdin", "utf-8", "utf8", "decode", "binary"),),
             surfaces=(CLI,), cli=("chat", "{path}", "--max-new-tokens", "2"),
             stdin=b"\xff\xfe\x00\x80\x81 hi \xc3\x28\n\x00\x00\n", allow_success=True),
        Case("cli-no-tokenizer", "options", copy_of("tiny", _without_tokenizer), (("tokenizer",),), surfaces=(CLI,)),
        Case("plan-config-strings", "options",
             copy_of("tiny", lambda c: edit_json(c / "config.json", set_keys(hidden_size="64"))),
             (("hidden_size",), ("64",)), surfaces=(CLI,), cli=("plan", "{path}")),
    ]


CASES: list[Case] = (nan_cases() + dtype_cases() + overlap_cases() + header_cases() + path_cases()
                     + config_cases() + tokenizer_cases() + token_id_cases() + converted_cases() + option_cases())
PAIRS = [(case, surface) for case in CASES for surface in case.surfaces]


# ---------------------------------------------------------------------------------------------
# Running and classifying


@dataclass
class Outcome:
    case: Case
    surface: str
    verdict: str
    line: str  # the one line that says what happened (the error, or why it is not clean)
    seconds: float

    def describe(self) -> str:
        return f"{self.case.id} [{self.surface}]: {self.verdict} ({self.seconds:.0f}s): {self.line}"


def child_env(work: Path, extra: dict[str, str]) -> dict[str, str]:
    """The parent's environment without any OFFLOAD_MOE_* setting, offline, its own cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_MOE_")}
    python_path = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               OFFLOAD_MOE_CACHE=str(work / "cache"), PYTHONPATH=python_path)
    env.update(extra)
    return env


def names_found(text: str, groups: tuple[tuple[str, ...], ...]) -> list[tuple[str, ...]]:
    """The groups none of whose strings `text` contains."""
    low = text.lower()
    return [group for group in groups if not any(s.lower() in low for s in group)]


def last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def classify(case: Case, surface: str, groups, rc: int | None, output: str, ran_code: bool) -> tuple[str, str]:
    """(verdict, line) of one run; see the module docstring."""
    if rc is None:
        return "hang", f"no result after {case.timeout:.0f}s; last output: {last_line(output)}"
    if ran_code:
        return "silently wrong", "code shipped with the checkpoint was executed"
    if rc < 0:
        return "crash", f"killed by signal {-rc}; last output: {last_line(output)}"
    if surface == API:
        return _classify_api(case, groups, rc, output)
    return _classify_cli(case, groups, rc, output)


def _classify_api(case: Case, groups, rc: int, output: str) -> tuple[str, str]:
    tagged = [line for line in output.splitlines() if line.startswith(ERROR_TAG)]
    if rc == 0:
        return ("clean" if case.allow_success else "silently wrong"), "exit 0"
    if not tagged:
        return "unclear", f"not our error: {last_line(output)}"
    error = json.loads(tagged[-1][len(ERROR_TAG):])
    line = f"{error['type']}: {error['message']}"
    if error["type"] not in case.types:
        return "unclear", f"expected {' or '.join(case.types)}, got {line}"
    missing = names_found(error["message"], groups)
    return ("unclear", f"does not name {missing}: {line}") if missing else ("clean", line)


def _classify_cli(case: Case, groups, rc: int, output: str) -> tuple[str, str]:
    line = last_line(output)
    if "Traceback" in output:
        return "unclear", f"traceback: {line}"
    if rc == 0:
        return ("clean" if case.allow_success else "silently wrong"), "exit 0"
    if "error" not in line.lower():
        return "unclear", f"exit {rc}, last line is not an error: {line}"
    missing = names_found(line, groups)
    return ("unclear", f"does not name {missing}: {line}") if missing else ("clean", line)


class ProcessJob:
    """One command in a fresh interpreter, its output (stdout and stderr together) in a file."""

    def __init__(self, argv: list[str], env: dict[str, str], stdin: bytes | None, cwd: Path, out: Path):
        self.out = out
        with open(out, "wb") as sink:
            self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                                         start_new_session=True)
        if stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.write(stdin)
                self.proc.stdin.close()
        self.pid = self.proc.pid

    def done(self) -> bool:
        return self.proc.poll() is not None

    def wait(self, timeout: float) -> int | None:
        """The return code (negative: a signal), or None when it ran past `timeout` (then killed)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait()
            return None

    def output(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""


class ForkJob(ProcessJob):
    """One command forked by the ForkServer; the same interface as ProcessJob."""

    def __init__(self, slot: dict, out: Path):
        self.slot, self.out = slot, out
        slot["pid_known"].wait()
        if "pid" not in slot:
            raise RuntimeError("the fork server died; see fork-server.log")
        self.pid = slot["pid"]

    def done(self) -> bool:
        return self.slot["ended"].is_set()

    def wait(self, timeout: float) -> int | None:
        if self.slot["ended"].wait(timeout):
            if "rc" not in self.slot:
                raise RuntimeError("the fork server died; see fork-server.log")
            return self.slot["rc"]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.slot["ended"].wait(30)
        return None


class FreshInterpreters:
    """Each command in `python -c API_SCRIPT SPEC` or `python -m offload_moe.cli ARGS`."""

    def start(self, kind: str, args: list[str], env: dict[str, str], stdin: bytes | None, cwd: Path,
              name: str = "output") -> ProcessJob:
        head = ["-c", API_SCRIPT] if kind == API else ["-m", "offload_moe.cli"]
        return ProcessJob([sys.executable, *head, *args], env, stdin, cwd, cwd / f"{name}.txt")

    def run(self, kind: str, args: list[str], env: dict[str, str], stdin: bytes | None, timeout: float,
            cwd: Path) -> tuple[int | None, str]:
        job = self.start(kind, args, env, stdin, cwd)
        return job.wait(timeout), job.output()

    def close(self) -> None:
        pass


class ForkServer(FreshInterpreters):
    """The client of ZYGOTE_SCRIPT: the same commands, each forked from the preloaded server."""

    def __init__(self, root: Path):
        self.log = open(root / "fork-server.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE_SCRIPT, json.dumps(PRELOAD), API_SCRIPT],
                                     env=child_env(root, {}), cwd=root, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, start_new_session=True)
        ready = self.proc.stdout.readline()  # preloading takes seconds: no command's timeout may count them
        if not ready:
            raise RuntimeError(f"the fork server did not start; see {root / 'fork-server.log'}")
        self.lock = threading.Lock()
        self.slots: dict[int, dict] = {}
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            slot = self.slots[msg["id"]]
            slot.update(msg)
            slot["pid_known" if "pid" in msg else "ended"].set()
        for slot in list(self.slots.values()):  # the server is gone: nobody waits forever
            slot["pid_known"].set()
            slot["ended"].set()

    def start(self, kind: str, args: list[str], env: dict[str, str], stdin: bytes | None, cwd: Path,
              name: str = "output") -> ForkJob:
        stdin_file = cwd / f"{name}.stdin" if stdin is not None else None
        if stdin_file is not None:
            stdin_file.write_bytes(stdin)
        out = cwd / f"{name}.txt"
        slot = {"pid_known": threading.Event(), "ended": threading.Event()}
        with self.lock:
            ident = len(self.slots)
            self.slots[ident] = slot
            request = {"id": ident, "kind": kind, "args": args, "env": env, "cwd": str(cwd),
                       "stdin": stdin_file and str(stdin_file), "out": str(out)}
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        return ForkJob(slot, out)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.log.close()


def run_case(case: Case, surface: str, prepared: Prepared, work: Path, runner: FreshInterpreters,
             hide: tuple[Path, ...] = ()) -> Outcome:
    """One run, classified. The folders in `hide` (and `work`) are blanked out of the output first:
    their names (the case id among them) must not pass for the culprit's name or value."""
    env = child_env(work, {**case.env, **prepared.env})
    fill = {"path": str(prepared.path), "work": str(work)}
    if surface == API:
        spec = {"path": str(prepared.path), "load": case.load, "generate": case.generate, "action": case.action,
                "ids": case.ids}
        args = [json.dumps(spec)]
    else:
        args = [a.format(**fill) for a in case.cli_args()]
    start = time.perf_counter()
    rc, output = runner.run(surface, args, env, case.stdin, case.timeout, work)
    for folder in (work, *hide):
        output = output.replace(str(folder), "<dir>")
    ran_code = prepared.marker is not None and prepared.marker.exists()
    verdict, line = classify(case, surface, case.names + prepared.names, rc, output, ran_code)
    return Outcome(case, surface, verdict, line[:400], time.perf_counter() - start)


class Campaign:
    """Prepares the selected cases (one after another: they share the bases) and runs them in
    parallel subprocesses; outcomes are looked up by the tests."""

    def __init__(self, bases: Bases, root: Path, jobs: int, runner: FreshInterpreters):
        self.bases, self.root, self.jobs, self.runner = bases, root, jobs, runner
        self.outcomes: dict[tuple[str, str], Outcome] = {}
        self.broken: dict[tuple[str, str], Exception] = {}  # cases whose preparation failed

    def run(self, pairs: list[tuple[Case, str]]) -> None:
        todo = []
        for case, surface in pairs:
            work = self.root / f"{case.id}-{surface}".replace("/", "_")
            work.mkdir(parents=True)
            try:
                todo.append((case, surface, case.prepare(work, self.bases), work))
            except Exception as exc:  # a bug of this module, not of offload_moe: that test errors
                self.broken[(case.id, surface)] = exc
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            for outcome in pool.map(lambda job: run_case(*job, self.runner, (self.bases.root,)), todo):
                self.outcomes[(outcome.case.id, outcome.surface)] = outcome

    def get(self, case: Case, surface: str) -> Outcome:
        key = (case.id, surface)
        if key not in self.outcomes and key not in self.broken:
            self.run([(case, surface)])
        if key in self.broken:
            raise self.broken[key]
        return self.outcomes[key]

    def summary(self) -> str:
        counts: dict[str, Counter] = {}
        for outcome in self.outcomes.values():
            counts.setdefault(outcome.case.kind, Counter())[outcome.verdict] += 1
        rows = [f"{'kind':<11}" + "".join(f"{v:>16}" for v in VERDICTS)]
        rows += [f"{kind:<11}" + "".join(f"{c[v]:>16}" for v in VERDICTS) for kind, c in counts.items()]
        failing = [o.describe() for o in self.outcomes.values() if o.verdict != "clean"]
        failing += [f"{case_id} [{surface}]: could not be prepared: {exc!r}"
                    for (case_id, surface), exc in self.broken.items()]
        slowest = sorted(self.outcomes.values(), key=lambda o: -o.seconds)[:5]
        timing = "slowest: " + ", ".join(f"{o.case.id} [{o.surface}] {o.seconds:.0f}s" for o in slowest)
        return "\n".join(["bad inputs: outcomes per kind", *rows, timing, f"not clean ({len(failing)}):", *failing])


def _selected_pairs(session) -> list[tuple[Case, str]]:
    return [(item.callspec.params["case"], item.callspec.params["surface"]) for item in session.items
            if getattr(item, "originalname", None) == "test_bad_input_fails_cleanly"]


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> Bases:
    return Bases(tmp_path_factory.mktemp("bad_inputs_bases"))


@pytest.fixture(scope="session")
def runner(tmp_path_factory) -> Iterator[FreshInterpreters]:
    """Forks of one preloaded server, or fresh interpreters with BAD_INPUTS_FORK=0."""
    if os.environ.get("BAD_INPUTS_FORK", "1") == "0":
        yield FreshInterpreters()
        return
    server = ForkServer(tmp_path_factory.mktemp("bad_inputs_server"))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def campaign(request, bases, runner, tmp_path_factory) -> Iterator[Campaign]:
    jobs = int(os.environ.get("BAD_INPUTS_JOBS", (os.cpu_count() or 1) + 1))
    root = tmp_path_factory.mktemp("bad_inputs_cases")
    result = Campaign(bases, root, jobs, runner)
    result.run(_selected_pairs(request.session))
    yield result
    text = result.summary()
    (root / "summary.txt").write_text(text + "\n")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n{text}\n(also in {root / 'summary.txt'})")


@pytest.mark.parametrize(("case", "surface"), PAIRS, ids=[f"{c.id}-{s}" for c, s in PAIRS])
def test_bad_input_fails_cleanly(case: Case, surface: str, campaign: Campaign):
    outcome = campaign.get(case, surface)
    assert outcome.verdict == "clean", outcome.describe()


def test_cases_are_distinct():
    """Every case has its own id: the outcome table is keyed by it."""
    ids = [c.id for c in CASES]
    assert sorted(set(ids)) == sorted(ids)


def _api_output(kind: str, message: str) -> str:
    return "some warning\n" + ERROR_TAG + json.dumps({"type": kind, "message": message}) + "\n"


@pytest.mark.parametrize(("surface", "rc", "output", "verdict"), [
    (API, 2, _api_output("CheckpointError", "/x/model.safetensors: tensor 'k' has NaN"), "clean"),
    (API, 2, _api_output("CheckpointError", "/x/model.safetensors: something is off"), "unclear"),
    (API, 2, _api_output("ConfigError", "/x/model.safetensors: tensor 'k' has NaN"), "unclear"),
    (API, 1, "Traceback (most recent call last):\nKeyError: 'data_offsets'\n", "unclear"),
    (API, 0, "", "silently wrong"),
    (API, -11, "", "crash"),
    (API, None, "", "hang"),
    (CLI, 2, "loading x ...\nerror: /x/model.safetensors: tensor 'k' has NaN\n", "clean"),
    (CLI, 1, "Traceback (most recent call last):\nerror: model.safetensors k nan\n", "unclear"),
    (CLI, 2, "error: something is off\n", "unclear"),
    (CLI, 0, "done\n", "silently wrong"),
])
def test_classify(surface, rc, output, verdict):
    """The classifier itself, on made-up outputs: a verdict the tests rely on must be right."""
    case = Case("made-up", "nan", shared("tiny"))
    groups = (("model.safetensors",), ("'k'",), ("nan",))
    assert classify(case, surface, groups, rc, output, ran_code=False)[0] == verdict


def test_classify_checkpoint_code_that_ran_is_never_clean():
    case = Case("made-up", "config", shared("tiny"), allow_success=True)
    assert classify(case, API, (), 0, "", ran_code=True)[0] == "silently wrong"


# ---------------------------------------------------------------------------------------------
# Faults during convert


def convert_args(src: Path, dst: Path, *extra: str) -> list[str]:
    return ["convert", str(src), str(dst), "--experts", "hqq4", *extra]


def wait_for_partial_work(dst: Path, job: ProcessJob, timeout: float) -> Path | None:
    """The `DST.partial-<pid>` folder once convert has written its non-expert weights there
    (None if convert ended first): the moment it is half-way through writing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not job.done():
        for partial in dst.parent.glob(f"{dst.name}.partial-*"):
            if (partial / "model.safetensors").is_file():
                return partial
        time.sleep(0.01)
    return None


def dead_partials(dst: Path) -> list[Path]:
    """Partial folders whose process is gone."""
    dead = []
    for partial in dst.parent.glob(f"{dst.name}.partial-*"):
        try:
            os.kill(int(partial.name.rsplit("-", 1)[1]), 0)
        except (ProcessLookupError, ValueError):
            dead.append(partial)
    return dead


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_interrupted_convert_leaves_nothing_half_written(sig, bases, runner, tmp_path):
    """Killed half-way, convert leaves no DST that looks finished; the next convert to the same
    DST succeeds, and no partial folder of a dead process is left behind."""
    dst = tmp_path / "out"
    env = child_env(tmp_path, {})
    job = runner.start(CLI, convert_args(bases.slow_source, dst, "--optimize"), env, None, tmp_path, name="first")
    try:
        partial = wait_for_partial_work(dst, job, DEFAULT_TIMEOUT)
        assert partial is not None, f"convert ended before it could be interrupted: {last_line(job.output())}"
        os.kill(job.pid, sig)
        rc = job.wait(60)
    finally:
        if not job.done():
            job.wait(0)  # kills it
    assert rc is not None and rc != 0, f"the interrupted convert: rc {rc}: {last_line(job.output())}"
    assert not dst.exists() or (dst / MANIFEST).is_file(), f"{dst}: half-written destination left behind"
    rc, output = runner.run(CLI, convert_args(bases.slow_source, dst), env, None, DEFAULT_TIMEOUT, tmp_path)
    assert rc == 0, f"convert after the interrupted one: rc {rc}: {last_line(output)}"
    assert (dst / MANIFEST).is_file()
    assert not dead_partials(dst), f"left behind: {dead_partials(dst)}"


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` unwritable, even for root (who ignores modes): then it is made immutable."""
    folder.chmod(0o555)
    immutable = False
    try:
        probe = folder / ".probe"
        with contextlib.suppress(OSError):
            probe.mkdir()
        if probe.exists():
            probe.rmdir()
            immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
            if not immutable:
                pytest.skip("cannot make a folder read-only here (root without chattr)")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_convert_into_read_only_destination(bases, runner, tmp_path):
    """One error line naming the destination, before any work, and nothing written."""
    parent = tmp_path / "locked-parent"
    parent.mkdir()
    dst = parent / "out"
    case = Case("convert-read-only", "faults", shared("tiny"))
    with read_only(parent):
        rc, output = runner.run(CLI, convert_args(bases.tiny, dst), child_env(tmp_path, {}), None, DEFAULT_TIMEOUT,
                                tmp_path)
        leftovers = list(parent.iterdir())
    verdict, line = classify(case, CLI, (("locked-parent",),), rc, output, ran_code=False)
    assert verdict == "clean", line
    assert leftovers == []
