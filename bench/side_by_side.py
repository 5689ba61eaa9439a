"""Side by side on this CPU: offload_moe (hqq4 experts) vs plain transformers (bf16) vs llama.cpp.

One random Mixtral-dimension model (hidden 4096, FFN 14336, 32 heads / 8 KV heads, 8 experts
top-2, vocab 32000; `--layers` decoder layers, 2 by default so that transformers' bf16 copy,
two offload_moe stores and llama.cpp's GGUF all fit in 24 GiB) is written once under --dir:

    hf/              the Hugging Face checkpoint (bf16 safetensors, per-expert names)
    hf-hqq4/         offload_moe.convert(hf, experts="hqq4"): round-to-nearest int4, group 64
    model-q4_0.gguf  the same weights for llama.cpp: arch "llama", fused expert tensors
                     blk.N.ffn_{gate,up,down}_exps in Q4_0, everything else f16 (norms and
                     the router f32), a dummy 32000-token vocabulary (ids are fed directly)

Then (tokenizer-free: token ids in, greedy argmax out, the same loop for every engine):

1. agreement: offload_moe with bf16 experts against transformers' eager experts (must be
   bit-exact), and the last prompt position's logits of offload_moe hqq4 and llama.cpp Q4_0
   against transformers bf16 (correlation, top-1 agreement, greedy tokens in common);
2. speed: every engine decodes --new-tokens tokens after a --prompt-tokens prompt,
   --repeats times, engines alternated (round-robin) so a busy machine slows all alike;
   the median of each engine's runs counts. Ratios are within this one run;
3. faithfulness: offload_moe hqq4 against transformers whose experts hold the dequantized
   hqq4 weights, and llama.cpp against transformers with the dequantized Q4_0 weights.

With --cpu-memory (e.g. 1GiB, below the model's expert bytes) offload_moe loads with that
host-RAM budget: its expert store is memory-mapped from a file on disk (written once inside
hf-hqq4/, reused after) and experts are computed straight from the mapping.

    python bench/side_by_side.py                      # ~15 minutes on 2 cores the first time
    python bench/side_by_side.py --cpu-memory 1GiB    # experts served from disk
    python bench/side_by_side.py --clean              # delete the generated model files
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from machine import cpu_model  # bench/machine.py (scripts run as python bench/<name>.py)
import offload_moe
from offload_moe.testing import make_tiny_checkpoint

MIXTRAL_DIMS = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
    rope_theta=1e6, rms_norm_eps=1e-5,
)

Step = Callable[[list[int]], np.ndarray]
HF_NAME = "transformers bf16 (grouped_mm experts, its default)"
LLAMA_NAME = "llama.cpp Q4_0 (llama-cpp-python, 2 threads)"  # feed token ids (appending to the context) -> last logits


# ---------------------------------------------------------------------------------------------
# model files


def build_checkpoint(path: Path, layers: int) -> Path:
    """The random bf16 Hugging Face checkpoint, written once (temporary name, then renamed)."""
    if (path / "config.json").is_file():
        return path
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"writing {path} ({layers} layers, bf16) ...", flush=True)
    make_tiny_checkpoint(partial, seed=0, num_shards=layers + 1, dtype=torch.bfloat16,
                         num_hidden_layers=layers, **MIXTRAL_DIMS)
    partial.rename(path)
    return path


def _permute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved RoPE rows (as convert_hf_to_gguf)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_gguf(hf: Path, out: Path) -> Path:
    """The same weights as a llama.cpp GGUF: Q4_0 experts, f16 attention/embeddings/lm_head."""
    if out.is_file():
        return out
    import gguf
    from safetensors import safe_open
    from transformers import AutoConfig

    print(f"writing {out} ...", flush=True)
    cfg = AutoConfig.from_pretrained(hf)
    files = sorted(hf.glob("*.safetensors"))
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {name: h for h in handles for name in h.keys()}

    def get(name: str) -> np.ndarray:
        return where[name].get_tensor(name).float().numpy()

    partial = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(str(partial), "llama")
    w.add_name("random-mixtral-dims")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None)
                         else float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.num_local_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    # A dummy SentencePiece-style vocabulary: <unk>, <s>, </s>, 256 byte tokens, then fillers.
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(len(tokens), cfg.vocab_size)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (cfg.vocab_size - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * cfg.vocab_size)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    f16 = lambda a: a.astype(np.float16)  # noqa: E731
    w.add_tensor("token_embd.weight", f16(get("model.embed_tokens.weight")))
    w.add_tensor("output_norm.weight", get("model.norm.weight"))
    w.add_tensor("output.weight", f16(get("lm_head.weight")))
    q4 = gguf.GGMLQuantizationType.Q4_0
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        w.add_tensor(f"blk.{i}.attn_norm.weight", get(f"{p}.input_layernorm.weight"))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", get(f"{p}.post_attention_layernorm.weight"))
        w.add_tensor(f"blk.{i}.attn_q.weight", f16(_permute_rope(get(f"{p}.self_attn.q_proj.weight"), cfg.num_attention_heads)))
        w.add_tensor(f"blk.{i}.attn_k.weight", f16(_permute_rope(get(f"{p}.self_attn.k_proj.weight"), cfg.num_key_value_heads)))
        w.add_tensor(f"blk.{i}.attn_v.weight", f16(get(f"{p}.self_attn.v_proj.weight")))
        w.add_tensor(f"blk.{i}.attn_output.weight", f16(get(f"{p}.self_attn.o_proj.weight")))
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", get(f"{p}.block_sparse_moe.gate.weight"))
        for ours, theirs in (("gate", "w1"), ("down", "w2"), ("up", "w3")):
            stacked = np.stack([get(f"{p}.block_sparse_moe.experts.{e}.{theirs}.weight")
                                for e in range(cfg.num_local_experts)])
            w.add_tensor(f"blk.{i}.ffn_{ours}_exps.weight", gguf.quants.quantize(stacked, q4), raw_dtype=q4)
            del stacked
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    partial.rename(out)
    return out


def build_converted(hf: Path, out: Path) -> Path:
    if not (out / "offload_moe.json").is_file():
        print(f"writing {out} (hqq4, round-to-nearest) ...", flush=True)
        offload_moe.convert(hf, out, experts="hqq4", progress=False)
    return out


# ---------------------------------------------------------------------------------------------
# engines: each is `new_session() -> step`, where step(ids) feeds ids and returns the last logits


def hf_engine(model: torch.nn.Module) -> Callable[[], Step]:
    """A transformers causal LM (plain or offloaded), one forward per step with its KV cache."""

    def new_session() -> Step:
        state: dict = {"past": None}

        @torch.inference_mode()
        def step(ids: list[int]) -> np.ndarray:
            out = model(input_ids=torch.tensor([ids]), past_key_values=state["past"], use_cache=True)
            state["past"] = out.past_key_values
            return out.logits[0, -1].float().numpy()

        return step

    return new_session


def llama_cpp_engine(gguf_path: Path, n_ctx: int) -> tuple[Callable[[], Step], object]:
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf_path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=2, n_threads_batch=2,
                          verbose=False)
    n_vocab = llm.n_vocab()

    def new_session() -> Step:
        llm.reset()

        def step(ids: list[int]) -> np.ndarray:
            llm.eval(ids)
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy()

        return step

    return new_session, llm


def greedy(new_session: Callable[[], Step], prompt: list[int], new_tokens: int) -> tuple[list[int], np.ndarray, float]:
    """Prompt, then `new_tokens` greedy steps: (tokens, the prompt's last logits, decode seconds)."""
    step = new_session()
    logits = step(prompt)
    first = logits
    tokens = [int(logits.argmax())]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits = step([tokens[-1]])
        tokens.append(int(logits.argmax()))
    return tokens, first, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------


def agreement(ref: tuple[list[int], np.ndarray], other: tuple[list[int], np.ndarray]) -> str:
    (ref_tokens, ref_logits), (tokens, logits) = ref, other
    corr = float(np.corrcoef(ref_logits, logits)[0, 1])
    same_prefix = next((i for i, (a, b) in enumerate(zip(ref_tokens, tokens)) if a != b), len(tokens))
    top5 = len(set(np.argsort(-ref_logits)[:5]) & set(np.argsort(-logits)[:5]))
    return (f"logit correlation {corr:.4f}, max |diff| {np.abs(ref_logits - logits).max():.3g}, "
            f"top-1 {'same' if ref_logits.argmax() == logits.argmax() else 'differs'}, top-5 overlap {top5}/5, "
            f"greedy tokens equal for the first {same_prefix}/{len(tokens)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="bench/out/side_by_side", help="where the model files are written")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu-memory", default=None, help="offload_moe host-RAM budget, e.g. 1GiB (below the "
                        "expert bytes: the store is memory-mapped from disk)")
    parser.add_argument("--fewer-slots", type=int, default=4, help="the extra offload_moe row's slots per layer")
    parser.add_argument("--skip-exact", action="store_true", help="skip the bf16 exactness check (needs ~7 GiB)")
    parser.add_argument("--build-only", action="store_true", help="write the model files and stop")
    parser.add_argument("--clean", action="store_true", help="delete the model files under --dir and stop")
    args = parser.parse_args()
    root = Path(args.dir) / f"mixtral-dims-l{args.layers}"
    if args.clean:
        shutil.rmtree(root, ignore_errors=True)
        print(f"removed {root}")
        return
    torch.set_num_threads(2)
    root.mkdir(parents=True, exist_ok=True)
    hf = build_checkpoint(root / "hf", args.layers)
    gguf_path = build_gguf(hf, root / "model-q4_0.gguf")
    converted = build_converted(hf, root / "hf-hqq4")
    if args.build_only:
        return

    from transformers import AutoModelForCausalLM

    prompt = [int(t) for t in torch.randint(3, 32000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1))]
    n_ctx = args.prompt_tokens + args.new_tokens + 8
    print(f"date: {time.strftime('%Y-%m-%d %H:%M')}  nproc: {os.cpu_count()}  cpu: {cpu_model()}  "
          f"torch {torch.__version__}", flush=True)

    plain = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16).eval()
    engines: dict[str, Callable[[], Step]] = {HF_NAME: hf_engine(plain)}

    # 1. agreement
    if not args.skip_exact:
        exact = offload_moe.load(hf, device="cpu", dtype=torch.bfloat16, slots_per_layer=1, hybrid=True, progress=False)
        plain.set_experts_implementation("eager")
        ref = greedy(hf_engine(plain), prompt, 8)
        ours = greedy(hf_engine(exact.model), prompt, 8)
        plain.set_experts_implementation("grouped_mm")
        print(f"offload_moe bf16 experts vs transformers eager: logits bit-equal {np.array_equal(ref[1], ours[1])}, "
              f"greedy tokens equal {ref[0] == ours[0]}", flush=True)
        del exact, ours
        gc.collect()

    budget = {} if args.cpu_memory is None else {"cpu_memory": args.cpu_memory}
    q_full = offload_moe.load(converted, device="cpu", progress=False, **budget)
    if args.cpu_memory is None:
        engines["offload_moe hqq4, 8/8 slots"] = hf_engine(q_full.model)
        # The GGUF keeps attention and lm_head in f16: the same non-expert bytes and type for offload_moe.
        q_f16 = offload_moe.load(converted, device="cpu", dtype=torch.float16, progress=False)
        engines["offload_moe hqq4, fp16 non-experts (as the GGUF), 8/8 slots"] = hf_engine(q_f16.model)
        q_few = offload_moe.load(converted, device="cpu", slots_per_layer=args.fewer_slots, progress=False)
        engines[f"offload_moe hqq4, {args.fewer_slots}/8 slots"] = hf_engine(q_few.model)
    else:
        store = q_full.runtime.store
        print(f"offload_moe store: {store.nbytes / 2**30:.2f} GiB of experts, memory-mapped from {store.backing_dir}",
              flush=True)
        engines["offload_moe hqq4, store memory-mapped from disk"] = hf_engine(q_full.model)
        q_f16 = offload_moe.load(converted, device="cpu", dtype=torch.float16, progress=False, **budget)  # same file
        engines["offload_moe hqq4, fp16 non-experts (as the GGUF), store memory-mapped from disk"] = hf_engine(q_f16.model)
    llama_session, llama = llama_cpp_engine(gguf_path, n_ctx)
    engines[LLAMA_NAME] = llama_session

    ref = greedy(engines[HF_NAME], prompt, args.new_tokens)[:2]
    for name, session in engines.items():
        if name != HF_NAME:
            print(f"{name} vs transformers bf16: {agreement(ref, greedy(session, prompt, args.new_tokens)[:2])}",
                  flush=True)

    # 2. speed, round-robin
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, session in engines.items():
            times[name].append(greedy(session, prompt, args.new_tokens)[2])
    rates = {name: (args.new_tokens - 1) / statistics.median(t) for name, t in times.items()}
    llama_rate, hf_rate = rates[LLAMA_NAME], rates[HF_NAME]
    print(f"model: Mixtral dims, {args.layers} layers, random weights; prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens - 1} decode steps timed, median of {args.repeats}, engines round-robin"
          + (f"; offload_moe cpu_memory={args.cpu_memory}" if args.cpu_memory else ""))
    print("| engine | tok/s | vs llama.cpp | vs transformers |\n|---|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.2f} | {rate / llama_rate:.2f}x | {rate / hf_rate:.2f}x |")
    print("runs (s): " + "; ".join(f"{n}: {', '.join(f'{t:.2f}' for t in ts)}" for n, ts in times.items()), flush=True)

    # 3. each quantized engine computes its own quantized model: transformers with the experts
    #    replaced by the dequantized hqq4 / Q4_0 weights is the reference
    offloaded = next(name for name in engines if name.startswith("offload_moe"))
    for name in [n for n in engines if n.startswith("offload_moe") and n != offloaded]:
        del engines[name]  # room for the dequantized weights
    q_few = q_f16 = None
    gc.collect()
    for name, weights in ((offloaded, dequantized_hqq4(plain)), (LLAMA_NAME, dequantized_q4_0(gguf_path))):
        for layer, expert, gate_up, down in weights:
            experts = plain.model.layers[layer].mlp.experts
            experts.gate_up_proj.data[expert].copy_(gate_up)
            experts.down_proj.data[expert].copy_(down)
        reference = greedy(hf_engine(plain), prompt, args.new_tokens)[:2]
        print(f"{name} vs transformers with its dequantized experts: "
              f"{agreement(reference, greedy(engines[name], prompt, args.new_tokens)[:2])}", flush=True)
    del llama


def dequantized_hqq4(model: torch.nn.Module):
    """(layer, expert, gate_up [2F, H], down [H, F]) with hqq4 round-to-nearest applied, as convert does."""
    from offload_moe.quant.quantize import dequantize, quantize
    from offload_moe.quant.formats import parse_format

    fmt = parse_format("hqq4")
    for layer, block in enumerate(model.model.layers):
        experts = block.mlp.experts
        for expert in range(experts.gate_up_proj.shape[0]):
            yield layer, expert, *(dequantize(quantize(w[expert].float(), fmt, optimize=False)).to(w.dtype)
                                   for w in (experts.gate_up_proj.data, experts.down_proj.data))


def dequantized_q4_0(gguf_path: Path):
    """(layer, expert, gate_up, down) dequantized from the GGUF's Q4_0 expert tensors."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(str(gguf_path)).tensors}
    q4 = gguf.GGMLQuantizationType.Q4_0
    layer = 0
    while f"blk.{layer}.ffn_gate_exps.weight" in tensors:
        data = {role: tensors[f"blk.{layer}.ffn_{role}_exps.weight"].data for role in ("gate", "up", "down")}
        for expert in range(data["gate"].shape[0]):
            get = lambda role: torch.from_numpy(gguf.quants.dequantize(data[role][expert], q4))  # noqa: E731
            yield layer, expert, torch.cat([get("gate"), get("up")]).to(torch.bfloat16), get("down").to(torch.bfloat16)
        layer += 1


if __name__ == "__main__":
    main()
