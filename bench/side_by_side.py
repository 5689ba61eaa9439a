"""Side by side on this CPU: offload_moe (hqq4 experts) vs llama.cpp (Q4_0) vs plain transformers.

One random model of a published MoE shape (`--shape`, bench/moe_shapes.py: mixtral,
qwen3-30b-a3b, gpt-oss-20b; `--layers` decoder layers, each shape's default fitting 24 GiB with
every engine loaded), written once under --dir/<shape>-dims-l<layers>/. Every shape is the
Mixtral architecture in HF and arch "llama" with fused experts in the GGUF, so all engines
compute the same function (gpt-oss's sinks, biases and clamped gate and Qwen3's q/k norms are
left out: the shape is what decides the speed).

The engines (tokenizer-free: token ids in, the last position's logits out):

    offload_moe   hqq4 experts, fp16 non-experts: offload_moe.load(hf-hqq4, device="cpu", dtype="float16")
    llama.cpp     Q4_0 experts, f16 non-experts (f32 norms and router); llama-cpp-python,
                  n_threads = torch's thread count, n_batch/n_ubatch from --llama-batch/--llama-ubatch
    transformers  --hf-dtype (bf16 by default) with its default experts implementation

1. agreement, before any timing: offload_moe with the checkpoint's bf16 experts against
   transformers' eager experts (must be bit-exact; skipped when two bf16 copies do not fit in
   RAM, and it says so), then offload_moe hqq4 and llama.cpp Q4_0 each against transformers
   (fp16, eager experts) running that engine's own dequantized expert weights: last-position
   logit correlation, top-1, greedy tokens in common;
2. speed: decode tok/s (--new-tokens greedy steps after a --prompt-tokens prompt) and prefill
   tok/s of each --prefill length (the prompt in, its last logits out: one forward with
   use_cache for offload_moe/transformers, one eval for llama.cpp), round-robin over the
   engines for --repeats rounds (the order rotates each round), medians; one table per
   measurement with the ratio to llama.cpp and each round's ratio. All ratios are within one run.

Memory: when the three engines' weights (engine_bytes) and a margin fit in the RAM available
at start (or --memory), they are loaded together and timed in one round-robin; otherwise
offload_moe and llama.cpp are timed in one round-robin, then offload_moe is dropped and
transformers is timed against llama.cpp in a second one (the output says which).

    python bench/side_by_side.py --shape qwen3-30b-a3b                # build once, then measure
    python bench/side_by_side.py --shape gpt-oss-20b --skip-transformers
    python bench/side_by_side.py --shape mixtral --layers 1 --repeats 1 --prefill 256   # a smoke run
    python bench/side_by_side.py --cpu-memory 1GiB    # offload_moe's experts memory-mapped from disk
    python bench/side_by_side.py --shape qwen3-30b-a3b --clean        # delete that model folder
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from machine import machine_line  # bench/machine.py (scripts run as python bench/<name>.py)
from moe_shapes import (EXPERT_NAMES, OFFLOAD_DTYPE, CheckpointReader, ModelFiles, add_model_args, build_all,
                        expert_weight, head_dim, model_files)
import offload_moe
from offload_moe.units import parse_bytes

Step = Callable[[list[int]], np.ndarray]  # feed ids (appending to the context) -> the last logits [V]
OFFLOAD, LLAMA, HF = "offload_moe", "llama.cpp", "transformers"
GIB = 2**30
HQQ4_BYTES = 0.5 + 4 / 64  # per expert weight: a 4-bit code, a bf16 scale and zero per group of 64
Q4_0_BYTES = 18 / 32  # per expert weight: 32 4-bit codes and one f16 scale per block
MARGIN = 4 * GIB  # the runtimes, a 1024-token prefill's activations, llama.cpp's compute and repack buffers
REFERENCE_DTYPE = torch.float16  # the non-expert precision both quantized engines run


@dataclass
class Engine:
    name: str  # what the tables print
    new_session: Callable[[], Step]  # an empty context
    close: Callable[[], None]


# ---------------------------------------------------------------------------------------------
# engines


def hf_engine(name: str, model: torch.nn.Module, close: Callable[[], None] = lambda: None) -> Engine:
    """A transformers causal LM (plain or offloaded), one forward per step with its KV cache."""

    def new_session() -> Step:
        state: dict = {"cache": None}

        @torch.inference_mode()
        def step(ids: list[int]) -> np.ndarray:
            out = model(input_ids=torch.tensor([ids]), cache=state["cache"], use_cache=True,
                        logits_to_keep=1)  # as llama.cpp: only the last position's logits
            state["cache"] = out.cache
            return out.logits[0, -1].float().numpy()

        return step

    return Engine(name, new_session, close)


def load_offload_moe(files: ModelFiles, args: argparse.Namespace) -> Engine:
    budget = {} if args.cpu_memory is None else {"cpu_memory": args.cpu_memory}
    llm = offload_moe.load(files.hqq4, device="cpu", dtype=OFFLOAD_DTYPE, progress=False, **budget)
    where = "memory-mapped from disk" if args.cpu_memory else "in RAM"
    return hf_engine(f"offload_moe hqq4, fp16 non-experts, experts {where}", llm.model, llm.close)


def load_transformers(files: ModelFiles, args: argparse.Namespace) -> Engine:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(files.hf, dtype=getattr(torch, args.hf_dtype)).eval()
    experts = model.config._experts_implementation or "its default"
    return hf_engine(f"transformers {args.hf_dtype} ({experts} experts)", model)


def load_llama_cpp(files: ModelFiles, args: argparse.Namespace) -> Engine:
    import llama_cpp

    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(str(files.gguf), n_ctx=context_tokens(args), n_batch=args.llama_batch,
                          n_ubatch=args.llama_ubatch, n_threads=threads, n_threads_batch=threads, verbose=False)
    n_vocab = llm.n_vocab()

    def new_session() -> Step:
        llm.reset()

        def step(ids: list[int]) -> np.ndarray:
            llm.eval(ids)
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy()

        return step

    return Engine(f"llama.cpp Q4_0, f16 non-experts ({threads} threads)", new_session, llm.close)


LOADERS: dict[str, Callable[[ModelFiles, argparse.Namespace], Engine]] = {
    OFFLOAD: load_offload_moe, LLAMA: load_llama_cpp, HF: load_transformers,
}


def context_tokens(args: argparse.Namespace) -> int:
    return max([args.prompt_tokens + args.new_tokens, *args.prefill]) + 8


# ---------------------------------------------------------------------------------------------
# memory


def weight_counts(cfg) -> tuple[int, int]:
    """(expert weights, every other weight) of a Mixtral-architecture config."""
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    attention = 2 * h * head_dim(cfg) * (cfg.num_attention_heads + cfg.num_key_value_heads)
    experts = layers * cfg.num_local_experts * 3 * h * cfg.intermediate_size
    return experts, layers * (attention + h * cfg.num_local_experts) + 2 * cfg.vocab_size * h


def engine_bytes(cfg) -> dict[str, float]:
    """Each engine's weight bytes: 2-byte non-experts everywhere, experts as each engine stores them."""
    experts, rest = weight_counts(cfg)
    return {OFFLOAD: 2 * rest + HQQ4_BYTES * experts, LLAMA: 2 * rest + Q4_0_BYTES * experts, HF: 2 * (rest + experts)}


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (free RAM plus what the page cache would give back)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan_rounds(cfg, memory: int, skip_transformers: bool) -> list[list[str]]:
    """The engine groups timed one round-robin each: all three together only if they fit."""
    sizes = engine_bytes(cfg)
    if skip_transformers:
        return [[OFFLOAD, LLAMA]]
    if sum(sizes.values()) + MARGIN <= memory:
        return [[OFFLOAD, LLAMA, HF]]
    print(f"the three engines ({sum(sizes.values()) / GIB:.1f} GiB of weights) do not fit in {memory / GIB:.1f} GiB: "
          "offload_moe vs llama.cpp first, then transformers vs llama.cpp in a second round-robin", flush=True)
    return [[OFFLOAD, LLAMA], [HF, LLAMA]]


# ---------------------------------------------------------------------------------------------
# agreement


def greedy(engine: Engine, prompt: list[int], new_tokens: int) -> tuple[list[int], np.ndarray, float]:
    """Prompt, then `new_tokens` greedy steps: (tokens, the prompt's last logits, decode seconds)."""
    step = engine.new_session()
    first = logits = step(prompt)
    tokens = [int(logits.argmax())]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits = step([tokens[-1]])
        tokens.append(int(logits.argmax()))
    return tokens, first, time.perf_counter() - start


def agreement(ref: tuple[list[int], np.ndarray], other: tuple[list[int], np.ndarray]) -> str:
    (ref_tokens, ref_logits), (tokens, logits) = ref, other
    corr = float(np.corrcoef(ref_logits, logits)[0, 1])
    same_prefix = next((i for i, (a, b) in enumerate(zip(ref_tokens, tokens)) if a != b), len(tokens))
    top5 = len(set(np.argsort(-ref_logits)[:5]) & set(np.argsort(-logits)[:5]))
    return (f"logit correlation {corr:.4f}, max |diff| {np.abs(ref_logits - logits).max():.3g}, "
            f"top-1 {'same' if ref_logits.argmax() == logits.argmax() else 'differs'}, top-5 overlap {top5}/5, "
            f"greedy tokens equal for the first {same_prefix}/{len(tokens)}")


def exactness_check(files: ModelFiles, cfg, prompt: list[int], memory: int) -> None:
    """offload_moe with the checkpoint's bf16 experts against transformers' eager experts: bit-exact."""
    from transformers import AutoModelForCausalLM

    need = 2 * engine_bytes(cfg)[HF] + MARGIN
    if need > memory:
        print(f"bf16 exactness check skipped: two bf16 copies need {need / GIB:.1f} GiB, "
              f"{memory / GIB:.1f} GiB available", flush=True)
        return
    plain = AutoModelForCausalLM.from_pretrained(files.hf, dtype=torch.bfloat16, experts_implementation="eager")
    ref = greedy(hf_engine(HF, plain.eval()), prompt, 8)
    del plain
    gc.collect()
    with offload_moe.load(files.hf, device="cpu", dtype=torch.bfloat16, slots_per_layer=1, hybrid=True,
                          progress=False) as exact:
        ours = greedy(hf_engine(OFFLOAD, exact.model), prompt, 8)
    print(f"offload_moe bf16 experts vs transformers eager: logits bit-equal {np.array_equal(ref[1], ours[1])}, "
          f"greedy tokens equal {ref[0] == ours[0]}", flush=True)


def dequantized_hqq4(files: ModelFiles, cfg) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """(layer, expert, gate_up [2F, H], down [H, F]) with hqq4 round-to-nearest applied, as convert does."""
    from offload_moe.quant.quantize import dequantize, quantize

    get = CheckpointReader(files.hf)
    for layer in range(cfg.num_hidden_layers):
        for expert in range(cfg.num_local_experts):
            w = {role: dequantize(quantize(torch.from_numpy(expert_weight(get, layer, expert, role)), "hqq4",
                                           optimize=False)) for role in EXPERT_NAMES}
            yield layer, expert, torch.cat([w["gate"], w["up"]]), w["down"]


def dequantized_q4_0(files: ModelFiles, cfg) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """(layer, expert, gate_up [2F, H], down [H, F]) dequantized from the GGUF's Q4_0 expert tensors."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(str(files.gguf)).tensors}
    q4 = gguf.GGMLQuantizationType.Q4_0
    for layer in range(cfg.num_hidden_layers):
        data = {role: tensors[f"blk.{layer}.ffn_{role}_exps.weight"].data for role in EXPERT_NAMES}
        for expert in range(cfg.num_local_experts):
            w = {role: torch.from_numpy(gguf.quants.dequantize(data[role][expert], q4)) for role in EXPERT_NAMES}
            yield layer, expert, torch.cat([w["gate"], w["up"]]), w["down"]


def references(files: ModelFiles, cfg, prompt: list[int], new_tokens: int) -> dict[str, tuple[list[int], np.ndarray]]:
    """Per quantized engine, transformers' (tokens, prompt logits) with that engine's dequantized experts."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(files.hf, dtype=REFERENCE_DTYPE, experts_implementation="eager").eval()
    refs = {}
    for name, weights in ((OFFLOAD, dequantized_hqq4), (LLAMA, dequantized_q4_0)):
        for layer, expert, gate_up, down in weights(files, cfg):
            experts = model.model.layers[layer].mlp.experts
            experts.gate_up_proj.data[expert].copy_(gate_up)
            experts.down_proj.data[expert].copy_(down)
        refs[name] = greedy(hf_engine(HF, model), prompt, new_tokens)[:2]
    del model
    gc.collect()
    return refs


# ---------------------------------------------------------------------------------------------
# speed


@dataclass(frozen=True)
class Measurement:
    title: str
    tokens: int  # tokens per timed run
    seconds: Callable[[Engine], float]  # one timed run


def prefill_seconds(engine: Engine, ids: list[int]) -> float:
    """The prompt in, its last logits out, in an empty context."""
    step = engine.new_session()
    start = time.perf_counter()
    step(ids)
    return time.perf_counter() - start


def measurements(args: argparse.Namespace, prompt: list[int], vocab: int) -> list[Measurement]:
    decode = Measurement(f"decode: {args.new_tokens - 1} greedy steps after a {len(prompt)}-token prompt",
                         args.new_tokens - 1, lambda e: greedy(e, prompt, args.new_tokens)[2])
    prefills = [Measurement(f"prefill: {n} tokens to the first logits", n,
                            lambda e, ids=random_ids(n, vocab, seed=2 + n): prefill_seconds(e, ids))
                for n in args.prefill]
    return [decode, *prefills]


def round_robin(engines: list[Engine], meas: list[Measurement], repeats: int) -> dict[str, dict[str, list[float]]]:
    """times[measurement title][engine name]: one run per engine, measurement and round, after
    an untimed round (first calls pay one-time costs: allocations, kernel builds, page faults)."""
    for m in meas:
        for e in engines:
            m.seconds(e)
    times = {m.title: {e.name: [] for e in engines} for m in meas}
    for r in range(repeats):
        order = engines[r % len(engines):] + engines[:r % len(engines)]  # no engine always runs first
        for m in meas:
            for e in order:
                times[m.title][e.name].append(m.seconds(e))
    return times


def print_table(m: Measurement, times: dict[str, list[float]], reference: str) -> None:
    rounds = len(times[reference])
    print(f"\n{m.title}; tok/s, median of {rounds} rounds")
    print("| engine | tok/s | vs llama.cpp | per round vs llama.cpp |\n|---|---|---|---|")
    ref = statistics.median(times[reference])
    for name, ts in times.items():
        per_round = ", ".join(f"{r / t:.2f}" for r, t in zip(times[reference], ts))
        print(f"| {name} | {m.tokens / statistics.median(ts):.2f} | {ref / statistics.median(ts):.2f}x | {per_round} |")
    print("runs (s): " + "; ".join(f"{n}: {', '.join(f'{t:.3f}' for t in ts)}" for n, ts in times.items()), flush=True)


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return [int(t) for t in torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))]


# ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, default_shape="mixtral")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="the decode measurement's prompt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prefill", type=lambda s: [int(n) for n in s.split(",") if n], default=[256, 1024],
                        help="prompt lengths timed, comma-separated (default 256,1024; '' for none)")
    parser.add_argument("--repeats", type=int, default=5, help="round-robin rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch's threads, and llama.cpp's (default: torch's)")
    parser.add_argument("--hf-dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--llama-batch", type=int, default=512, help="llama.cpp n_batch")
    parser.add_argument("--llama-ubatch", type=int, default=512, help="llama.cpp n_ubatch")
    parser.add_argument("--memory", type=parse_bytes, default=None, help="RAM the engines may use, e.g. 24GiB "
                        "(default: MemAvailable at start)")
    parser.add_argument("--cpu-memory", default=None, help="offload_moe host-RAM budget, e.g. 1GiB (below the "
                        "expert bytes: the store is memory-mapped from disk)")
    parser.add_argument("--skip-exact", action="store_true", help="skip the bf16 exactness check")
    parser.add_argument("--skip-transformers", action="store_true", help="time offload_moe and llama.cpp only")
    parser.add_argument("--build-only", action="store_true", help="write the model files and stop")
    parser.add_argument("--clean", action="store_true", help="delete the model folder and stop")
    return parser.parse_args()


def timed_rounds(files: ModelFiles, args: argparse.Namespace, groups: list[list[str]], refs: dict,
                 prompt: list[int], meas: list[Measurement]) -> None:
    """Each group's engines loaded (dropping those the group lacks), checked once, then round-robin."""
    loaded: dict[str, Engine] = {}
    for i, group in enumerate(groups, 1):
        for key in [k for k in loaded if k not in group]:
            loaded.pop(key).close()
            gc.collect()
        for key in [k for k in group if k not in loaded]:
            loaded[key] = LOADERS[key](files, args)
            if key in refs:
                ours = greedy(loaded[key], prompt, args.new_tokens)[:2]
                print(f"{loaded[key].name} vs transformers with its dequantized experts: "
                      f"{agreement(refs[key], ours)}", flush=True)
        engines = [loaded[k] for k in group]
        print(f"\nround-robin {i} of {len(groups)}: {', '.join(e.name for e in engines)}", flush=True)
        times = round_robin(engines, meas, args.repeats)
        for m in meas:
            print_table(m, times[m.title], loaded[LLAMA].name)
    for engine in loaded.values():
        engine.close()


def main() -> None:
    args = parse_args()
    if args.clean:
        shutil.rmtree(model_files(args).root, ignore_errors=True)
        print(f"removed {model_files(args).root}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    files = build_all(args)
    if args.build_only:
        return
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(files.hf)
    memory = args.memory or available_bytes()
    print(f"{machine_line()}\nmodel: {args.shape} dims, {cfg.num_hidden_layers} layers, random weights "
          f"({files.root}); RAM for the engines {memory / GIB:.1f} GiB"
          + (f"; offload_moe cpu_memory={args.cpu_memory}" if args.cpu_memory else ""), flush=True)
    prompt = random_ids(args.prompt_tokens, cfg.vocab_size, seed=1)
    if not args.skip_exact:
        exactness_check(files, cfg, prompt, memory)
    refs = references(files, cfg, prompt, args.new_tokens)
    meas = measurements(args, prompt, cfg.vocab_size)
    timed_rounds(files, args, plan_rounds(cfg, memory, args.skip_transformers), refs, prompt, meas)


if __name__ == "__main__":
    main()
