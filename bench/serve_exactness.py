"""Does batching change greedy replies? transformers' continuous batching against offload_moe's engine.

The same chat prompts on the demo model (bf16, 4 of 8 experts per layer in slots), greedy,
each run alone and then all at once; prints how many batched replies equal their reply alone,
for `model.generate_batch`-style continuous batching (transformers' ContinuousBatchingManager,
paged cache, SDPA) and for offload_moe.server.engine.BatchEngine. This is why `serve` has its
own engine (see offload_moe/server/engine.py).

    python bench/serve_exactness.py [--tokens 24]
"""

from __future__ import annotations

import argparse
import threading

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

import offload_moe
from offload_moe.demo import ensure_demo_checkpoint
from offload_moe.server.engine import BatchEngine, Finished
from offload_moe.server.sampling import SamplingParams

QUESTIONS = ["What is the capital of France?", "Write a haiku about RAM.", "Name three colours.",
             "Why is the sky blue?"]


def transformers_cb(llm, prompts: list[list[int]], tokens: int) -> tuple[list, list]:
    config = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(page_size=32, num_blocks=128, max_batch_tokens=512, max_requests_per_batch=8,
                                  auto_switch_to_flash=False, allow_block_sharing=False, use_async_batching=False)
    manager = llm.model.init_continuous_batching(generation_config=config, continuous_batching_config=cb)
    manager.start()

    def run(batch):
        ids = [manager.add_request(p, max_new_tokens=tokens) for p in batch]
        out = []
        for i in ids:
            for result in manager.request_id_iter(i):
                pass
            out.append(result.generated_tokens)
        return out

    try:
        return [run([p])[0] for p in prompts], run(prompts)
    finally:
        manager.stop(block=True)
        llm.model.destroy_cached_continuous_batching_manager()


def engine(llm, prompts: list[list[int]], tokens: int) -> tuple[list, list]:
    eng = BatchEngine(llm, max_batch=8)
    eng.start()

    def run(batch):
        results = [[] for _ in batch]
        done = [threading.Event() for _ in batch]
        for i, p in enumerate(batch):
            def deliver(event, i=i):
                results[i].append(event)
                if isinstance(event, Finished):
                    done[i].set()
            eng.submit(p, SamplingParams(max_new_tokens=tokens), deliver)
        for d in done:
            d.wait()
        return ["".join(e.text for e in r if not isinstance(e, Finished)) for r in results]

    try:
        return [run([p])[0] for p in prompts], run(prompts)
    finally:
        eng.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(2)
    llm = offload_moe.load(ensure_demo_checkpoint(), device="cpu", slots_per_layer=4, progress=False)
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"] for q in QUESTIONS]
    print(f"| engine | batched replies equal to alone ({len(prompts)} prompts, {args.tokens} greedy tokens) |")
    print("|---|---|")
    for name, run in (("transformers continuous batching", transformers_cb), ("offload_moe BatchEngine", engine)):
        alone, together = run(llm, prompts, args.tokens)
        print(f"| {name} | {sum(a == b for a, b in zip(alone, together))} of {len(prompts)} |")
    llm.close()


if __name__ == "__main__":
    main()
