"""Command line: `offload-moe chat [MODEL]`, `offload-moe generate MODEL --prompt ...`,
`offload-moe convert SRC DST --experts hqq4`, `offload-moe plan MODEL --gpu-memory 24GiB`.

Every load and sampling option is defined once, in offload_moe/options.py, and can also come
from its OFFLOAD_MOE_* environment variable (e.g. OFFLOAD_MOE_DEVICE=cpu, OFFLOAD_MOE_SLOTS=4,
OFFLOAD_MOE_TEMPERATURE=0.7), checked like the flag; a flag on the command line wins. Every
error a user can cause prints as one line; --debug (before or after the command) shows the
traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, TextIO

# Only what the parser needs (--help stays light); each command imports its heavy modules itself.
from offload_moe.errors import CheckpointError, ConfigError, OffloadMoeError
from offload_moe.options import (LANGUAGE_OPTIONS, LOAD_OPTIONS, SAMPLING_OPTIONS, SERVE_OPTIONS, Option, check_cache_env,
                                 check_text, option, unknown_env)
from offload_moe.quant.formats import FORMATS, parse_format
from offload_moe.units import format_bytes


HELP_TEXT = """commands:
  /reset   forget the conversation (and its KV cache)
  /stats   expert cache hit rates and bytes moved, per layer
  /help    this text
  /exit    leave (Ctrl-D works too)
Ctrl-C stops a reply; Ctrl-C at the prompt (or twice) exits."""

# The files api._load_tokenizer looks for: without one, chat and generate cannot run, which is
# said before the weights are loaded rather than after.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# chat's sampling defaults come from offload_moe.chat.CHAT_SAMPLING (its keys), not the table.
_CHAT_SAMPLED = ("temperature", "top_p", "repetition_penalty")
DEMO_MODEL_ID = "offload-moe-demo"  # what `serve` without a model calls the built-in demo model
# A value such as -5GiB, -inf or -1e3 after its flag: argparse takes it for an unknown flag and
# says only "expected one argument", so it is joined to its flag (--gpu-memory=-5GiB) and
# refused by the option's own check, which names the value.
_DASH_VALUE = re.compile(r"-(\d|\.\d|inf|nan)", re.IGNORECASE)


def _join_dash_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    for token in argv:
        prev = out[-1] if out else ""
        if "--" not in out and prev.startswith("--") and "=" not in prev and prev != "--" and _DASH_VALUE.match(token):
            out[-1] = f"{prev}={token}"
        else:
            out.append(token)
    return out


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (a ConfigError main prints), and whose table options
    not given on the command line are read from their OFFLOAD_MOE_* variable, checked and named
    as that variable, only for the command that runs (a variable meant for chat cannot break
    plan). `explicit_options` on the result names the options the user set either way."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.table: list[tuple[str, Option]] = []

    def error(self, message: str):
        raise ConfigError(f"{message} (`{self.prog} --help` lists the options)")

    def add_option(self, group: Any, opt: Option, show_default: bool = True) -> None:
        dest = opt.cli_flag[2:].replace("-", "_")
        text = opt.help
        if show_default and opt.default is not None and opt.kind != "bool":
            shown = format_bytes(opt.default) if opt.kind == "size" else opt.default
            text += f" (default {shown})"
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": f"{text} [{opt.env_var}]"}
        if opt.kind == "bool":  # a tri-state (None: decided by the device) gets --no-FLAG too
            kwargs["action"] = argparse.BooleanOptionalAction if opt.default is None else "store_true"
        else:
            kwargs["type"] = lambda value, opt=opt: opt.parse(value, "cli")
            if opt.choices:
                kwargs["metavar"] = "{" + ",".join(opt.choices) + "}"
        group.add_argument(opt.cli_flag, **kwargs)
        self.table.append((dest, opt))

    def parse_known_args(self, args: Any = None, namespace: Any = None):
        argv = _join_dash_values(list(sys.argv[1:] if args is None else args))
        namespace, rest = super().parse_known_args(argv, namespace)
        explicit = set(getattr(namespace, "explicit_options", ()))
        for dest, opt in self.table:
            if hasattr(namespace, dest):
                explicit.add(opt.name)
                continue
            if opt.env_var in os.environ:
                explicit.add(opt.name)
            setattr(namespace, dest, opt.from_env())
        if self.table:
            namespace.explicit_options = explicit
        return namespace, rest


def _add_load_options(p: _Parser) -> None:
    g = p.add_argument_group("loading (each also from the environment variable in brackets)")
    slots = g.add_mutually_exclusive_group()
    for opt in LOAD_OPTIONS:
        p.add_option(slots if opt.name in ("slots_per_layer", "gpu_memory") else g, opt)


def _add_sampling_options(p: _Parser, chat: bool = False) -> None:
    note = ("chat samples unless told otherwise (temperature 0.8, top-p 0.9, repetition penalty 1.1); "
            "--temperature 0 is greedy") if chat else "greedy unless --temperature is above 0"
    g = p.add_argument_group("sampling (each also from the environment variable in brackets)", note)
    for opt in SAMPLING_OPTIONS:
        p.add_option(g, opt, show_default=not (chat and opt.name in _CHAT_SAMPLED))


def _gpu_name(name: str) -> str:
    """--gpu's check. The GPU table lives with the speed model (offload_moe/planning/perfmodel.py
    HARDWARE), so it is read only when the plan command parses, not for --help or the other
    commands; a bad name still exits through argparse, as a `choices` list would."""
    from offload_moe.planning.planner import GPUS

    if name not in GPUS:
        raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {', '.join(map(repr, sorted(GPUS)))})")
    return name


def _add_plan_parser(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser("plan", help="where a model's parts would live and how fast it would run (reads config only)")
    _add_debug(plan)
    plan.add_argument("model", help="checkpoint directory (only config.json is read), a config.json file, or a "
                      "published checkpoint's name such as Qwen/Qwen3-30B-A3B")
    plan.add_option(plan, option("gpu_memory", default=24 * 2**30))
    plan.add_option(plan, option("cpu_memory", help="host RAM for experts (default: all of this machine's RAM)"))
    plan.add_option(plan, option("experts", default="hqq4", help="expert format", choices=tuple(FORMATS)))
    plan.add_option(plan, option("context", help="tokens of KV cache to keep room for"))
    plan.add_argument("--gpu", default="rtx4090", type=_gpu_name, metavar="NAME",
                      help="GPU whose memory bandwidth the speed model uses (default rtx4090; a bad name lists them)")
    plan.add_option(plan, option("cpu_bandwidth"))
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API, with a chat page at /")
    _add_debug(serve)
    serve.add_argument("model", nargs="?", default=option("model").from_env(),
                       help="checkpoint directory (default: the built-in demo model) [OFFLOAD_MOE_MODEL]")
    g = serve.add_argument_group("serving (each also from the environment variable in brackets)")
    for opt in SERVE_OPTIONS:
        serve.add_option(g, opt)
    _add_load_options(serve)


def _add_debug(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's --debug only ever turns it on, never hides the top-level one.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="offload-moe", description="Run Mixture-of-Experts LLMs with offloaded experts.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="chat with a model (the built-in demo model if none is given)")
    _add_debug(chat)
    chat.add_argument("model", nargs="?", default=option("model").from_env(), help="checkpoint directory [OFFLOAD_MOE_MODEL]")
    chat.add_argument("--system", default=option("system").from_env(), help="system prompt [OFFLOAD_MOE_SYSTEM]")
    _add_load_options(chat)
    _add_sampling_options(chat, chat=True)

    gen = sub.add_parser("generate", help="print the completion of one prompt and exit")
    _add_debug(gen)
    gen.add_argument("model", nargs="?", default=option("model").from_env(), help="checkpoint directory [OFFLOAD_MOE_MODEL]")
    gen.add_argument("--prompt", help="the prompt (default: read from stdin)")
    gen.add_argument("--chat-template", action="store_true", help="wrap the prompt as a user turn of the chat template")
    gen.add_argument("--raw", action="store_true", help="complete the prompt as plain text (default: as a user turn of the chat template, when the model has one)")
    gen.add_argument("--json", action="store_true", help="print text and stats as JSON")
    _add_load_options(gen)
    _add_sampling_options(gen)
    lang = gen.add_argument_group("translation (each also from the environment variable in brackets)")
    for opt in LANGUAGE_OPTIONS:
        gen.add_option(lang, opt)
    _add_plan_parser(sub)
    _add_serve_parser(sub)

    conv = sub.add_parser("convert", help="quantize a checkpoint's experts into a converted directory")
    _add_debug(conv)
    conv.add_argument("src", help="Hugging Face checkpoint directory")
    conv.add_argument("dst", help="output directory (must not exist)")
    conv.add_option(conv, option("experts", default="hqq4", help="expert format",
                                 choices=tuple(f for f in FORMATS if FORMATS[f].quantized)))
    conv.add_option(conv, option("optimize"))
    return parser


def _plan_config(model: str):
    """(config, directory shown) for `plan MODEL`: a directory, its config.json, or a published
    name. A file's config goes through the same validation as a load (checkpoint/config_check)."""
    from offload_moe.checkpoint.config_check import load_validated_config
    from offload_moe.checkpoint.published import PUBLISHED, published_config

    path = Path(model).expanduser()
    config_dir = path.parent if path.name == "config.json" else path
    if not path.exists() and model in PUBLISHED:
        return published_config(model), config_dir  # a known checkpoint, planned before any download
    if not (config_dir / "config.json").is_file():
        raise CheckpointError(f"{config_dir / 'config.json'}: missing; give a model directory or its config.json "
                              f"(or a known checkpoint name: {', '.join(sorted(PUBLISHED))})")
    return load_validated_config(config_dir), config_dir


def _check_plan(plan, speeds: dict[str, float], config_dir: Path) -> None:
    """A plan whose sizes or speeds make no sense means a config the checks let through: refused
    rather than printed as a prediction."""
    import math

    sizes_ok = plan.expert_bytes > 0 and plan.non_expert_bytes > 0 and plan.moe_layers >= 1
    if not (sizes_ok and 1 <= plan.experts_per_token <= plan.num_experts):
        raise CheckpointError(f"{config_dir / 'config.json'}: describes no usable MoE model ({plan.moe_layers} MoE layers, "
                              f"top-{plan.experts_per_token} of {plan.num_experts} experts, "
                              f"{plan.expert_bytes} bytes per expert); cannot plan it")
    bad = {name: s for name, s in speeds.items() if not (math.isfinite(s) and s > 0)}
    if bad:
        raise CheckpointError(f"{config_dir / 'config.json'}: the speed model gives {bad} tok/s; cannot plan this config")


def _key_ranges(keys: list[int]) -> str:
    """MoE layer keys as the runtime numbers them ("1, 3, ..., 11" for an arithmetic run)."""
    if len(keys) > 3 and len({b - a for a, b in zip(keys, keys[1:])}) == 1:
        return f"{keys[0]}, {keys[1]}, ..., {keys[-1]}"
    return ", ".join(map(str, keys))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def run_plan(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    import psutil

    from offload_moe.planning.planner import GPUS, PCIE, plan_model

    config, config_dir = _plan_config(args.model)
    # Total RAM, not what is free now: the plan then does not change from run to run.
    cpu_memory = args.cpu_memory if args.cpu_memory is not None else psutil.virtual_memory().total
    # An unasked-for hqq4 whose groups do not divide the model's shapes: planned 16-bit, as load
    # would keep those experts (an explicit --experts is planned as given, or refused).
    fallback = None if "experts" in getattr(args, "explicit_options", set()) else "bf16"
    where = str(config_dir / "config.json") if (config_dir / "config.json").is_file() else args.model  # a published name
    plan = plan_model(config, args.experts, args.gpu_memory, cpu_memory, args.context, fallback_format=fallback,
                      where=where)
    if plan.expert_format != parse_format(args.experts).name:
        print(f"note: {args.experts} does not fit these experts' shapes; planned as {plan.expert_format} "
              "(--experts chooses another format)", file=sys.stderr)
    gpu_bw, cpu_bw = GPUS[args.gpu], args.cpu_bandwidth
    speeds = {name: plan.tokens_per_s(bw, gpu_bw) for name, bw in PCIE.items()}
    speeds["hybrid"] = plan.tokens_per_s(PCIE["pcie4"], gpu_bw, cpu_bw)
    _check_plan(plan, speeds, config_dir)
    if args.json:
        print(json.dumps({**plan.as_dict(), "modeled_tokens_per_s": {"gpu": args.gpu, "cpu_bandwidth": cpu_bw, **speeds}},
                         indent=2), file=out)
        return 0
    s = plan.slots
    ram = "" if args.cpu_memory is not None else ", this machine's total RAM; --cpu-memory sets it"
    print(f"{config_dir}: {plan.model_type}, {plan.moe_layers} MoE layers x {plan.num_experts} experts "
          f"(top-{plan.experts_per_token}), experts as {plan.expert_format}: {format_bytes(plan.expert_bytes)} each", file=out)
    if plan.stacks:
        decoder = "" if "decoder" in plan.stacks else "; the decoder has none (dense)"
        print("MoE layers: " + "; ".join(f"{_plural(len(keys), name + ' layer')} (keys {_key_ranges(keys)})"
                                         for name, keys in plan.stacks.items())
              + decoder + "; a generated token passes the decoder's only", file=out)
    print(f"device ({format_bytes(s.budget)}): non-expert weights {format_bytes(plan.non_expert_bytes)}, "
          f"KV cache for {args.context} tokens {format_bytes(s.kv_cache_bytes)}, "
          f"{_plural(s.slots_per_layer, 'expert slot')} per layer {format_bytes(s.slot_bytes)}", file=out)
    print(f"host RAM ({format_bytes(plan.host_budget)}{ram}): pinned experts {format_bytes(plan.host_expert_bytes)}"
          + (f"; disk (memory-mapped store file): {format_bytes(plan.disk_expert_bytes)}" if plan.disk_expert_bytes else ""),
          file=out)
    print(f"expected hit rate {plan.hit_rate:.0%} -> {format_bytes(plan.bytes_moved_per_token)} moved per token", file=out)
    print(f"modeled decode speed on {args.gpu} (a model, not a measurement): copying misses over "
          + ", ".join(f"{name} {speeds[name]:.1f}" for name in PCIE)
          + f" tok/s; computing misses on the CPU at {cpu_bw / 1e9:.0f} GB/s (hybrid) {speeds['hybrid']:.1f} tok/s",
          file=out)
    return 0


def run_convert(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    from offload_moe.conversion import convert

    dst = convert(args.src, args.dst, experts=args.experts, optimize=args.optimize, progress=True)
    print(f"converted {args.src} -> {dst} (experts {args.experts})", file=out)
    return 0


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """generate()'s keywords from the sampling options. generate is greedy unless --temperature
    is above 0; chat passes only what the user set (flag or variable), so that ChatSession's own
    sampling defaults (chat.CHAT_SAMPLING) fill in the rest."""
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    kwargs.update({o.name: getattr(args, o.name) for o in LANGUAGE_OPTIONS if getattr(args, o.name, None) is not None})
    if args.ignore_eos:
        kwargs["min_new_tokens"] = args.max_new_tokens
    if args.command == "chat":
        explicit = getattr(args, "explicit_options", set())
        kwargs.update({name: getattr(args, name) for name in (*_CHAT_SAMPLED, "top_k") if name in explicit})
        if kwargs.get("top_k") == 0:
            del kwargs["top_k"]  # 0 means off
        return kwargs
    kwargs["repetition_penalty"] = args.repetition_penalty
    if args.temperature > 0:
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
        if args.top_k:
            kwargs["top_k"] = args.top_k
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def _check_tokenizer_files(path: str | Path) -> None:
    """chat and generate need a tokenizer: a model directory without one is refused before
    loading (a missing or broken directory is left to the loader's own messages)."""
    folder = Path(path).expanduser()
    if (folder / "config.json").is_file() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{folder}: the model has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                              "chat and generate need one (the Python API generates from token ids without one)")


def load_model(args: argparse.Namespace):
    """Load args.model, or the built-in demo model when none is given."""
    import offload_moe
    if getattr(args, "seed", None) is not None:
        import torch

        torch.manual_seed(args.seed)
    path, slots = args.model, args.slots
    if path is None:
        from offload_moe.demo import ensure_demo_checkpoint

        path = ensure_demo_checkpoint(log=lambda msg: print(msg, file=sys.stderr))
        if slots is None and args.gpu_memory is None:
            slots = 4  # the demo shows the cache at work: 4 of its 8 experts per layer on the device
    _check_tokenizer_files(path)
    print(f"loading {path} ...", file=sys.stderr)
    return offload_moe.load(
        path,
        device=args.device,
        dtype=args.dtype,
        experts=args.experts,
        attention=args.attention,
        dense_kernels=args.dense_kernels,
        optimize=args.optimize,
        slots_per_layer=slots,
        gpu_memory=args.gpu_memory,
        cpu_memory=args.cpu_memory,
        context=args.context,
        prefetch_top_n=args.prefetch,
        hybrid=args.hybrid,
        record_routing=args.record_routing,
        progress=True,
        policy=args.policy,
    )


def format_stats(stats: dict[str, Any]) -> str:
    from offload_moe.units import format_bytes

    def rate(row: dict[str, Any]) -> str:
        # A layer no token has reached yet has no hit rate; "0.0%" would read as a cold cache.
        return f"{row['hit_rate']:>8.1%}" if row["hits"] + row["misses"] else f"{'-':>8}"

    lines = [f"{'layer':>5} {'slots':>5} {'hits':>7} {'misses':>7} {'hit rate':>8} {'copied':>12}"]
    for row in stats["layers"]:
        lines.append(f"{row['layer']:>5} {row['slots']:>5} {row['hits']:>7} {row['misses']:>7} "
                     f"{rate(row)} {format_bytes(row['bytes_copied']):>12}")
    t = stats["total"]
    lines.append(f"{'all':>5} {'':>5} {t['hits']:>7} {t['misses']:>7} {rate(t)} {format_bytes(t['bytes_copied']):>12}")
    return "\n".join(lines)


def _read_line(stdin: TextIO, out: TextIO) -> str:
    """One line typed at the prompt; EOFError at the end of input, ConfigError for bytes that are
    not UTF-8 text (the tokenizer would fail on them with a TypeError)."""
    if stdin.isatty():
        return check_text(input(">>> "), "stdin")
    print(">>> ", end="", file=out, flush=True)
    try:
        line = stdin.readline()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"stdin: a chat line is not UTF-8 text ({exc.reason}: {exc.object[exc.start:exc.end]!r})") from None
    if not line:
        raise EOFError
    check_text(line, "stdin")
    # No terminal echoes piped input: without this a transcript reads ">>> The capital ...".
    print(line.rstrip("\r\n"), file=out, flush=True)
    return line


def _slash_command(text: str, session, llm, out: TextIO) -> bool:
    """Run a /command; True when it asks to leave."""
    command = text.split()[0].lower()
    if command in ("/exit", "/quit", "/bye"):
        print("bye", file=out, flush=True)
        return True
    if command == "/reset":
        session.reset()
        print("(conversation cleared)", file=out, flush=True)
    elif command == "/stats":
        print(format_stats(llm.stats()), file=out, flush=True)
    elif command == "/help":
        print(HELP_TEXT, file=out, flush=True)
    else:
        print(f"unknown command {command}; /help lists them", file=out, flush=True)
    return False


def _reply(text: str, session, llm, out: TextIO) -> bool:
    """Stream one reply and its footer; Ctrl-C stops the reply, a second one leaves (False)."""

    def on_sigint(signum, frame):
        if session.stop_flag.is_set:  # second Ctrl-C during a reply: leave
            raise KeyboardInterrupt
        session.stop_flag.set()

    def show(piece: str) -> None:
        # After Ctrl-C the streamer still flushes the text it held back: the reply shown ends at
        # the Ctrl-C.
        if not session.stop_flag.is_set:
            print(piece, end="", file=out, flush=True)

    before = llm.stats()["total"]
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = session.send(text, on_text=show)
    except KeyboardInterrupt:
        print("\nbye", file=out, flush=True)
        return False
    except OffloadMoeError as exc:
        print(f"error: {exc}", file=out, flush=True)
        return True
    finally:
        signal.signal(signal.SIGINT, previous)
    after = llm.stats()["total"]
    uses = (after["hits"] - before["hits"]) + (after["misses"] - before["misses"])
    hit_rate = (after["hits"] - before["hits"]) / uses if uses else 1.0
    note = " (stopped)" if result.interrupted else ""
    print(f"\n[{result.new_tokens} tokens, {result.tokens_per_s:.1f} tok/s, expert hit rate {hit_rate:.0%}]{note}",
          file=out, flush=True)
    return True


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    stdin, out = stdin or sys.stdin, out or sys.stdout
    llm = load_model(args)
    # The session fills in the sampling the user left unset with chat.CHAT_SAMPLING (ollama's
    # defaults); greedy stays one flag away (--temperature 0).
    session = llm.chat_session(system_prompt=args.system, **generation_kwargs(args))
    print("Chat ready. /help for commands, /exit or Ctrl-D to leave.", file=out, flush=True)
    while True:
        try:
            text = _read_line(stdin, out).strip()
        except (EOFError, KeyboardInterrupt):
            print("\nbye", file=out, flush=True)
            return 0
        if not text:
            continue
        if text.startswith("/"):
            if _slash_command(text, session, llm, out):
                return 0
        elif not _reply(text, session, llm, out):
            return 0


def run_generate(args: argparse.Namespace, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """Print the reply to one prompt. The prompt is a user turn of the model's chat template when
    it has one (an instruct model given the bare prompt often ends at once, printing nothing);
    --raw, or a model without a template, completes it as plain text, like llama.cpp and ollama.
    --chat-template names that default and stays accepted for old scripts."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    if args.raw and args.chat_template:
        raise ConfigError("--raw and --chat-template contradict each other: --raw completes the prompt as plain "
                          "text, --chat-template (the default) sends it as a user turn of the chat template")
    if args.prompt is None and stdin.isatty():
        print("reading the prompt from stdin; end it with Ctrl-D ...", file=sys.stderr, flush=True)
    try:
        prompt = args.prompt if args.prompt is not None else stdin.read()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"stdin: the prompt is not UTF-8 text ({exc.reason}: {exc.object[exc.start:exc.end]!r})") from None
    check_text(prompt, "--prompt" if args.prompt is not None else "stdin")
    if not prompt.strip():
        raise ConfigError("no prompt: pass --prompt TEXT or pipe it on stdin")
    llm = load_model(args)
    kwargs = generation_kwargs(args)
    templated = not args.raw and bool(getattr(llm.tokenizer, "chat_template", None))
    if not args.raw and not templated and llm.tokenizer is not None and not llm.is_encoder_decoder:
        print(f"note: {llm.path} has no chat template; completing the prompt as plain text", file=sys.stderr)
    if templated:
        text = llm.chat([{"role": "user", "content": prompt.strip()}], **kwargs)
    else:
        text = llm.generate(prompt, **kwargs)
        if args.raw and not text.strip() and getattr(llm.tokenizer, "chat_template", None):
            print("note: the model ended its completion at once (an instruct model often does); without --raw "
                  "the prompt goes through its chat template", file=sys.stderr)
    if args.json:
        print(json.dumps({"text": text, "chat_template": templated, "stats": llm.stats()}, indent=2), file=out)
    else:
        print(text, file=out)
    return 0


def _check_environment(args: argparse.Namespace) -> None:
    """What the commands read besides their options, checked before any work: text arguments
    must be UTF-8, the cache variables must name a folder; unknown OFFLOAD_MOE_* (a typo would
    be ignored silently) get a warning."""
    for name in ("prompt", "system"):
        if isinstance(getattr(args, name, None), str):
            check_text(getattr(args, name), f"--{name}")
    if args.command in ("chat", "generate", "serve"):
        check_cache_env()
    for var, close in unknown_env():
        hint = f" (did you mean {close}?)" if close else ""
        print(f"warning: {var} is not a setting offload-moe reads{hint}; ignored", file=sys.stderr)


def run_serve(args: argparse.Namespace) -> int:
    from offload_moe.server.serve import serve  # FastAPI and uvicorn: only for this command

    model_id = Path(args.model).expanduser().resolve().name if args.model else DEMO_MODEL_ID
    return serve(lambda: load_model(args), model_id, args.host, args.port, api_key=args.api_key,
                 max_batch=args.max_batch, max_queue=args.max_queue)


def _run(args: argparse.Namespace) -> int:
    _check_environment(args)
    if args.command == "chat":
        return run_chat(args)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "convert":
        return run_convert(args)
    if args.command == "plan":
        return run_plan(args)
    return run_generate(args)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _error_line(exc: BaseException) -> tuple[int, str]:
    """(exit code, the one line printed) for an error that reached main."""
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(exc, OffloadMoeError):
        return 2, f"error: {_one_line(exc)}"
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()):
        return 3, (f"error: out of memory while loading or running the model ({_one_line(exc)}); "
                   "try fewer --slots, a smaller --gpu-memory or --context")
    if isinstance(exc, UnicodeError):
        return 2, f"error: input is not UTF-8 text ({_one_line(exc)})"
    if isinstance(exc, OSError):  # a path the user gave: missing, unreadable, full disk
        where = f"{exc.filename}: " if exc.filename else ""
        return 1, f"error: {where}{exc.strerror or _one_line(exc)}"
    hint = "run with --debug for the traceback"
    if isinstance(exc, (ValueError, RuntimeError)):  # mostly transformers refusing an input
        return 1, f"error: {_one_line(exc)} ({hint})"
    return 1, f"error: unexpected {type(exc).__name__}: {_one_line(exc)} ({hint}; please report it)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # known before parsing, so that a parse error's traceback shows too
    try:
        return _run(build_parser().parse_args(argv))
    except (Exception, KeyboardInterrupt) as exc:  # SystemExit (--help) passes through
        code, line = _error_line(exc)
        if debug and not isinstance(exc, KeyboardInterrupt):
            traceback.print_exc()
        print(("\n" if code == 130 else "") + line, file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
