"""Continuous batching of an OffloadedModel: every active request advances by one token per
model forward, and a request that arrives while others decode joins the next step.

Why our own loop rather than transformers' continuous batching (`generate_batch`, paged
cache): that one packs every request's tokens into one row and runs the attention and the
dense matmuls over the packed rows, and torch's CPU kernels give a row different bits when the
number of rows around it changes, so a greedy reply under load differs from the same request
alone within a few dozen tokens in bf16. Here:

* a new request's prompt is prefilled alone, exactly as `generate()` prefills it;
* decode steps batch one token per sequence (attention per row, server.attention): the KV caches of all active sequences are one
  left-padded DynamicCache [B, kv_heads, L, head_dim] with an attention mask, each sequence at
  its own position ids, so one forward serves every sequence and one expert copy serves every
  sequence routed to that expert;
* each sequence samples its next token from its own logits row with its own generator
  (server.sampling), so sampling never depends on the batch either.

A sequence joins by left-padding (its cache or the batch's) to the longer of the two and
concatenating along the batch; it leaves by index_select, and columns that every remaining
row has as padding are trimmed. Families whose cache is not plain full attention (sliding
windows, Mamba or linear-attention states) run one request at a time, the others queued.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from offload_moe.errors import ConfigError, OffloadMoeError
from offload_moe.server.attention import use_rowwise_attention
from offload_moe.server.sampling import Sampler, SamplingParams
from offload_moe.stop_strings import cut_at_stop, stop_prefix_length


class QueueFullError(OffloadMoeError):
    """The server's queue of waiting requests is full (HTTP 429)."""


@dataclass(frozen=True)
class Delta:
    """New reply text of one request."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The request is done: reason "stop" (end of sequence or a stop string), "length"
    (max_new_tokens), "cancelled" or "error" (with `error`)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


Event = Delta | Finished


class Handle:
    """A submitted request: `cancel()` frees its place at the next step."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, deliver: Callable[[Event], None]):
        self.prompt_ids = prompt_ids
        self.params = params
        self.deliver = deliver
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


class _Sequence:
    """One request being decoded: its tokens, its sampler and how much text it has emitted."""

    def __init__(self, handle: Handle, tokenizer):
        self.handle = handle
        self.params = handle.params
        self.sampler = Sampler(handle.params)
        self.tokenizer = tokenizer
        self.generated: list[int] = []
        self.emitted = 0
        self.reason: str | None = None

    @property
    def position(self) -> int:
        """Position id of the last generated token, the next one fed to the model."""
        return len(self.handle.prompt_ids) + len(self.generated) - 1

    def add(self, token: int) -> None:
        """Append `token`, emit the text that is now certain, and decide whether it is done."""
        self.generated.append(token)
        params = self.params
        if token in params.eos_token_ids:
            self.reason = "stop"
        elif len(self.generated) >= params.max_new_tokens:
            self.reason = "length"
        full = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        text = cut_at_stop(full, list(params.stop))
        if text != full:
            self.reason = "stop"
        if self.reason is None:
            safe = len(text) - stop_prefix_length(text, list(params.stop))
            while safe > self.emitted and text[safe - 1] == "\ufffd":  # an unfinished UTF-8 character
                safe -= 1
        else:
            safe = len(text)
        if safe > self.emitted:
            self.handle.deliver(Delta(text[self.emitted : safe]))
            self.emitted = safe

    def finish(self, reason: str, error: str | None = None) -> None:
        self.reason = reason
        self.handle.deliver(Finished(reason, len(self.handle.prompt_ids), len(self.generated), error))


def batchable(model) -> bool:
    """Whether the model's cache is plain full attention in every layer (see module docstring)."""
    probe = DynamicCache(config=model.config)
    return bool(probe.layers) and all(type(layer) is DynamicLayer for layer in probe.layers)


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class _Batch:
    """The active sequences and their one left-padded cache and mask (rows in the same order)."""

    def __init__(self):
        self.seqs: list[_Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, L] 1 where a row has a real token

    def join(self, seq: _Sequence, cache: DynamicCache, device: torch.device) -> None:
        length = cache.get_seq_length()
        mask = torch.ones(1, length, dtype=torch.long, device=device)
        if self.cache is None:
            self.seqs, self.cache, self.mask = [seq], cache, mask
            return
        longest = max(length, self.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, longest, 2), _left_pad(theirs.keys, longest, 2)])
            mine.values = torch.cat([_left_pad(mine.values, longest, 2), _left_pad(theirs.values, longest, 2)])
        self.mask = torch.cat([_left_pad(self.mask, longest, 1), _left_pad(mask, longest, 1)])
        self.seqs.append(seq)

    def drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self.seqs) if s.reason is None]
        if len(keep) == len(self.seqs):
            return
        if not keep:
            self.seqs, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(0).nonzero()[0])  # columns before it are padding in every row
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.seqs = [self.seqs[i] for i in keep]


class BatchEngine:
    """Runs the model in one background thread; `submit()` from any thread.

    max_batch: sequences decoded together (1 for families that cannot batch, see module
    docstring). max_queue: requests allowed to wait for a place; beyond it submit() raises
    QueueFullError.
    """

    def __init__(self, llm, max_batch: int = 8, max_queue: int = 32):
        if getattr(llm.model.config, "is_encoder_decoder", False):
            raise ConfigError(f"{llm.path}: serve runs decoder-only models; {llm.model.config.model_type} is "
                              "encoder-decoder (text to text: use offload-moe generate or the Python API)")
        self.llm = llm
        self.model = llm.model
        self.tokenizer = llm.tokenizer
        self.device = llm.device
        self.max_batch = max_batch if batchable(self.model) else 1
        self.max_queue = max_queue
        self._waiting: collections.deque[Handle] = collections.deque()
        self._batch = _Batch()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._restore_attention: str | None = None
        self.counters = EngineCounters()

    # -- any thread ------------------------------------------------------------------------

    def start(self) -> None:
        if self.max_batch > 1:
            self._restore_attention = use_rowwise_attention(self.model)
        self._thread = threading.Thread(target=self._run, name="offload-moe-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
        if self._restore_attention is not None:
            self.model.set_attn_implementation(self._restore_attention)
            self._restore_attention = None

    def submit(self, prompt_ids: list[int], params: SamplingParams, deliver: Callable[[Event], None]) -> Handle:
        handle = Handle(list(prompt_ids), params, deliver)
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(
                    f"the server is busy: {len(self._batch.seqs)} requests running and {len(self._waiting)} waiting "
                    f"(the queue holds {self.max_queue}); retry later")
            self._waiting.append(handle)
            self._wake.notify_all()
        return handle

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._batch.seqs)

    # -- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopping and not self._waiting and not self._batch.seqs:
                        self._wake.wait()
                    if self._stopping:
                        break
                    handle = self._waiting.popleft() if self._waiting and self.active < self.max_batch else None
                try:
                    self._step(handle)
                except Exception as exc:  # noqa: BLE001 - any failure ends the requests in flight, not the server
                    self._fail_all(exc)
        self._fail_all(None)

    def _step(self, handle: Handle | None) -> None:
        if handle is not None and not handle.cancelled.is_set():
            self._admit(handle)
        elif handle is not None:
            handle.deliver(Finished("cancelled", len(handle.prompt_ids), 0))
        self._drop_finished()
        if self._batch.seqs:
            self._decode_step()
            self._drop_finished()

    def _admit(self, handle: Handle) -> None:
        """Prefill the request alone, sample its first token and add it to the batch."""
        seq = _Sequence(handle, self.tokenizer)
        ids = torch.tensor([handle.prompt_ids], device=self.device)
        cache = DynamicCache(config=self.model.config)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, use_cache=True)
        if self.model._supports_logits_to_keep():
            kwargs["logits_to_keep"] = 1
        start = time.perf_counter()
        logits = self.model(**kwargs).logits[0, -1].float()
        self.counters.prefilled(len(handle.prompt_ids), time.perf_counter() - start)
        seq.add(seq.sampler.next_token(logits, seq.generated))
        self.counters.generated(1)
        self._batch.join(seq, cache, self.device)

    def _decode_step(self) -> None:
        batch = self._batch
        seqs = batch.seqs
        ids = torch.tensor([[s.generated[-1]] for s in seqs], device=self.device)
        positions = torch.tensor([[s.position] for s in seqs], device=self.device)
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(seqs), 1)], dim=1)
        start = time.perf_counter()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=batch.cache,
                         use_cache=True)
        batch.mask = mask
        logits = out.logits[:, -1].float()
        for row, seq in enumerate(seqs):
            seq.add(seq.sampler.next_token(logits[row], seq.generated))
        self.counters.decoded(len(seqs), time.perf_counter() - start)

    def _drop_finished(self) -> None:
        for seq in self._batch.seqs:
            if seq.reason is None and seq.handle.cancelled.is_set():
                seq.finish("cancelled")
            elif seq.reason is not None:
                seq.finish(seq.reason)
        self._batch.drop_finished()

    def _fail_all(self, exc: BaseException | None) -> None:
        """End every request in flight (the engine failed or is stopping); the server lives on."""
        message = "the server is shutting down" if exc is None else f"generation failed: {type(exc).__name__}: {exc}"
        for seq in self._batch.seqs:
            seq.finish("error", message)
        self._batch = _Batch()
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for handle in waiting:
            handle.deliver(Finished("error", len(handle.prompt_ids), 0, message))


class EngineCounters:
    """Totals for /metrics, and a recent-throughput window (written by the engine thread only)."""

    WINDOW_S = 10.0

    def __init__(self):
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.decode_steps = 0
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def prefilled(self, tokens: int, seconds: float) -> None:
        self.prompt_tokens += tokens
        self.prefill_seconds += seconds

    def generated(self, tokens: int) -> None:
        self.completion_tokens += tokens
        now = time.monotonic()
        self._recent.append((now, tokens))
        while self._recent and self._recent[0][0] < now - self.WINDOW_S:
            self._recent.popleft()

    def decoded(self, tokens: int, seconds: float) -> None:
        self.decode_steps += 1
        self.decode_seconds += seconds
        self.generated(tokens)

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last WINDOW_S seconds."""
        recent = list(self._recent)
        if not recent:
            return 0.0
        span = max(time.monotonic() - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / min(span, self.WINDOW_S)
