"""A multi-turn chat that keeps the KV cache across turns instead of re-running the history.

Each turn renders the whole conversation with the model's chat template, finds the longest
prefix it shares with the tokens already in the KV cache, crops the cache to that prefix and
feeds only the rest. Token-boundary differences between what was generated and how the template
re-tokenizes it cost a few tokens, never correctness.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList, TextStreamer

from offload_moe.config import DEFAULT_MAX_NEW_TOKENS
from offload_moe.errors import CheckpointError, ConfigError


class StopFlag(StoppingCriteria):
    """Stops generation at the next token once `set()` is called (e.g. from a Ctrl-C handler)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self._event.is_set(), dtype=torch.bool, device=input_ids.device)


class _CallbackStreamer(TextStreamer):
    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self._on_text(text)


@dataclass
class TurnResult:
    """One reply and how it went."""

    text: str
    new_tokens: int
    prompt_tokens_run: int  # tokens fed through the model this turn (the rest came from the cache)
    seconds: float
    interrupted: bool

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


# ollama's defaults for a chat: sampled, so that a reply does not fall into the loops greedy
# decoding falls into with small models ("write a haiku" repeating one line to max_new_tokens).
CHAT_SAMPLING = {"temperature": 0.8, "top_p": 0.9, "repetition_penalty": 1.1}


def render_chat_template(tokenizer: Any, messages: list[dict[str, str]], path: Any, **kwargs: Any) -> Any:
    """tokenizer.apply_chat_template(messages, **kwargs), with its errors as ours naming the
    template's file under checkpoint `path`. Rendering stays transformers' own, in its Jinja
    sandbox: templates come from checkpoints and are never rendered anywhere else."""
    from jinja2 import TemplateError

    from offload_moe.checkpoint.config_check import chat_template_file

    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{path}: the tokenizer has no chat template; pass plain text or token ids to generate()")
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except TemplateError as exc:
        if type(exc) is TemplateError:  # the template's own raise_exception(): this conversation is refused
            raise ConfigError(
                f"{chat_template_file(path)}: the chat template refuses this conversation: {exc}") from None
        raise CheckpointError(
            f"{chat_template_file(path)}: the chat template fails to render ({type(exc).__name__}: {exc})") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError, RecursionError) as exc:
        raise CheckpointError(
            f"{chat_template_file(path)}: the chat template fails to render ({type(exc).__name__}: {exc})") from None


class ChatSession:
    """Conversation state: messages, the KV cache and the token ids it holds.

    >>> chat = llm.chat_session(system_prompt="You are terse.")  # doctest: +SKIP
    >>> chat.send("What is the capital of France?").text  # doctest: +SKIP
    'Paris.'
    """

    def __init__(self, llm: Any, system_prompt: str | None = None, **generation_kwargs: Any):
        """`llm`: an api.OffloadedModel; only its public API is used (tokenizer, model, generate).

        Replies are sampled with CHAT_SAMPLING for each of its keys the caller leaves out.
        Greedy decoding is `do_sample=False` or `temperature=0`; a checkpoint whose
        generation_config.json turns sampling on keeps its own settings instead.
        """
        if llm.tokenizer is None:
            raise CheckpointError(f"{llm.path}: the checkpoint has no tokenizer (tokenizer.json, tokenizer.model or "
                                  "tokenizer_config.json), so it cannot chat")
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.system_prompt = system_prompt
        kwargs = dict(generation_kwargs)
        if kwargs.get("temperature") == 0:  # greedy as ollama and the CLI spell it; transformers refuses 0
            kwargs.update(do_sample=False, temperature=None, top_p=None)
        own_sampling = bool(getattr(llm.model.generation_config, "do_sample", False))
        if kwargs.get("do_sample") is not False and not own_sampling:
            kwargs["do_sample"] = True
            for key, value in CHAT_SAMPLING.items():
                kwargs.setdefault(key, value)
        self.generation_kwargs = kwargs
        self.stop_flag = StopFlag()
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and empty the KV cache."""
        self.messages: list[dict[str, str]] = []
        if self.system_prompt:
            self.messages.append({"role": "system", "content": self.system_prompt})
        self.cache = DynamicCache(config=self.llm.model.config)
        self.cached_ids: list[int] = []  # tokens whose keys/values are in self.cache

    def _render(self) -> list[int]:
        """The conversation's token ids. send() appends the user turn before rendering; a turn
        the template cannot render is dropped here, so the history stays as it was."""
        try:
            out = render_chat_template(self.tokenizer, self.messages, self.llm.path, add_generation_prompt=True,
                                       tokenize=True)
        except (CheckpointError, ConfigError):
            if self.messages and self.messages[-1]["role"] == "user":
                self.messages.pop()
            raise
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    def _reuse_cache(self, ids: list[int]) -> int:
        """Crop the KV cache to the longest prefix it shares with `ids` (always leaving the last
        token to run); returns the length of that prefix."""
        common = 0
        for a, b in zip(self.cached_ids, ids[:-1]):
            if a != b:
                break
            common += 1
        cached = self.cache.get_seq_length()
        if common == 0 and cached:
            self.cache = DynamicCache(config=self.llm.model.config)
        elif common < cached:
            self.cache.crop(common - cached)  # negative: drop that many tokens from the end
        return common

    def send(self, user_text: str, on_text: Callable[[str], None] | None = None, **generation_kwargs: Any) -> TurnResult:
        """Add a user turn, generate the reply (streamed to `on_text`), add it to the history."""
        self.messages.append({"role": "user", "content": user_text})
        ids = self._render()
        context = getattr(self.llm.model.config, "max_position_embeddings", None)
        kwargs = {**self.generation_kwargs, **generation_kwargs}
        if generation_kwargs.get("temperature") == 0 or generation_kwargs.get("do_sample") is False:
            # Greedy for this turn: the session's sampling settings would only draw warnings.
            kwargs.update(do_sample=False, temperature=None, top_p=None)
        kwargs.pop("stop", None)  # a chat turn ends at the model's end-of-turn token
        kwargs.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if context and len(ids) + kwargs["max_new_tokens"] > context:
            self.messages.pop()
            raise ConfigError(
                f"the conversation ({len(ids)} tokens) + max_new_tokens={kwargs['max_new_tokens']} no longer fits "
                f"the model's context of {context} tokens; /reset to start over"
            )
        common = self._reuse_cache(ids)
        self.stop_flag.clear()
        streamer = _CallbackStreamer(self.tokenizer, on_text) if on_text else None
        start = time.perf_counter()
        out = self.llm.generate(ids, cache=self.cache, stopping_criteria=StoppingCriteriaList([self.stop_flag]),
                                streamer=streamer, **kwargs)
        seconds = time.perf_counter() - start
        new = out[0, len(ids) :].tolist()
        self.cached_ids = out[0].tolist()[: self.cache.get_seq_length()]
        text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": text})
        return TurnResult(text, len(new), len(ids) - common, seconds, self.stop_flag.is_set)
