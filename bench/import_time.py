"""Start-up cost: `python -c "import offload_moe"` (also with `offload_moe.load` looked up) and
`python -m offload_moe.cli --help`, per source tree.

Each figure is the median wall time of --runs fresh interpreters (default 7). With two trees the
runs alternate between them (and swap order every other run), so a busy neighbour slows both
alike. Untimed runs per tree and command first warm the page cache and the bytecode cache and
report what the command loaded: how many offload_moe modules, whether torch and transformers
were imported. `python -c "import torch"`, timed in the same rounds, is the floor for any
command that needs torch.

A tree is imported by putting it first on PYTHONPATH (the child runs in a scratch directory, so
neither the current directory nor an installed copy shadows it; the report checks the path).
The children keep their bytecode under the scratch directory (PYTHONPYCACHEPREFIX, whatever
PYTHONDONTWRITEBYTECODE says), so each figure is an installed package's start with its .pyc
files written, and the trees themselves are not written to.

    python bench/import_time.py --tree /work/base --tree /work/main
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "import offload_moe": ["-c", "import offload_moe"],
    # what a script that loads a model pays before load() runs (the package may import it lazily)
    "import offload_moe; offload_moe.load": ["-c", "import offload_moe; offload_moe.load"],
    "offload-moe --help": ["-m", "offload_moe.cli", "--help"],
}

# The same work as each command, then a report of sys.modules (untimed: the report costs time too)
_HELP = """import contextlib, io, runpy, sys
sys.argv = ["offload-moe", "--help"]
with contextlib.redirect_stdout(io.StringIO()):
    try:
        runpy.run_module("offload_moe.cli", run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
"""
PROBES = {name: argv[1] + "\n" for name, argv in COMMANDS.items() if argv[0] == "-c"} | {"offload-moe --help": _HELP}
TORCH = ["-c", "import torch"]  # the reference: what a command that needs torch cannot go below
_REPORT = """
import json, sys
mods = sys.modules
print(json.dumps({"file": mods["offload_moe"].__file__, "total": len(mods),
                  "offload_moe": sum(m == "offload_moe" or m.startswith("offload_moe.") for m in mods),
                  "torch": "torch" in mods, "transformers": "transformers" in mods}))
"""


def machine() -> str:
    """Date, nproc, CPU model and SIMD level (avx512_vnni / avx2 / neither) from /proc/cpuinfo."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    isa = next((f for f in ("avx512_vnni", "avx2") if f in flags), "no avx2")
    return (f"{datetime.datetime.now().isoformat(timespec='seconds')}  nproc={os.cpu_count()}  cpu={model!r}  "
            f"isa={isa}  python={platform.python_version()}")


def describe_tree(tree: Path) -> str:
    """The tree's commit, and whether its work tree has uncommitted changes."""
    def git(*args: str) -> str:
        res = subprocess.run(["git", "-C", str(tree), *args], check=False, capture_output=True, text=True)
        return res.stdout.strip() if res.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "no git"
    return commit + (" + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def child_env(tree: Path, cwd: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    path = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": path, "PYTHONPYCACHEPREFIX": str(Path(cwd) / "pycache"), "HF_HUB_OFFLINE": "1"}


def probe(tree: Path, name: str, cwd: str) -> dict:
    res = subprocess.run([sys.executable, "-c", PROBES[name] + _REPORT], check=False, capture_output=True, text=True,
                         env=child_env(tree, cwd), cwd=cwd, timeout=300)
    if res.returncode:
        raise SystemExit(f"{tree}: {name} failed:\n{res.stderr}")
    report = json.loads(res.stdout.splitlines()[-1])
    if not Path(report["file"]).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"{tree}: {name} imported {report['file']}, not this tree's package")
    return report


def timed(tree: Path, argv: list[str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], check=True, env=child_env(tree, cwd), cwd=cwd,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    return time.perf_counter() - start


def measure(trees: list[Path], runs: int, cwd: str) -> tuple[dict, dict, list[float]]:
    """({(tree, command): probe report}, {(tree, command): [seconds per run]}, [import torch seconds])."""
    reports = {(t, c): probe(t, c, cwd) for t in trees for c in COMMANDS}
    times: dict[tuple[Path, str], list[float]] = {key: [] for key in reports}
    torch_times: list[float] = []
    timed(trees[0], TORCH, cwd)  # warm-ups
    for tree, name in reports:
        timed(tree, COMMANDS[name], cwd)
    for i in range(runs):
        torch_times.append(timed(trees[0], TORCH, cwd))
        for tree in trees if i % 2 == 0 else trees[::-1]:
            for name in COMMANDS:
                times[tree, name].append(timed(tree, COMMANDS[name], cwd))
    return reports, times, torch_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", type=Path, required=True,
                        help="a source tree holding offload_moe/ (give it twice to compare two trees)")
    parser.add_argument("--runs", type=int, default=7, help="fresh interpreters per tree and command (default 7)")
    args = parser.parse_args()
    print(machine())
    print("command: " + shlex.join([Path(sys.executable).name, *sys.argv]))
    with tempfile.TemporaryDirectory() as scratch:
        reports, times, torch_times = measure(args.tree, args.runs, scratch)
    print(f"\nmedian of {args.runs} fresh interpreters each (min-max in brackets)\n")
    print("| tree | command | median s | min-max s | offload_moe modules | torch | transformers | all modules |")
    print("|---|---|---|---|---|---|---|---|")
    for (tree, name), secs in times.items():
        r = reports[tree, name]
        print(f"| {tree} ({describe_tree(tree)}) | `{name}` | {statistics.median(secs):.2f} | "
              f"{min(secs):.2f}-{max(secs):.2f} | {r['offload_moe']} | {'yes' if r['torch'] else 'no'} | "
              f"{'yes' if r['transformers'] else 'no'} | {r['total']} |")
    print(f"| (reference) | `import torch` | {statistics.median(torch_times):.2f} | "
          f"{min(torch_times):.2f}-{max(torch_times):.2f} | 0 | yes | no | |")


if __name__ == "__main__":
    main()
