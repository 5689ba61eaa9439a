"""Every user-settable load and sampling option, defined once: its API keyword, CLI flag,
OFFLOAD_MOE_* environment variable, type, bounds, default and help.

The CLI derives its arguments from this table, reads the environment through it, and load(),
OffloadConfig and generate() check their keywords with it, so a value is refused the same way
whichever of the three it came from, by one ConfigError that names what the user wrote (the flag,
the variable or the keyword), the value, and what is allowed.

Kept free of torch and transformers: `offload-moe --help` imports it.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from offload_moe.errors import ConfigError
from offload_moe.planning.budget import DEFAULT_CONTEXT
from offload_moe.quant.formats import ATTENTION_FORMATS, FORMATS
from offload_moe.runtime.policies import DEFAULT_POLICY, POLICIES
from offload_moe.units import parse_bytes

DEFAULT_MAX_NEW_TOKENS = 128  # generate()'s and chat's reply length unless told otherwise
CLI_MAX_NEW_TOKENS = 256  # the CLI's: a terminal reply may run longer than an API call's default
ENV_PREFIX = "OFFLOAD_MOE_"
# torch.manual_seed accepts these (negative seeds are folded onto the unsigned range).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# OFFLOAD_MOE_* variables read outside this table (paths.py, quant/native.py, the notebook test).
OTHER_ENV = ("CACHE", "CPU_KERNEL", "NOTEBOOK_OUT")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")  # config.resolve_dtype's names
# dense_kernels: how a CPU computes the 16-bit non-expert layers (offload_moe.quant.cpu_linear,
# cpu_norm, cpu_router) and attention (offload_moe.model.fp32_attention). "torch" is transformers' own (bit-exact with
# it); "fast" offload_moe's kernels and fp32 attention math; "auto" fast where the answer is
# approximate anyway (quantized experts or attention), torch otherwise.
DENSE_KERNELS = ("auto", "fast", "torch")
DEFAULT_DENSE_KERNELS = "auto"
_DEVICE = re.compile(r"(cpu|cuda)(:\d+)?")


@dataclass(frozen=True)
class Option:
    """One option. kind: int, float, bool, size (bytes, '22GiB'), choice, device, text or
    output (a file to be written). Bounds apply to int and float; `low_open`/`high_open` make
    them strict. `name` is the API keyword; `flag` and `env` default to it spelled as such."""

    name: str
    kind: str
    help: str
    default: Any = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    flag: str = ""
    env: str = ""

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + (self.env or self.name.upper())

    def parse(self, value: Any, source: str = "api") -> Any:
        """`value` checked and converted; ConfigError naming the option as the user wrote it.
        A CLI message reads "--flag: keyword=value ..." so it also names the keyword."""
        if source == "api" and self.kind in ("int", "float") and isinstance(value, str):
            noun = "a whole number" if self.kind == "int" else "a number"  # a string would reach torch as is
            raise ConfigError(f"{self.name}={value!r} is a string, not {noun}; it must be {self.allowed()}")
        try:
            return _PARSERS[self.kind](self, value, self.env_var if source == "env" else self.name)
        except ConfigError as exc:
            if source != "cli":
                raise
            raise ConfigError(f"{self.cli_flag}: {exc}") from None

    def from_env(self, environ: Mapping[str, str] | None = None, default: Any = None) -> Any:
        """The option's value from its OFFLOAD_MOE_* variable, else `default` (else the table's)."""
        raw = (os.environ if environ is None else environ).get(self.env_var)
        if raw is None:
            return self.default if default is None else default
        return self.parse(raw, "env")

    def allowed(self) -> str:
        """What the option accepts, in words, for messages and help."""
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "bool":
            return "one of " + ", ".join(f"{t}/{f}" for t, f in zip(_TRUE, _FALSE))
        noun = {"int": "a whole number", "float": "a finite number"}.get(self.kind, "a value")
        return noun + _bounds_text(self)


def _bounds_text(opt: Option) -> str:
    low, high = opt.low, opt.high
    if low is not None and high is not None:
        return f" in {'(' if opt.low_open else '['}{_num(low)}, {_num(high)}{')' if opt.high_open else ']'}"
    if low is not None:
        return f" {'>' if opt.low_open else '>='} {_num(low)}"
    if high is not None:
        return f" {'<' if opt.high_open else '<='} {_num(high)}"
    return ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _in_bounds(opt: Option, x: float) -> bool:
    if opt.low is not None and (x < opt.low or (opt.low_open and x == opt.low)):
        return False
    return opt.high is None or not (x > opt.high or (opt.high_open and x == opt.high))


def _refuse(opt: Option, value: Any, where: str) -> ConfigError:
    return ConfigError(f"{where}={value!r} must be {opt.allowed()}")


def _parse_int(opt: Option, value: Any, where: str) -> int:
    try:
        if isinstance(value, (bool, float)):
            raise TypeError  # True is not a count, and 4.0 may be a typo for 4.5
        number = int(value.strip()) if isinstance(value, str) else operator.index(value)  # numpy ints too
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={value!r} is not a whole number; it must be {opt.allowed()}") from None
    if not _in_bounds(opt, number):
        raise _refuse(opt, value, where)
    return number


def _parse_float(opt: Option, value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise ConfigError(f"{where}={value!r} is not a number; it must be {opt.allowed()}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise ConfigError(f"{where}={value!r} is not a number; it must be {opt.allowed()}") from None
    if not math.isfinite(number) or not _in_bounds(opt, number):  # NaN would pass every comparison
        raise _refuse(opt, value, where)
    return number


def _parse_bool(opt: Option, value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(f"{where}={value!r} is not a yes/no value; use {opt.allowed()}")


def _parse_size(opt: Option, value: Any, where: str) -> int:
    return parse_bytes(value, where)


def _parse_choice(opt: Option, value: Any, where: str) -> str:
    text = value.strip() if isinstance(value, str) else value
    if text not in opt.choices:
        raise _refuse(opt, value, where)
    return text


def _parse_device(opt: Option, value: Any, where: str) -> Any:
    # A torch.device from the API passes through; config.resolve_device checks it (and CUDA).
    if isinstance(value, str) and not _DEVICE.fullmatch(value.strip().lower()):
        raise ConfigError(f"{where}={value!r} is not a device; use cpu, cuda or cuda:N")
    return value.strip().lower() if isinstance(value, str) else value


def _parse_text(opt: Option, value: Any, where: str) -> Any:
    if isinstance(value, str):
        check_text(value, where)
    return value


def _parse_output(opt: Option, value: Any, where: str) -> Path:
    return check_output_file(value, where)


_PARSERS = {"int": _parse_int, "float": _parse_float, "bool": _parse_bool, "size": _parse_size,
            "choice": _parse_choice, "device": _parse_device, "text": _parse_text, "output": _parse_output}


def check_text(text: str, where: str) -> str:
    """Refuse text that is not valid Unicode (bytes a non-UTF-8 terminal or pipe smuggled in as
    surrogates): a tokenizer would fail on it with a TypeError far from the cause."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{where}: not UTF-8 text (undecodable byte at position {exc.start}); "
                          "give the text in UTF-8") from None
    return text


def check_output_file(path: Any, where: str) -> Path:
    """A file about to be written: its folder must exist and be writable, and it must not be a
    folder itself; checked before loading so that a typo does not cost a whole load."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ConfigError(f"{where}={path!r} must be a file path")
    target = Path(path).expanduser()
    folder = target.parent
    if target.is_dir():
        raise ConfigError(f"{where}={str(path)!r} is a folder; name a file to write")
    if not folder.is_dir():
        raise ConfigError(f"{where}={str(path)!r}: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}={str(path)!r}: folder {str(folder)!r} is not writable")
    return target


def check_cache_env(environ: Mapping[str, str] | None = None) -> None:
    """OFFLOAD_MOE_CACHE and XDG_CACHE_HOME, when set, must name a folder (or a place one can be
    made): not a file, nor under one."""
    environ = os.environ if environ is None else environ
    # Only the variable paths.default_cache_dir uses: OFFLOAD_MOE_CACHE first, else XDG_CACHE_HOME.
    for var in (ENV_PREFIX + "CACHE", "XDG_CACHE_HOME"):
        value = environ.get(var)
        if not value:
            continue
        place = Path(value).expanduser()
        while not place.exists() and place.parent != place:
            place = place.parent  # the nearest part that exists decides whether the folder can be made
        if not place.is_dir():
            raise ConfigError(f"{var}={value!r}: {str(place)!r} is a file, not a folder; "
                              "point it at a folder for offload_moe's cache")
        if not os.access(place, os.W_OK | os.X_OK):
            raise ConfigError(f"{var}={value!r}: {str(place)!r} is not writable")
        return


LOAD_OPTIONS: tuple[Option, ...] = (
    Option("device", "device", "cuda, cuda:N or cpu (default: cuda if available)"),
    Option("dtype", "choice", "compute dtype (default: the checkpoint's)", choices=DTYPE_NAMES),
    Option("experts", "choice", "expert format: hqq4/hqq3/hqq2/hqq2g64/nf4 quantize while loading; bf16/fp16 keep "
           "them unquantized; gptq: a GPTQ checkpoint as is (default: the checkpoint's own)",
           choices=(*FORMATS, "gptq")),
    Option("attention", "choice", "also quantize the attention projections; q8 (8-bit, CPU only) for speed "
           "(default: 16-bit)", choices=tuple(ATTENTION_FORMATS)),
    Option("dense_kernels", "choice", "CPU kernels for 16-bit attention, norms, routers and lm_head: fast (offload_moe's, "
           "fp32 attention math), torch (bit-exact with transformers), auto (fast when experts or attention are "
           "quantized)", default=DEFAULT_DENSE_KERNELS, choices=DENSE_KERNELS),
    Option("optimize", "bool", "quantize with the hqq optimiser (slow) instead of round-to-nearest", default=False),
    Option("slots_per_layer", "int", "expert slots per layer on the device", low=1, flag="--slots", env="SLOTS"),
    Option("gpu_memory", "size", "device budget, e.g. 22GiB; plans the slots"),
    Option("context", "int", "tokens of KV cache a --gpu-memory budget keeps room for",
           default=DEFAULT_CONTEXT, low=1, high=2**24),
    Option("cpu_memory", "size", "host RAM for experts, e.g. 8GiB; beyond it they are memory-mapped from disk"),
    Option("policy", "choice", "expert eviction policy", default=DEFAULT_POLICY,
           choices=tuple(sorted(POLICIES))),
    Option("prefetch_top_n", "int", "next-layer experts to prefetch per call (default: top-k on CUDA, 0 on CPU)",
           low=0, flag="--prefetch", env="PREFETCH"),
    Option("hybrid", "bool", "compute missing experts on the CPU when cheaper than copying (default: on for CUDA)"),
    Option("record_routing", "output", "write every call's routing as JSON lines to this file"),
)

SAMPLING_OPTIONS: tuple[Option, ...] = (
    Option("temperature", "float", "0 means greedy", default=0.0, low=0),
    Option("top_p", "float", "nucleus sampling mass", default=1.0, low=0, high=1, low_open=True),
    Option("top_k", "int", "sample among the k likeliest tokens; 0 means off", default=0, low=0),
    Option("repetition_penalty", "float", "1 means none", default=1.0, low=0, low_open=True),
    Option("max_new_tokens", "int", "tokens to generate at most",
           default=CLI_MAX_NEW_TOKENS, low=1),
    Option("seed", "int", "random seed for sampling", low=SEED_MIN, high=SEED_MAX),
    Option("ignore_eos", "bool", "always generate --max-new-tokens tokens", default=False),
)

# Translation models whose tokenizer has language codes (NLLB-MoE): generate()'s and the CLI
# generate's; refused for a model without them.
LANGUAGE_OPTIONS: tuple[Option, ...] = (
    Option("src_lang", "text", "language code of the prompt, for a translation model with language codes "
           "(NLLB-MoE: eng_Latn; default: its tokenizer's)"),
    Option("tgt_lang", "text", "language code to translate into (NLLB-MoE: deu_Latn); generation starts with it"),
)

OTHER_OPTIONS: tuple[Option, ...] = (
    Option("model", "text", "checkpoint directory"),
    Option("system", "text", "system prompt"),
    Option("cpu_bandwidth", "size", "host DRAM bandwidth per second for the speed model",
           default=60 * 10**9),
)

SERVE_OPTIONS: tuple[Option, ...] = (
    Option("host", "text", "address to listen on (0.0.0.0 exposes the server to the network)", default="127.0.0.1"),
    Option("port", "int", "port to listen on (0: any free port)", default=8000, low=0, high=65535),
    Option("api_key", "text", "require 'Authorization: Bearer KEY' on every API request"),
    Option("max_batch", "int", "requests decoded together in one forward", default=8, low=1, high=256),
    Option("max_queue", "int", "requests allowed to wait for a place; beyond it the server answers 429",
           default=32, low=0),
)

OPTIONS: dict[str, Option] = {o.name: o for o in (*LOAD_OPTIONS, *SAMPLING_OPTIONS, *LANGUAGE_OPTIONS, *OTHER_OPTIONS,
                                                    *SERVE_OPTIONS)}

# generate() keywords checked by the table (the rest go to transformers as they are).
GENERATION_KEYWORDS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty")


def option(name: str, **changes: Any) -> Option:
    """The table's option `name`, with some fields changed (a subcommand's own default or choices)."""
    return replace(OPTIONS[name], **changes) if changes else OPTIONS[name]


def check_keyword(name: str, value: Any) -> Any:
    """An API keyword's value checked by the table; None passes (it means the default)."""
    return None if value is None else OPTIONS[name].parse(value, "api")


def unknown_env(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """OFFLOAD_MOE_* variables nothing reads (a typo is otherwise silently ignored), each with the
    closest known name or None."""
    import difflib

    environ = os.environ if environ is None else environ
    known = {o.env_var for o in OPTIONS.values()} | {ENV_PREFIX + n for n in OTHER_ENV}
    found = sorted(v for v in environ if v.startswith(ENV_PREFIX) and v not in known)
    return [(v, next(iter(difflib.get_close_matches(v, sorted(known), 1)), None)) for v in found]
