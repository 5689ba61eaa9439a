"""The decode-speed cost model checked against Eliseev & Mazur 2023, then applied to our design.

1. Replays the real Mixtral-8x7B routing (../shared/traces/) through per-layer LRU caches with the
   paper's slot counts, and runs the hit/miss sequences through `offload_moe.planning.perfmodel` with the
   paper's bytes (2-bit HQQ experts, 4-bit HQQ attention) and each GPU's data-sheet bandwidths;
   fits the one free parameter (framework overhead per layer) and prints modeled vs published
   tok/s for T4, RTX 3060, RTX 3080 Mobile and A100.
2. Projects offload_moe's design (hqq4 experts, markov eviction, speculative prefetch, hybrid CPU
   compute of misses) for Mixtral-8x7B on 24 GB and 16 GB cards, slots from the planner. A model,
   not a measurement.

    python bench/paper_model.py
    python bench/paper_model.py --recall 0.6 0.85 1.0     # sensitivity to the prefetch recall
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from transformers import MixtralConfig  # noqa: E402

from offload_moe.planning import paper_settings as paper  # noqa: E402
from offload_moe.planning.perfmodel import DERATING, HARDWARE, Costs, hit_rate, replay_calls, tokens_per_s  # noqa: E402
from offload_moe.planning.planner import plan_model  # noqa: E402
from offload_moe.planning.replay import load_trace  # noqa: E402

DEFAULT_TRACE = REPO.parent / "shared" / "traces" / "mixtral-8x7b-instruct-humaneval.jsonl"
GiB = 2**30
# (hardware, card memory in GiB); the planner gets the card minus 1.5 GiB (CUDA context,
# activations, allocator slack) and a 4096-token KV cache.
CARDS = (("rtx3090", 24), ("rtx4090", 24), ("rtx4080", 16), ("rtx4060ti-16gb", 16))
RESERVE_GIB = 1.5


def mixtral_8x7b() -> MixtralConfig:
    return MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False)


def bytes_section() -> str:
    m = paper.hqq_matrix_bytes(paper.FFN, paper.HIDDEN, 2, 16, 128)
    n = paper.FFN * paper.HIDDEN
    wl = paper.workload()
    return "\n".join([
        "Paper's bytes (hqq 2-bit experts, group 16, quant_scale (8-bit, groups of 128) and quant_zero (8-bit, per matrix)):",
        f"  one 14336x4096 matrix: codes {n // 4:,} + scale codes {n // 16:,} + scale meta {n // 16 // 128 * 4:,}"
        f" + zero codes {n // 16:,} + zero meta 4 = {m:,} bytes",
        f"  one expert (w1, w2, w3): {wl.expert_bytes:,} bytes = {wl.expert_bytes * 8 / (3 * n):.4f} bits/weight",
        f"  non-expert reads per token (4-bit attention {paper.attention_bytes_per_layer():,} B/layer, fp16 lm_head,"
        f" routers, norms, KV of 512 tokens): {wl.nonexpert_bytes:,} bytes",
    ])


def paper_section(calls, recalls: list[float]) -> str:
    overhead = paper.fit(calls)
    rows = paper.check(calls, overhead)
    lines = [
        "",
        f"Fitted: framework overhead {overhead * 1e3:.2f} ms per layer (one global parameter, all four GPUs;"
        f" stored constant {paper.FITTED_OVERHEAD_PER_LAYER * 1e3:.2f} ms)",
        f"Assumed (not fitted): prefetch recall {paper.PREFETCH_RECALL}, derating GPU {DERATING.gpu:.0%},"
        f" PCIe {DERATING.pcie:.0%} of data-sheet peak",
        "",
        "| GPU | memory BW (data sheet) | PCIe (data sheet) | LRU slots | hit rate (replay) | modeled tok/s | paper tok/s | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        hw = HARDWARE[r.setup.hardware]
        lines.append(f"| {r.setup.label} | {hw.gpu_bandwidth / 1e9:.0f} GB/s | Gen{hw.pcie_gen} x{hw.pcie_lanes}"
                     f" {hw.pcie_bandwidth / 1e9:.2f} GB/s | {r.setup.slots} | {r.hit_rate:.3f} | {r.full:.3f}"
                     f" | {r.setup.full:.3f} | {r.error:+.1%} |")
    lines.append(f"log-RMS error {paper.log_rms_error(rows):.1%}")
    lines += ["", "Out-of-fit cross-check, the paper's ablation rows (same fitted overhead):",
              "| GPU | w/o prefetch: modeled | paper | error | w/o LRU & prefetch: modeled | paper | error |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r.setup
        lines.append(f"| {s.label} | {r.no_prefetch:.3f} | {s.no_prefetch:.3f} | {r.no_prefetch / s.no_prefetch - 1:+.1%}"
                     f" | {r.no_cache:.3f} | {s.no_cache:.3f} | {r.no_cache / s.no_cache - 1:+.1%} |")
    if recalls:
        lines += ["", "Sensitivity to the prefetch recall (overhead re-fitted each time):",
                  "| recall | overhead ms/layer | " + " | ".join(s.label for s in paper.PAPER_SETUPS) + " |",
                  "|---|---|" + "---|" * len(paper.PAPER_SETUPS)]
        for recall in recalls:
            o = paper.fit(calls, recall)
            cells = " | ".join(f"{r.error:+.1%}" for r in paper.check(calls, o, recall))
            lines.append(f"| {recall} | {o * 1e3:.2f} | {cells} |")
    return "\n".join(lines)


def projection_section(trace) -> str:
    config = mixtral_8x7b()
    lines = [
        "",
        "Projection, offload_moe on Mixtral-8x7B (hqq4 experts, bf16 non-expert weights, markov eviction,"
        f" prefetch recall {paper.PREFETCH_RECALL}); a model, not a measurement.",
        "tok/s at framework overhead 0 (bandwidth bound) / at the paper's fitted"
        f" {paper.FITTED_OVERHEAD_PER_LAYER * 1e3:.1f} ms per layer:",
        "",
        "| GPU | budget | slots/layer (planner) | markov hit rate (replay) | prefetch | prefetch + hybrid |",
        "|---|---|---|---|---|---|",
    ]
    calls_by_slots: dict[int, list] = {}
    for name, gib in CARDS:
        hw = HARDWARE[name]
        plan = plan_model(config, "hqq4", int((gib - RESERVE_GIB) * GiB), 64 * GiB, 4096)
        slots = plan.slots.slots_per_layer
        calls = calls_by_slots.setdefault(slots, replay_calls(trace, "markov", slots))
        wl = plan.workload()
        speeds = {(hybrid, o): tokens_per_s(calls, Costs.of(hw, wl, o, hybrid=hybrid), paper.PREFETCH_RECALL)
                  for hybrid in (False, True) for o in (0.0, paper.FITTED_OVERHEAD_PER_LAYER)}
        lines.append(f"| {name} ({gib} GB, {hw.cpu_bandwidth / 1e9:.1f} GB/s host DRAM) | {gib - RESERVE_GIB} GiB | {slots}"
                     f" | {hit_rate(calls):.3f} | {speeds[(False, 0.0)]:.1f} / {speeds[(False, paper.FITTED_OVERHEAD_PER_LAYER)]:.1f}"
                     f" | {speeds[(True, 0.0)]:.1f} / {speeds[(True, paper.FITTED_OVERHEAD_PER_LAYER)]:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="routing trace (JSON lines)")
    p.add_argument("--recall", type=float, nargs="*", default=[0.6, 0.85, 1.0], help="prefetch recalls to try")
    args = p.parse_args(argv)
    if not args.trace.is_file():
        p.error(f"trace file not found: {args.trace}")
    trace = load_trace(args.trace)
    print(bytes_section())
    print(paper_section(paper.lru_calls(trace), args.recall))
    print(projection_section(trace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
