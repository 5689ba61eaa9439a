"""`offload-moe serve` under concurrent clients: throughput and expert copies per token (CPU).

Starts one server subprocess (the built-in demo model, 4 of 8 expert slots per layer, or
--model PATH) on 127.0.0.1 with a free port, waits for GET /health, warms up with one request,
then for N in --clients (1, 2, 4, 8) sends N distinct chat prompts at once from N threads
(POST /v1/chat/completions, temperature 0, --max-tokens each, not streamed). Per N it
measures:

* wall time from the first send to the last reply;
* aggregate completion tokens/s: the sum of usage.completion_tokens over wall time;
* expert bytes copied per generated token: the delta of /v1/stats bytes_copied over the delta
  of its tokens_out (prefill copies included);
* decode steps per generated token: the delta of offload_moe_decode_steps_total over the
  delta of offload_moe_completion_tokens_total in /metrics (about 1 without batching, about
  1/N when N requests decode together).

--rounds rounds, the order of N reversed every other round (1 2 4 8, 8 4 2 1, ...); the table
shows medians and each ratio against 1 client. Every reply must be 200 with usage; errors,
429s and timeouts are counted and printed, never skipped. A prompt's reply must be the same
text every time it is sent (greedy, whatever the batch): a differing reply is reported as a
mismatch (a reply mixed up between clients or changed by batching).

    python bench/serve_concurrency.py                  # demo model, ~6 minutes on 2 cores
    python bench/serve_concurrency.py --model PATH --slots 8 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from machine import cpu_model  # bench/machine.py (scripts run as python bench/<name>.py)

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Tell me about the sea.",
    "Explain how a bicycle works.",
    "Write a short poem about autumn leaves.",
    "What is the capital of France, and why is it famous?",
    "Give me three tips for learning to cook.",
    "Describe a day in the life of a honeybee.",
    "Why is the sky blue?",
    "Summarize the story of a knight who lost his sword.",
]


def get(base: str, path: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(base + path, timeout=timeout) as r:
        return r.read()


def counters(base: str) -> dict[str, float]:
    """bytes_copied and tokens_out from /v1/stats, decode steps and completion tokens from /metrics."""
    stats = json.loads(get(base, "/v1/stats"))
    metrics = get(base, "/metrics").decode()

    def metric(name: str) -> float:
        m = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.M)
        if m is None:
            raise RuntimeError(f"/metrics has no {name}")
        return float(m.group(1))

    return {"bytes": stats["bytes_copied"], "tokens": stats["tokens_out"],
            "steps": metric("offload_moe_decode_steps_total"),
            "metric_tokens": metric("offload_moe_completion_tokens_total")}


def chat(base: str, prompt: str, max_tokens: int, timeout: float) -> tuple[str, int]:
    """One whole chat completion: (reply text, completion tokens); raises on anything but a
    200 reply with usage."""
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "temperature": 0,
                       "max_tokens": max_tokens}).encode()
    request = urllib.request.Request(base + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            reply = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"HTTP {exc.code}: {exc.read()[:200]!r}") from None
    return reply["choices"][0]["message"]["content"], int(reply["usage"]["completion_tokens"])


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "offload_moe.cli", "serve", *([args.model] if args.model else []),
           "--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--max-batch", str(args.max_batch),
           *(["--slots", str(args.slots)] if args.slots else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    port: list[str] = []
    found = threading.Event()

    def read_stderr() -> None:  # keep draining it (progress bars) so the server never blocks on the pipe
        for line in proc.stderr:
            m = re.search(r"serving \S+ on http://127\.0\.0\.1:(\d+)", line)
            if m and not port:
                port.append(m.group(1))
                found.set()
            elif "error" in line.lower():
                print(f"server: {line.rstrip()}", file=sys.stderr)
        found.set()

    threading.Thread(target=read_stderr, daemon=True).start()
    if not found.wait(60) or not port:
        stop_server(proc)
        raise SystemExit("the server did not print its address")
    base = f"http://127.0.0.1:{port[0]}"
    deadline = time.monotonic() + args.load_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} while loading")
        try:
            get(base, "/health", timeout=5)
            return proc, base
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    stop_server(proc)
    raise SystemExit(f"/health not 200 after {args.load_timeout} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def one_burst(base: str, n: int, args: argparse.Namespace) -> dict:
    """N clients at once, each its own prompt; the counters' deltas around the burst."""
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def client(i: int) -> None:
        barrier.wait()
        try:
            results[i] = chat(base, PROMPTS[i], args.max_tokens, args.request_timeout)
        except Exception as exc:  # noqa: BLE001 - counted and printed by the caller
            results[i] = exc

    before = counters(base)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = counters(base)
    delta = {k: after[k] - before[k] for k in after}
    ok = [r for r in results if isinstance(r, tuple)]
    tokens = sum(r[1] for r in ok)
    return {"wall": wall, "tokens": tokens, "tok_s": tokens / wall,
            "bytes_per_tok": delta["bytes"] / max(delta["tokens"], 1),
            "steps_per_tok": delta["steps"] / max(delta["metric_tokens"], 1),
            "server_tokens": delta["tokens"], "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: the built-in demo model)")
    parser.add_argument("--slots", type=int, help="expert slots per layer (default: the CLI's, 4 for the demo)")
    parser.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--load-timeout", type=float, default=300.0, help="seconds for /health to turn 200")
    args = parser.parse_args()
    if max(args.clients) > len(PROMPTS):
        parser.error(f"--clients: at most {len(PROMPTS)} (one distinct prompt each)")

    began = time.monotonic()
    proc, base = start_server(args)
    loaded = time.monotonic() - began
    runs: dict[int, list[dict]] = {n: [] for n in args.clients}
    replies: dict[int, str] = {}
    errors: list[str] = []
    mismatches: list[str] = []
    try:
        chat(base, "Hello!", args.max_tokens, args.request_timeout)  # warm-up
        for r in range(args.rounds):
            order = args.clients if r % 2 == 0 else list(reversed(args.clients))
            for n in order:
                run = one_burst(base, n, args)
                runs[n].append(run)
                for i, res in enumerate(run["results"]):
                    if not isinstance(res, tuple):
                        errors.append(f"round {r + 1}, {n} clients, prompt {i}: {type(res).__name__}: {res}")
                    elif replies.setdefault(i, res[0]) != res[0]:
                        mismatches.append(f"round {r + 1}, {n} clients, prompt {i}: {res[0][:60]!r} "
                                          f"vs first {replies[i][:60]!r}")
                if run["server_tokens"] != run["tokens"]:
                    errors.append(f"round {r + 1}, {n} clients: usage says {run['tokens']} tokens, "
                                  f"the server's tokens_out grew by {run['server_tokens']:g}")
                print(f"round {r + 1} N={n}: {run['wall']:.1f} s, {run['tokens']} tokens, {run['tok_s']:.2f} tok/s, "
                      f"{run['bytes_per_tok'] / 2**20:.1f} MiB copied/token, {run['steps_per_tok']:.3f} steps/token",
                      file=sys.stderr, flush=True)
    finally:
        stop_server(proc)

    med = {n: {k: statistics.median(run[k] for run in rs) for k in ("wall", "tokens", "tok_s", "bytes_per_tok",
                                                                    "steps_per_tok")} for n, rs in runs.items()}
    one = med[args.clients[0]]
    vs = f"vs {args.clients[0]} client{'' if args.clients[0] == 1 else 's'}"
    print(f"date: {time.strftime('%Y-%m-%d %H:%M')}  nproc: {os.cpu_count()}  cpu: {cpu_model()}")
    print(f"model: {args.model or 'built-in demo'}; slots {args.slots or 'CLI default'}; --max-batch {args.max_batch}; "
          f"{args.max_tokens} max tokens, temperature 0; median of {args.rounds} rounds (order reversed every other); "
          f"load {loaded:.0f} s, total {time.monotonic() - began:.0f} s")
    print()
    print(f"| clients | wall s | completion tokens | tok/s | tok/s {vs} | MiB copied/token | {vs} | "
          "decode steps/token |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.clients:
        m = med[n]
        print(f"| {n} | {m['wall']:.1f} | {m['tokens']:.0f} | {m['tok_s']:.2f} | {m['tok_s'] / one['tok_s']:.2f}x | "
              f"{m['bytes_per_tok'] / 2**20:.1f} | {m['bytes_per_tok'] / one['bytes_per_tok']:.2f}x | "
              f"{m['steps_per_tok']:.3f} |")
    print()
    print(f"errors: {len(errors)}; replies differing from the same prompt's first reply: {len(mismatches)}")
    for line in errors + mismatches:
        print(f"  {line}")
    if errors or mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
