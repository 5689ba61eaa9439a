"""Record the routing of a live run as JSON lines, in the format of ../shared/traces/.

One object per (token, MoE layer):

    {"dataset": "offload_moe", "problem_id": 0, "layer": 3, "token_idx": 17, "phase": "decode",
     "experts": [5, 1], "gating_probs": [0.71, 0.29],
     "router_probs": [... one per expert ...], "next_router_probs": [... or null ...]}

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
    ) -> None:
        tokens = top_k_index.shape[0]
        phase = "decode" if tokens == 1 else "prefill"
        start = self._next_token.get(layer, 0)
        experts = top_k_index.tolist()
        weights = top_k_weights.float().tolist()
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
            self._file.write(json.dumps(row) + "\n")
        self._next_token[layer] = start + tokens
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
