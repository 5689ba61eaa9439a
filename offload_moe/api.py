"""The Python API: `load()` a checkpoint and use the OffloadedModel it returns.

>>> import offload_moe
>>> llm = offload_moe.load("path/to/Mixtral-8x7B-Instruct-v0.1", slots_per_layer=4)  # doctest: +SKIP
>>> llm.generate("The capital of France is", max_new_tokens=20)  # doctest: +SKIP
>>> llm.stats()["total"]["hit_rate"]  # doctest: +SKIP
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from offload_moe.checkpoint.reader import Checkpoint
from offload_moe.config import DEFAULT_MAX_NEW_TOKENS, OffloadConfig, resolve_device, resolve_dtype
from offload_moe.errors import CheckpointError, ConfigError
from offload_moe.loader import Runtime, load_offloaded
from offload_moe.options import DEFAULT_DENSE_KERNELS, GENERATION_KEYWORDS, check_keyword, check_output_file
from offload_moe.planning.budget import DEFAULT_CONTEXT
from offload_moe.quant.formats import parse_format
from offload_moe.runtime.cache import CacheStats
from offload_moe.runtime.policies import DEFAULT_POLICY
from offload_moe.stop_strings import cut_at_stop, stop_list, stop_prefix_length
from offload_moe.units import parse_bytes

if TYPE_CHECKING:
    from offload_moe.chat import ChatSession



class OffloadedModel:
    """A transformers causal LM (or text-to-text encoder-decoder model: Switch Transformers) whose
    experts are served from a host store through a device cache.

    `.model` is the transformers model (its own `generate()` works), `.tokenizer` its tokenizer
    (None if the checkpoint has none).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, runtime: Runtime, config: OffloadConfig, path: Path):
        self.model = model
        self.tokenizer = tokenizer
        self.runtime = runtime
        self.config = config
        self.path = path
        self._closed = False

    @property
    def device(self) -> torch.device:
        return self.config.device

    def __repr__(self) -> str:
        slots = min((m.cache.num_slots for m in self.runtime.experts.values()), default=0)
        return (
            f"OffloadedModel({str(self.path)!r}, device={self.device}, dtype={self.config.dtype}, "
            f"slots_per_layer={slots}, policy={self.config.policy!r})"
        )

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise CheckpointError(f"{self.path}: the checkpoint has no tokenizer; pass token ids instead of text")
        return self.tokenizer

    def _check_context(self, prompt_tokens: int, max_new_tokens: int | None) -> None:
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context and prompt_tokens + (max_new_tokens or 0) > context:
            raise ConfigError(
                f"prompt of {prompt_tokens} tokens + max_new_tokens={max_new_tokens} is longer than the "
                f"model's context of {context} tokens; shorten the prompt or lower max_new_tokens"
            )

    def _hf_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Our extras -> transformers' generate() arguments, the sampling ones checked by the
        option table (offload_moe.options) as the CLI checks its flags: transformers would take a
        NaN temperature or a negative top_k and sample garbage, or fail deep inside generate()."""
        tokenizer = self.tokenizer
        _check_generation_keywords(kwargs)
        kwargs.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        stop = kwargs.pop("stop", None)
        if stop:
            kwargs["stop_strings"] = [stop] if isinstance(stop, str) else list(stop)
            kwargs["tokenizer"] = self._require_tokenizer()
        if tokenizer is not None and "pad_token_id" not in kwargs and self.model.generation_config.pad_token_id is None:
            kwargs["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return kwargs

    def _encode_batch(self, texts: list[str], src_lang: str | None = None) -> dict[str, torch.Tensor]:
        """Token ids of `texts`, left-padded for batched generation (in language `src_lang`, for
        a tokenizer with language codes); the tokenizer's own padding side, pad token and source
        language are put back afterwards (it is the caller's object too)."""
        tokenizer = self._require_tokenizer()
        side, pad = tokenizer.padding_side, tokenizer.pad_token
        source = tokenizer.src_lang if src_lang is not None else None
        try:
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            if src_lang is not None:
                tokenizer.src_lang = src_lang  # NLLB: the source starts with its language code
            return tokenizer(texts, return_tensors="pt", padding=True).to(self.device)
        finally:
            tokenizer.padding_side = side
            tokenizer.pad_token = pad
            if source is not None:
                tokenizer.src_lang = source

    def _languages(self, kwargs: dict[str, Any]) -> str | None:
        """Take `src_lang` / `tgt_lang` out of generate()'s keywords, each checked to be one of the
        tokenizer's language codes (NLLB-MoE: eng_Latn, deu_Latn, ...): the target's id becomes
        `forced_bos_token_id` (the first generated token); the source's code is returned, for
        the encoding."""
        src, tgt = kwargs.pop("src_lang", None), kwargs.pop("tgt_lang", None)
        for name, code in (("src_lang", src), ("tgt_lang", tgt)):
            if code is None:
                continue
            check_keyword(name, code)
            codes = language_codes(self.tokenizer)
            if not codes:
                raise ConfigError(f"{name}={code!r}: {self.path} has no language codes in its tokenizer (a "
                                  "translation model's, such as NLLB-MoE's eng_Latn, deu_Latn); leave it out")
            if code not in codes:
                shown = ", ".join(sorted(codes)[:8]) + (", ..." if len(codes) > 8 else "")
                raise ConfigError(f"{name}={code!r} is not one of the tokenizer's language codes ({shown}: "
                                  f"{len(codes)} in all)")
        if tgt is not None:
            kwargs["forced_bos_token_id"] = self.tokenizer.convert_tokens_to_ids(tgt)
        return src

    @torch.no_grad()
    def generate(
        self, prompt: str | list[str] | list[int] | torch.Tensor, **generation_kwargs: Any
    ) -> str | list[str] | torch.Tensor:
        """Continue `prompt` as transformers' generate() would.

        Text in, new text out (a list of strings gives a list of replies, batched with left
        padding); token ids in ([T] or [B, T]), ids out (prompt plus continuation, as
        transformers returns them). Takes transformers' generation arguments
        (`max_new_tokens` (default 128), `do_sample`, `temperature`, `top_p`, `top_k`,
        `repetition_penalty`, `streamer`, ...) plus `stop`: a string or list of strings that
        ends generation; replies are cut before it. A translation model with language codes
        (NLLB-MoE) also takes `src_lang` (the prompt's language) and `tgt_lang` (the reply's).

        >>> llm.generate("The capital of France is", max_new_tokens=20)  # doctest: +SKIP
        ' Paris. It is ...'
        >>> llm.generate(["Hi", "Tell me a joke"], do_sample=True, temperature=0.7, stop="\\n")  # doctest: +SKIP
        """
        stop = generation_kwargs.get("stop")
        kwargs = dict(generation_kwargs)
        src_lang = self._languages(kwargs)
        kwargs = self._hf_kwargs(kwargs)
        if self.runtime.recorder is not None:
            self.runtime.recorder.new_sequence()
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
            inputs = self._encode_batch(texts, src_lang)
            self._check_context(inputs["input_ids"].shape[1], kwargs["max_new_tokens"])
            out = self.model.generate(**inputs, **kwargs)
            new = self._new_tokens(out, inputs["input_ids"].shape[1])
            replies = [cut_at_stop(t, stop) for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
            return replies[0] if isinstance(prompt, str) else replies
        if src_lang is not None:
            raise ConfigError(f"src_lang={src_lang!r} applies to a text prompt; token ids already hold the source "
                              "language code")
        ids = self.token_ids(prompt)
        self._check_context(ids.shape[1], kwargs["max_new_tokens"])
        return self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)

    @property
    def is_encoder_decoder(self) -> bool:
        """Text to text (Switch Transformers): the prompt is the encoder's source, and generate()
        returns the decoder's tokens only."""
        return bool(getattr(self.model.config, "is_encoder_decoder", False))

    def _new_tokens(self, out: torch.Tensor, prompt_tokens: int) -> torch.Tensor:
        """The generated tokens of generate()'s output: after the prompt for a causal LM; after
        the decoder's start token for an encoder-decoder model (its output holds no prompt)."""
        return out[:, 1:] if self.is_encoder_decoder else out[:, prompt_tokens:]

    def _refuse_chat(self, what: str) -> None:
        if self.is_encoder_decoder:
            raise ConfigError(f"{self.path}: {what} needs a decoder-only chat model; this is an encoder-decoder "
                              f"({self.model.config.model_type}) text-to-text model: use generate(prompt)")

    def token_ids(self, prompt: Any) -> torch.Tensor:
        """Token ids `prompt` ([T] or [B, T]) as a [B, T] tensor on the device, checked here: an id
        outside the vocabulary would otherwise be an IndexError deep inside the embedding."""
        try:
            ids = torch.as_tensor(prompt)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise ConfigError(f"prompt: neither text nor token ids ([T] or [B, T] integers): {exc}") from None
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.numel() == 0:
            raise ConfigError(
                f"prompt: token ids must be [T] or [B, T] with at least one token, not shape {list(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ConfigError(f"prompt: token ids must be integers, not {ids.dtype}")
        vocab = self.model.get_input_embeddings().num_embeddings
        bad = ((ids < 0) | (ids >= vocab)).nonzero()
        if len(bad):
            row, col = (int(i) for i in bad[0])
            raise ConfigError(f"prompt: token id {int(ids[row, col])} (row {row}, position {col}) is outside the "
                              f"vocabulary of {vocab} tokens (ids 0 to {vocab - 1})")
        return ids.to(self.device, torch.long)

    def stream(self, prompt: str, **generation_kwargs: Any) -> Iterator[str]:
        """Yield the reply to `prompt` piece by piece as it is generated; the pieces join to
        exactly what `generate(prompt, ...)` returns (with `stop`, text that could be the start
        of a stop string is held back until it is known not to be).

        >>> for piece in llm.stream("Write a haiku about RAM", max_new_tokens=40):  # doctest: +SKIP
        ...     print(piece, end="", flush=True)
        """
        from transformers import TextIteratorStreamer

        _check_generation_keywords(dict(generation_kwargs))  # refused here, not in the worker thread
        self._languages(dict(generation_kwargs))
        streamer = TextIteratorStreamer(self._require_tokenizer(), skip_prompt=True, skip_special_tokens=True)
        results: list[Any] = []

        def run() -> None:
            try:
                results.append(self.generate(prompt, streamer=streamer, **generation_kwargs))
            except BaseException as exc:  # re-raised in the caller's thread
                results.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        stops = stop_list(generation_kwargs.get("stop"))
        text, emitted = "", 0
        for piece in streamer:
            cut = cut_at_stop(text + piece, stops)
            stopped, text = cut != text + piece, cut
            safe = len(text) if stopped else len(text) - stop_prefix_length(text, stops)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
            if stopped:
                break
        worker.join()
        if isinstance(results[0], BaseException):
            raise results[0]
        reply = results[0]  # the streamer may hold back the last piece; generate()'s reply is whole
        if len(reply) > emitted and reply.startswith(text[:emitted]):
            yield reply[emitted:]

    def chat(self, messages: list[dict[str, str]], **generation_kwargs: Any) -> str:
        """Reply to an OpenAI-style conversation, through the model's chat template.

        >>> llm.chat([{"role": "user", "content": "What is the capital of France?"}])  # doctest: +SKIP
        'The capital of France is Paris.'
        """
        _check_generation_keywords(dict(generation_kwargs))  # before the template is rendered
        self._refuse_chat("chat()")
        from offload_moe.chat import render_chat_template  # chat subclasses transformers' classes: on use

        tokenizer = self._require_tokenizer()
        ids = render_chat_template(tokenizer, messages, self.path, add_generation_prompt=True, return_tensors="pt",
                                   return_dict=True)
        ids = ids["input_ids"].to(self.device)
        out = self.generate(ids, **generation_kwargs)
        reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        return cut_at_stop(reply, generation_kwargs.get("stop")).strip()

    def chat_session(self, system_prompt: str | None = None, **generation_kwargs: Any) -> ChatSession:
        """A multi-turn chat that keeps its KV cache between turns (see offload_moe.chat)."""
        from offload_moe.chat import ChatSession  # it subclasses transformers' classes: imported on use

        _check_generation_keywords(dict(generation_kwargs))  # at the start, not at the first turn
        self._refuse_chat("a chat session")
        return ChatSession(self, system_prompt=system_prompt, **generation_kwargs)

    def stats(self) -> dict[str, Any]:
        """Expert cache counters: per layer and in total (hits, misses, hit_rate, bytes_copied)."""
        modules = sorted(self.runtime.experts.items())
        total = sum((module.cache.stats for _, module in modules), CacheStats())
        return {
            "layers": [{"layer": layer, "slots": m.cache.num_slots, **m.cache.stats.as_dict()} for layer, m in modules],
            "total": total.as_dict(),
            "device_expert_bytes": self.runtime.device_expert_bytes,
            "host_expert_bytes": self.runtime.store.nbytes,
            "hybrid": None if self.runtime.hybrid is None else self.runtime.hybrid.as_dict(),
        }

    def reset_stats(self) -> None:
        """Zero the cache counters (the cache contents stay)."""
        for module in self.runtime.experts.values():
            module.cache.stats = CacheStats()

    def close(self) -> None:
        """Release the transfer engine, the routing recorder's file, and the host store and
        slots (pinned memory included). The model cannot generate afterwards."""
        if not self._closed:
            self._closed = True
            self.runtime.close()

    def __enter__(self) -> "OffloadedModel":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def language_codes(tokenizer: Any) -> frozenset[str]:
    """The language codes of a translation tokenizer (one with `src_lang`, as NLLB's: its extra
    special tokens, eng_Latn ...); empty for any other tokenizer, or none."""
    if tokenizer is None or not hasattr(tokenizer, "src_lang"):
        return frozenset()
    extras = getattr(tokenizer, "extra_special_tokens", None) or getattr(tokenizer, "additional_special_tokens", None) or []
    extras = extras.values() if isinstance(extras, dict) else extras
    return frozenset(str(t) for t in extras)


def _check_generation_keywords(kwargs: dict[str, Any]) -> None:
    """Refuse a bad sampling keyword before any token is generated, naming keyword and value."""
    for name in GENERATION_KEYWORDS:
        if name in kwargs:
            kwargs[name] = check_keyword(name, kwargs[name])
    stop = kwargs.get("stop")
    if stop is not None and not (isinstance(stop, str) or
                                 (isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop))):
        raise ConfigError(f"stop={stop!r} must be a string or a list of strings")
    if kwargs.get("do_sample") and kwargs.get("temperature") == 0:
        raise ConfigError("temperature=0 with do_sample=True: sampling needs a temperature above 0 "
                          "(for greedy decoding pass do_sample=False)")


def load(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    slots_per_layer: int | None = None,
    gpu_memory: str | int | None = None,
    context: int = DEFAULT_CONTEXT,
    policy: str = DEFAULT_POLICY,
    prefetch_top_n: int | None = None,
    hybrid: bool | None = None,
    experts: str | None = None,
    attention: str | None = None,
    dense_kernels: str = DEFAULT_DENSE_KERNELS,
    optimize: bool = False,
    record_routing: str | Path | None = None,
    pin_memory: bool = True,
    cpu_memory: str | int | None = None,
    progress: bool = True,
) -> OffloadedModel:
    """Load a Hugging Face MoE checkpoint directory with its experts offloaded.

    device: "cuda", "cpu" or None (CUDA when available). dtype: compute dtype of the
    non-expert weights and unquantized experts (default: the checkpoint's, else float32).
    slots_per_layer: device slots per MoE layer (None: all experts fit). gpu_memory: a
    device budget ("22GiB") to plan slots_per_layer from instead, keeping room for a KV cache
    of `context` tokens. policy: eviction policy: "markov" (default; learns which experts
    follow which, weighted by gate probability), "lfu-decay", "lru", "lru2", "arc".
    prefetch_top_n: next-layer experts prefetched per call (None: the model's
    top-k on CUDA, off on the CPU; 0: off).
    hybrid: compute a missing expert on the CPU when that beats copying it (None: on for CUDA,
    off for CPU devices). record_routing: a path to write every call's routing to, as JSON
    lines (the format of shared/traces). pin_memory: pin the host store when the device is CUDA.
    cpu_memory: host-RAM budget for the expert store ("8GiB"); experts that do not fit are
    memory-mapped from a store file on disk, written once (inside a converted directory, else
    under the cache) and reused. On the CPU the slots are RAM too: then slots_per_layer
    defaults to what fits the budget (at least 1) and misses are computed straight from the
    mapped store. experts: "hqq4", "hqq3", "hqq2", "hqq2g64", "nf4" quantize while loading,
    "bf16"/"fp16" keep them 16-bit, "gptq" serves a GPTQ checkpoint. None (default): the
    checkpoint's own experts, exact, when they fit in 80% of the free host RAM; else hqq4, with a
    warning (with an explicit cpu_memory, what does not fit is served from disk instead).
    attention: also quantize the attention projections ("hqq4", ...; "q8": 8-bit, CPU only).
    dense_kernels: on the CPU, for 16-bit models, "fast" runs attention projections, norms,
    routers, shared experts and lm_head on offload_moe's kernels and attention math in fp32 (close to
    transformers, not bit-exact); "torch" keeps transformers' own (bit-exact); "auto" (default)
    is fast when the experts or the attention are quantized, torch otherwise.

    >>> llm = load("path/to/Mixtral-8x7B-Instruct-v0.1", device="cuda", slots_per_layer=4)  # doctest: +SKIP
    """
    path = Path(path).expanduser()
    if record_routing is not None:
        record_routing = check_output_file(record_routing, "record_routing")  # before the long load
    cfg = _offload_config(
        path, device=device, dtype=dtype, slots_per_layer=slots_per_layer, gpu_memory=gpu_memory, context=context,
        policy=policy, prefetch_top_n=prefetch_top_n, hybrid=hybrid, experts=experts, attention=attention,
        dense_kernels=dense_kernels, optimize=optimize, pin_memory=pin_memory, cpu_memory=cpu_memory,
    )
    tokenizer = _load_tokenizer(path)  # before the long load: what only transformers can refuse
    model, runtime = load_offloaded(path, cfg, progress=progress, record_routing=record_routing)
    try:
        _load_generation_config(model, path)
    except BaseException:
        runtime.close()
        raise
    return OffloadedModel(model, tokenizer, runtime, cfg, path)


def _offload_config(path: Path, *, device, dtype, gpu_memory, cpu_memory, experts, **settings: Any) -> OffloadConfig:
    """load()'s arguments, checked, as an OffloadConfig; dtype defaults to the checkpoint's."""
    ckpt = Checkpoint(path)
    default_dtype = getattr(ckpt.load_config(), "dtype", None)
    if not isinstance(default_dtype, torch.dtype):
        try:
            default_dtype = resolve_dtype(default_dtype, torch.float32) if default_dtype else torch.float32
        except ConfigError as exc:
            raise ConfigError(f"{ckpt.config_path}: key 'dtype': {exc}") from None
    if experts is not None and experts != "gptq" and dtype is None:
        dense_dtype = parse_format(experts).dtype
        if dense_dtype is not None:
            dtype = dense_dtype  # unquantized experts in a named dtype: compute in it too
    return OffloadConfig(
        device=resolve_device(device),
        dtype=resolve_dtype(dtype, default_dtype),
        gpu_memory=None if gpu_memory is None else parse_bytes(gpu_memory, "gpu_memory"),
        cpu_memory=None if cpu_memory is None else parse_bytes(cpu_memory, "cpu_memory"),
        experts=experts,
        **settings,
    )


def _load_generation_config(model: nn.Module, path: Path) -> None:
    """generation_config.json, if any, as the model's generation config. Its values were checked
    with the config (checkpoint.config_check); what transformers still refuses names the file."""
    from transformers import GenerationConfig  # transformers' top level is slow to import: only when loading

    from offload_moe.errors import CheckpointError

    file = path / "generation_config.json"
    if file.is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - its validation raises ValueError, TypeError, ...
            raise CheckpointError(f"{file}: cannot be used as a generation config ({_first_line(exc)})") from None


def _load_tokenizer(path: Path) -> Any:
    """The checkpoint's tokenizer, or None if it has none. Its JSON files, tokenizer_class and
    chat templates were checked with the config (checkpoint.config_check); what transformers or
    tokenizers still raise names the file. Checkpoint code is never run."""
    from transformers import AutoTokenizer

    from offload_moe.errors import CheckpointError

    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    present = [path / name for name in names if (path / name).is_file()]
    if not present:
        return None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises bare Exception for a malformed file
        raise CheckpointError(f"{present[0]}: the tokenizer cannot be loaded ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    """`Type: first line of the message`: third-party messages run to many lines."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
