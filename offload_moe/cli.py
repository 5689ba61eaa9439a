"""Command line: `offload-moe chat [MODEL]`, `offload-moe generate MODEL --prompt ...`,
`offload-moe convert SRC DST --experts hqq4`, `offload-moe plan MODEL --gpu-memory 24GiB`.

Every load and sampling option can also come from an OFFLOAD_MOE_* environment variable
(e.g. OFFLOAD_MOE_DEVICE=cpu, OFFLOAD_MOE_SLOTS=4, OFFLOAD_MOE_TEMPERATURE=0.7); a flag on the
command line wins. Errors print as one line; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from typing import Any, TextIO

# Only what the parser needs (--help stays light); each command imports its heavy modules itself.
from offload_moe.errors import OffloadMoeError
from offload_moe.planning.budget import DEFAULT_CONTEXT
from offload_moe.quant.formats import FORMATS
from offload_moe.runtime.policies import DEFAULT_POLICY


HELP_TEXT = """commands:
  /reset   forget the conversation (and its KV cache)
  /stats   expert cache hit rates and bytes moved, per layer
  /help    this text
  /exit    leave (Ctrl-D works too)
Ctrl-C stops a reply; Ctrl-C at the prompt (or twice) exits."""


def _env(name: str, default: Any = None) -> Any:
    return os.environ.get(f"OFFLOAD_MOE_{name}", default)


def _add_load_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("loading (env OFFLOAD_MOE_<NAME>)")
    g.add_argument("--device", default=_env("DEVICE"), help="cuda or cpu (default: cuda if available) [DEVICE]")
    g.add_argument("--dtype", default=_env("DTYPE"), help="compute dtype: bf16, fp16, fp32 (default: checkpoint's) [DTYPE]")
    g.add_argument("--experts", default=_env("EXPERTS"), choices=[*FORMATS, "gptq"],
                   help="expert format: hqq4/hqq3/hqq2/hqq2g64/nf4 quantize while loading; "
                        "bf16/fp16 keep them unquantized; gptq: a GPTQ checkpoint as is (default: the checkpoint's own) [EXPERTS]")
    g.add_argument("--attention", default=_env("ATTENTION"), choices=[f for f in FORMATS if FORMATS[f].quantized],
                   help="also quantize the attention projections (default: 16-bit) [ATTENTION]")
    g.add_argument("--optimize", action="store_true", default=bool(_int_env("OPTIMIZE", 0)),
                   help="quantize with the hqq optimiser (~22 s per Mixtral matrix) instead of round-to-nearest [OPTIMIZE=1]")
    slots = g.add_mutually_exclusive_group()
    slots.add_argument("--slots", type=int, default=_int_env("SLOTS"), help="expert slots per layer on the device [SLOTS]")
    slots.add_argument("--gpu-memory", default=_env("GPU_MEMORY"), help="device budget, e.g. 22GiB; plans the slots [GPU_MEMORY]")
    g.add_argument("--context", type=int, default=_int_env("CONTEXT", DEFAULT_CONTEXT),
                   help=f"KV-cache room kept by --gpu-memory (default {DEFAULT_CONTEXT}) [CONTEXT]")
    g.add_argument("--cpu-memory", default=_env("CPU_MEMORY"),
                   help="host RAM for experts, e.g. 8GiB; beyond it they are memory-mapped from disk [CPU_MEMORY]")
    g.add_argument("--policy", default=_env("POLICY", DEFAULT_POLICY),
                   help=f"expert eviction policy (default {DEFAULT_POLICY}) [POLICY]")
    g.add_argument("--prefetch", type=int, default=_int_env("PREFETCH"),
                   help="next-layer experts to prefetch per call (default: top-k on CUDA, 0 on CPU) [PREFETCH]")
    hybrid = _env("HYBRID")
    g.add_argument("--hybrid", action=argparse.BooleanOptionalAction,
                   default=None if hybrid is None else hybrid.lower() in ("1", "true", "yes", "on"),
                   help="compute missing experts on the CPU when cheaper than copying (default: on for CUDA) [HYBRID]")
    g.add_argument("--record-routing", default=_env("RECORD_ROUTING"), metavar="PATH",
                   help="write every call's routing as JSON lines [RECORD_ROUTING]")


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (env OFFLOAD_MOE_<NAME>)")
    g.add_argument("--temperature", type=float, default=_float_env("TEMPERATURE", 0.0),
                   help="0 means greedy (default 0) [TEMPERATURE]")
    g.add_argument("--top-p", type=float, default=_float_env("TOP_P", 1.0), help="nucleus sampling mass [TOP_P]")
    g.add_argument("--top-k", type=int, default=_int_env("TOP_K", 0), help="0 means off [TOP_K]")
    g.add_argument("--repetition-penalty", type=float, default=_float_env("REPETITION_PENALTY", 1.0), help="[REPETITION_PENALTY]")
    g.add_argument("--max-new-tokens", type=int, default=_int_env("MAX_NEW_TOKENS", 256), help="[MAX_NEW_TOKENS]")
    g.add_argument("--seed", type=int, default=_int_env("SEED"), help="random seed for sampling [SEED]")
    g.add_argument("--ignore-eos", action="store_true", default=bool(_int_env("IGNORE_EOS", 0)),
                   help="always generate --max-new-tokens tokens [IGNORE_EOS=1]")


def _env_number(name: str, cast: type, default: Any = None) -> Any:
    """OFFLOAD_MOE_<name> as an int or float, `default` when unset; a one-line exit when malformed."""
    value = _env(name)
    if value is None:
        return default
    try:
        return cast(value)
    except ValueError:
        kind = "whole number" if cast is int else "number"
        raise SystemExit(f"error: OFFLOAD_MOE_{name}={value!r} is not a {kind}") from None


def _int_env(name: str, default: int | None = None) -> int | None:
    return _env_number(name, int, default)


def _float_env(name: str, default: float) -> float:
    return _env_number(name, float, default)


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
    plan.add_argument("model", help="checkpoint directory (only config.json is read), a config.json file, or a "
                      "published checkpoint's name such as Qwen/Qwen3-30B-A3B")
    plan.add_argument("--gpu-memory", default=_env("GPU_MEMORY", "24GiB"), help="device budget (default 24GiB) [GPU_MEMORY]")
    plan.add_argument("--cpu-memory", default=_env("CPU_MEMORY"), help="host RAM for experts (default: what psutil reports available) [CPU_MEMORY]")
    plan.add_argument("--experts", default=_env("EXPERTS", "hqq4"), choices=list(FORMATS), help="expert format (default hqq4)")
    plan.add_argument("--context", type=int, default=_int_env("CONTEXT", DEFAULT_CONTEXT),
                      help=f"tokens of KV cache to keep room for (default {DEFAULT_CONTEXT})")
    plan.add_argument("--gpu", default="rtx4090", type=_gpu_name, metavar="NAME",
                      help="GPU whose memory bandwidth the speed model uses (default rtx4090; a bad name lists them)")
    plan.add_argument("--cpu-bandwidth", default="60GB", help="host DRAM bandwidth for the speed model (default 60GB)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offload-moe", description="Run Mixture-of-Experts LLMs with offloaded experts.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="chat with a model (the built-in demo model if none is given)")
    chat.add_argument("model", nargs="?", default=_env("MODEL"), help="checkpoint directory [MODEL]")
    chat.add_argument("--system", default=_env("SYSTEM"), help="system prompt [SYSTEM]")
    _add_load_options(chat)
    _add_sampling_options(chat)

    gen = sub.add_parser("generate", help="print the completion of one prompt and exit")
    gen.add_argument("model", nargs="?", default=_env("MODEL"), help="checkpoint directory [MODEL]")
    gen.add_argument("--prompt", help="the prompt (default: read from stdin)")
    gen.add_argument("--chat-template", action="store_true", help="wrap the prompt as a user turn of the chat template")
    gen.add_argument("--json", action="store_true", help="print text and stats as JSON")
    _add_load_options(gen)
    _add_sampling_options(gen)
    _add_plan_parser(sub)

    conv = sub.add_parser("convert", help="quantize a checkpoint's experts into a converted directory")
    conv.add_argument("src", help="Hugging Face checkpoint directory")
    conv.add_argument("dst", help="output directory (must not exist)")
    conv.add_argument("--experts", default=_env("EXPERTS", "hqq4"), choices=[f for f in FORMATS if FORMATS[f].quantized],
                      help="expert format (default hqq4) [EXPERTS]")
    conv.add_argument("--optimize", action="store_true", help="use the hqq optimiser (slow) instead of round-to-nearest")
    return parser


def _plan_config(model: str):
    """(config, directory shown) for `plan MODEL`: a directory, its config.json, or a published name."""
    from pathlib import Path

    from offload_moe.checkpoint.published import PUBLISHED, published_config
    from offload_moe.errors import CheckpointError

    path = Path(model).expanduser()
    config_dir = path.parent if path.name == "config.json" else path
    if not path.exists() and model in PUBLISHED:
        return published_config(model), config_dir  # a known checkpoint, planned before any download
    if not (config_dir / "config.json").is_file():
        raise CheckpointError(f"{config_dir / 'config.json'}: missing; give a model directory or its config.json "
                              f"(or a known checkpoint name: {', '.join(sorted(PUBLISHED))})")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(config_dir, local_files_only=True), config_dir


def run_plan(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    import psutil

    from offload_moe.planning.planner import GPUS, PCIE, plan_model
    from offload_moe.units import format_bytes, parse_bytes

    config, config_dir = _plan_config(args.model)
    cpu_memory = parse_bytes(args.cpu_memory, "cpu_memory") if args.cpu_memory else psutil.virtual_memory().available
    plan = plan_model(config, args.experts, parse_bytes(args.gpu_memory, "gpu_memory"), cpu_memory, args.context)
    gpu_bw, cpu_bw = GPUS[args.gpu], parse_bytes(args.cpu_bandwidth, "cpu_bandwidth")
    speeds = {name: plan.tokens_per_s(bw, gpu_bw) for name, bw in PCIE.items()}
    speeds["hybrid"] = plan.tokens_per_s(PCIE["pcie4"], gpu_bw, cpu_bw)
    if args.json:
        print(json.dumps({**plan.as_dict(), "modeled_tokens_per_s": {"gpu": args.gpu, "cpu_bandwidth": cpu_bw, **speeds}},
                         indent=2), file=out)
        return 0
    s = plan.slots
    print(f"{config_dir}: {plan.model_type}, {plan.moe_layers} MoE layers x {plan.num_experts} experts "
          f"(top-{plan.experts_per_token}), experts as {plan.expert_format}: {format_bytes(plan.expert_bytes)} each", file=out)
    print(f"device ({format_bytes(s.budget)}): non-expert weights {format_bytes(plan.non_expert_bytes)}, "
          f"KV cache for {args.context} tokens {format_bytes(s.kv_cache_bytes)}, "
          f"{s.slots_per_layer} expert slots per layer {format_bytes(s.slot_bytes)}", file=out)
    print(f"host RAM ({format_bytes(plan.host_budget)}): pinned experts {format_bytes(plan.host_expert_bytes)}"
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
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "repetition_penalty": args.repetition_penalty}
    if args.ignore_eos:
        kwargs["min_new_tokens"] = args.max_new_tokens
    if args.temperature > 0:
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
        if args.top_k:
            kwargs["top_k"] = args.top_k
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def load_model(args: argparse.Namespace):
    """Load args.model, or the built-in demo model when none is given."""
    import offload_moe
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    path, slots = args.model, args.slots
    if path is None:
        from offload_moe.demo import ensure_demo_checkpoint

        path = ensure_demo_checkpoint(log=lambda msg: print(msg, file=sys.stderr))
        if slots is None and args.gpu_memory is None:
            slots = 4  # the demo shows the cache at work: 4 of its 8 experts per layer on the device
    print(f"loading {path} ...", file=sys.stderr)
    return offload_moe.load(
        path,
        device=args.device,
        dtype=args.dtype,
        experts=args.experts,
        attention=args.attention,
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

    lines = [f"{'layer':>5} {'slots':>5} {'hits':>7} {'misses':>7} {'hit rate':>8} {'copied':>12}"]
    for row in stats["layers"]:
        lines.append(f"{row['layer']:>5} {row['slots']:>5} {row['hits']:>7} {row['misses']:>7} "
                     f"{row['hit_rate']:>8.1%} {format_bytes(row['bytes_copied']):>12}")
    t = stats["total"]
    lines.append(f"{'all':>5} {'':>5} {t['hits']:>7} {t['misses']:>7} {t['hit_rate']:>8.1%} {format_bytes(t['bytes_copied']):>12}")
    return "\n".join(lines)


def _read_line(stdin: TextIO, out: TextIO) -> str:
    """One line typed at the prompt; EOFError at the end of input."""
    if stdin.isatty():
        return input(">>> ")
    print(">>> ", end="", file=out, flush=True)
    line = stdin.readline()
    if not line:
        raise EOFError
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

    before = llm.stats()["total"]
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = session.send(text, on_text=lambda piece: print(piece, end="", file=out, flush=True))
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
    stdin, out = stdin or sys.stdin, out or sys.stdout
    prompt = args.prompt if args.prompt is not None else stdin.read()
    if not prompt.strip():
        from offload_moe.errors import ConfigError

        raise ConfigError("no prompt: pass --prompt TEXT or pipe it on stdin")
    llm = load_model(args)
    kwargs = generation_kwargs(args)
    if args.chat_template:
        text = llm.chat([{"role": "user", "content": prompt}], **kwargs)
    else:
        text = llm.generate(prompt, **kwargs)
    if args.json:
        print(json.dumps({"text": text, "stats": llm.stats()}, indent=2), file=out)
    else:
        print(text, file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "chat":
            return run_chat(args)
        if args.command == "convert":
            return run_convert(args)
        if args.command == "plan":
            return run_plan(args)
        return run_generate(args)
    except OffloadMoeError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        if args.debug:
            traceback.print_exc()
        if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
            print(f"error: out of memory while loading or running the model ({exc}); "
                  "try fewer --slots, a smaller --gpu-memory or --context", file=sys.stderr)
            return 3
        print(f"error: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
