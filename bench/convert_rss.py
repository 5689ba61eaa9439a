"""Peak memory of `offload-moe convert` on a checkpoint bigger than 4 GB.

Writes (once) a random checkpoint of Mixtral-8x7B's layer shapes (hidden 4096, FFN 14336,
8 experts, 32000 vocab, bf16) with --layers layers and --shards shards, then converts it to
hqq4 in a child process and reports the child's peak RSS against one layer's 16-bit experts
(the bound the design asks for) and the checkpoint size.

    python bench/convert_rss.py --layers 2     # 6.2 GB checkpoint
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

GiB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="bench/out/convert")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--experts", default="hqq4")
    args = parser.parse_args()
    src = Path(args.dir) / f"mixtral-shape-l{args.layers}"
    dst = Path(args.dir) / f"mixtral-shape-l{args.layers}-{args.experts}"
    if not (src / "config.json").exists():
        code = (
            "import torch; from offload_moe.testing import make_tiny_checkpoint; "
            f"make_tiny_checkpoint({str(src)!r}, seed=0, num_shards={args.shards}, dtype=torch.bfloat16, "
            "vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers="
            f"{args.layers}, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8)"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
    shutil.rmtree(dst, ignore_errors=True)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    layer_experts = 8 * 3 * 4096 * 14336 * 2
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "offload_moe.cli", "convert", str(src), str(dst), "--experts", args.experts],
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    out = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    print(f"date: {time.strftime('%Y-%m-%d')}  nproc: {os.cpu_count()}")
    print(f"checkpoint: {size / GiB:.2f} GiB ({args.layers} Mixtral-shape layers, {args.shards} shards)")
    print(f"converted ({args.experts}): {out / GiB:.2f} GiB in {seconds:.0f} s")
    print(f"peak RSS of the convert process: {peak / GiB:.2f} GiB")
    print(f"one layer's 16-bit experts (the bound): {layer_experts / GiB:.2f} GiB; "
          f"peak / bound = {peak / layer_experts:.2f}; peak / checkpoint = {peak / size:.2f}")


if __name__ == "__main__":
    main()
