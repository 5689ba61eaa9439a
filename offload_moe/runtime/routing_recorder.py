"""Record the routing of a live run as JSON lines, in the format of ../shared/traces/.

One object per (token, MoE layer):

    {"dataset": "offload_moe", "problem_id": 0, "layer": 3, "token_idx": 17, "phase": "decode",
     "experts": [5, 1], "gating_probs": [0.71, 0.29],
     "router_probs": [... one per expert ...], "next_router_probs": [... or null ...]}

Encoder-decoder models (Switch Transformers) add "stack": "encoder" or "decoder"; their layer
numbers are distinct (the decoder's blocks count on from the encoder's), so a trace keeps the two
stacks apart, and a token the router dropped at expert capacity has "experts": [].

`experts` / `gating_probs` are the top-k choice and its (renormalised) weights, as in the shared
traces. The two extra fields keep what the live runtime knows and a plain trace does not: this
layer's full router distribution, and the next layer's router applied to this layer's input
(what speculative prefetch sees), so policies and predictors can be judged offline on them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

import torch


class RoutingRecorder:
    """Appends routing rows to a JSON-lines file; `new_sequence()` starts the next problem_id."""

    def __init__(self, path: str | Path, dataset: str = "offload_moe"):
        self.path = Path(path)
        self.dataset = dataset
        self.problem_id = 0
        self._next_token: dict[int, int] = {}  # layer -> token_idx of its next row
        self._file: TextIO = open(self.path, "w")

    def new_sequence(self) -> None:
        if self._next_token:
            self.problem_id += 1
        self._next_token.clear()

    def record(
        self,
        layer: int,
        top_k_index: torch.Tensor,  # [T, K]
        top_k_weights: torch.Tensor,  # [T, K]
        router_probs: torch.Tensor | None,  # [T, E] softmax of this layer's router
        next_router_probs: torch.Tensor | None,  # [T, E'] next layer's router on this input
        stack: str = "",  # "encoder" / "decoder" in an encoder-decoder model
        num_experts: int | None = None,  # ids >= this are "no expert" (dropped by capacity): left out
    ) -> None:
        tokens = top_k_index.shape[0]
        # The encoder reads the whole source in one call, whatever its length.
        phase = "decode" if tokens == 1 and stack != "encoder" else "prefill"
        start = self._next_token.get(layer, 0)
        experts, weights = _routed(top_k_index.tolist(), top_k_weights.float().tolist(), num_experts)
        probs = router_probs.float().tolist() if router_probs is not None else [None] * tokens
        nxt = next_router_probs.float().tolist() if next_router_probs is not None else [None] * tokens
        for t in range(tokens):
            row = {
                "dataset": self.dataset,
                "problem_id": self.problem_id,
                "layer": layer,
                "token_idx": start + t,
                "phase": phase,
                "experts": experts[t],
                "gating_probs": [round(w, 6) for w in weights[t]],
                "router_probs": None if probs[t] is None else [round(p, 6) for p in probs[t]],
                "next_router_probs": None if nxt[t] is None else [round(p, 6) for p in nxt[t]],
            }
            if stack:
                row["stack"] = stack
            self._file.write(json.dumps(row) + "\n")
        self._next_token[layer] = start + tokens
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def _routed(experts: list[list[int]], weights: list[list[float]], num_experts: int | None
            ) -> tuple[list[list[int]], list[list[float]]]:
    """Each token's (experts, weights) without the "no expert" entries (id >= num_experts)."""
    if num_experts is None:
        return experts, weights
    kept = [[(e, w) for e, w in zip(es, ws) if e < num_experts] for es, ws in zip(experts, weights)]
    return [[e for e, _ in row] for row in kept], [[w for _, w in row] for row in kept]
