"""One request's sampling settings and the choice of its next token, row by row.

Each sequence is sampled on its own, with its own `torch.Generator`, from its own row of
logits: the token a request gets never depends on which other requests share its batch, so a
`seed` gives the same reply alone and under load, and greedy decoding is the plain argmax of
the row, as in transformers' generate().
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


@dataclass(frozen=True)
class SamplingParams:
    """What one request asked for. temperature 0 is greedy decoding; top_k 0 is off; penalties
    follow OpenAI's definition (subtracted from the logits per generated occurrence / once)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


_NO_IDS = torch.empty(1, 0, dtype=torch.long)


class Sampler:
    """The next-token choice of one sequence: warpers as transformers' generate() orders them
    (temperature, top-k, top-p), then a draw from the sequence's own generator."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        warpers = []
        if not params.greedy:
            if params.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                warpers.append(TopPLogitsWarper(params.top_p))
        self.warpers = LogitsProcessorList(warpers)

    def _penalised(self, logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        p = self.params
        if not generated or (p.frequency_penalty == 0.0 and p.presence_penalty == 0.0):
            return logits
        ids, counts = torch.tensor(generated).unique(return_counts=True)
        logits = logits.clone()
        logits[ids] -= counts.to(logits.dtype) * p.frequency_penalty + p.presence_penalty
        return logits

    def next_token(self, logits: torch.Tensor, generated: list[int]) -> int:
        """logits [V] (float32) of this sequence's last position -> the next token id."""
        logits = self._penalised(logits, generated)
        if self.params.greedy:
            return int(torch.argmax(logits))
        scores = self.warpers(_NO_IDS, logits[None])  # these warpers read only the scores
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs[0], 1, generator=self.generator))
