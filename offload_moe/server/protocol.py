"""The OpenAI HTTP API's request checks, response objects and errors, without the web framework.

Every bad field is refused by one APIError naming the parameter and the value, with the status
and body OpenAI's API and llama.cpp's server use: `{"error": {"message", "type", "param",
"code"}}`. Fields this server does not implement (logprobs, n > 1, audio, ...) are refused by
name rather than ignored, so a client never silently gets something other than it asked for;
fields that change nothing here (user, metadata, ...) are accepted.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from offload_moe.options import SEED_MAX, SEED_MIN
from offload_moe.server.sampling import SamplingParams

# Sampling when a request leaves it out: ollama's and `offload-moe chat`'s, not OpenAI's
# temperature 1, which makes small local models ramble.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.9
MAX_STOP_STRINGS = 4
ROLES = ("system", "developer", "user", "assistant", "tool")
# Fields this server does not implement, each with the values that ask for nothing (accepted).
_UNSUPPORTED = {"functions": (), "function_call": ("none", "auto"),
                "logprobs": (False,), "top_logprobs": (0,), "logit_bias": (), "audio": (), "modalities": (["text"],),
                "prediction": (), "echo": (False,), "suffix": ("",), "best_of": (1,)}


class APIError(Exception):
    """An error answered as OpenAI's JSON error body with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_param(param: str, message: str, code: str = "invalid_value") -> APIError:
    """A 400 naming the request field `param`."""
    return APIError(400, f"{param}: {message}", param=param, code=code)


def _number(body: dict, name: str, low: float, high: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_param(name, f"must be a number, not {value!r}", "invalid_type")
    if not low <= value <= high:
        raise bad_param(name, f"{value!r} is out of range: it must be between {low:g} and {high:g}")
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise bad_param(name, f"must be an integer, not {value!r}", "invalid_type")
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f" and at most {high}"
        raise bad_param(name, f"{value!r} is out of range: it must be at least {low}{upper}")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_param("stop", f"must be a string or a list of strings, not {stop!r}", "invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_param("stop", f"at most {MAX_STOP_STRINGS} stop strings, not {len(stops)}")
    return tuple(s for s in stops if s)


def _refuse_unsupported(body: dict) -> None:
    for name, harmless in _UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value not in ([], {}) and value not in harmless:
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    if body.get("n", 1) != 1:
        raise bad_param("n", f"only n=1 is supported, not {body['n']!r}", "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise APIError(400, f"response_format {fmt!r} is not supported: only {{'type': 'text'}}",
                       param="response_format", code="unsupported_parameter")


@dataclass(frozen=True)
class Generation:
    """A checked request: its prompt tokens, sampling and streaming settings."""

    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_param("stream", f"must be true or false, not {stream!r}", "invalid_type")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise bad_param("stream_options", f"must be an object like {{'include_usage': true}}, not {options!r}",
                   "invalid_type")
    return stream, bool(options.get("include_usage", False))


def checked_generation(body: dict, prompt_ids: list[int], context: int, eos: frozenset[int],
                       prompt_param: str) -> Generation:
    """The sampling fields of a chat or completions request, checked against the model's context."""
    _refuse_unsupported(body)
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    room = context - len(prompt_ids)
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = "" if max_tokens is None else f" + max_tokens={max_tokens}"
        raise APIError(400, f"the prompt is {len(prompt_ids)} tokens{asked}, more than the model's context of "
                       f"{context} tokens; shorten the prompt or lower max_tokens", param=prompt_param,
                       code="context_length_exceeded")
    stream, include_usage = _stream_flags(body)
    seed = _integer(body, "seed", SEED_MIN, SEED_MAX)
    top_p = _number(body, "top_p", 0.0, 1.0, DEFAULT_TOP_P)
    if top_p == 0.0:
        raise bad_param("top_p", "0 is out of range: it must be above 0 and at most 1")
    params = SamplingParams(
        max_new_tokens=room if max_tokens is None else max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0, DEFAULT_TEMPERATURE),
        top_p=top_p,
        top_k=_integer(body, "top_k", 0) or 0,
        seed=None if seed is None else seed % 2**64,
        stop=_stop(body),
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0, 0.0),
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0, 0.0),
        eos_token_ids=eos,
    )
    return Generation(prompt_ids, params, stream, include_usage)


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_param(f"{where}[{i}]", f"only text content parts are supported, not {kind!r}",
                           "unsupported_content")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_param(where, f"must be a string or a list of text parts, not {content!r}", "invalid_type")


def _tool_calls(message: dict, where: str) -> list[dict[str, Any]]:
    calls = message.get("tool_calls") or []
    if message.get("role") != "assistant" and calls:
        raise bad_param(f"{where}.tool_calls", "only assistant messages carry tool calls")
    if not isinstance(calls, list):
        raise bad_param(f"{where}.tool_calls", "must be a list", "invalid_type")
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not isinstance(function.get("arguments", ""), (str, dict)):
            raise bad_param(f"{where}.tool_calls[{i}]", 'must be {"id", "type": "function", "function": {"name", '
                       '"arguments"}}', "invalid_type")
    return calls


def checked_messages(body: dict) -> list[dict[str, Any]]:
    """`messages` as [{"role", "content"}] with text content ("developer" is a system turn);
    assistant tool calls and tool results keep `tool_calls` / `tool_call_id`."""
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "messages: a chat completion needs a list of messages", param="messages",
                       code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad_param("messages", f"must be a non-empty list of messages, not {messages!r}"[:300], "invalid_type")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_param(where, f"must be an object with role and content, not {message!r}"[:300], "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise bad_param(f"{where}.role", f"unknown role {role!r}; use one of {', '.join(ROLES)}", "invalid_role")
        calls = _tool_calls(message, where)
        content = message.get("content")
        text = "" if content is None and calls else _content_text(content, f"{where}.content")
        entry: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": text}
        if calls:
            entry["tool_calls"] = calls
        if role == "tool" and isinstance(message.get("tool_call_id"), str):
            entry["tool_call_id"] = message["tool_call_id"]
        out.append(entry)
    return out


def checked_prompt(body: dict) -> str | list[int]:
    """`prompt` of /v1/completions: a string, a list of one string, or a list of token ids."""
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "prompt: a completion needs a prompt", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise bad_param("prompt", "must be a string or a list of token ids (one prompt per request)", "invalid_type")


def check_model(body: dict, model_id: str) -> None:
    model = body.get("model")
    if model is not None and model != model_id:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_id!r}", param="model",
                       code="model_not_found")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class Reply:
    """The fixed parts of one reply's response objects (one id for all its chunks)."""

    id: str
    model: str
    chat: bool
    created: int = 0

    def __post_init__(self):
        self.created = self.created or int(time.time())

    def _object(self, stream: bool) -> str:
        if self.chat:
            return "chat.completion.chunk" if stream else "chat.completion"
        return "text_completion"

    def _envelope(self, choices: list, stream: bool) -> dict[str, Any]:
        return {"id": self.id, "object": self._object(stream), "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False,
              tool_calls: list | None = None) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(tool_calls)]
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._envelope([choice], stream=True)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {**self._envelope([], stream=True), "usage": usage(prompt_tokens, completion_tokens)}

    def whole(self, text: str | None, finish_reason: str, prompt_tokens: int, completion_tokens: int,
              tool_calls: list | None = None) -> dict[str, Any]:
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if tool_calls:
                message["tool_calls"] = tool_calls
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._envelope([choice], stream=False), "usage": usage(prompt_tokens, completion_tokens)}
