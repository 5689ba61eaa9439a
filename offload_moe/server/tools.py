"""Function calling: OpenAI `tools` in, `tool_calls` out.

The model is told about the tools by its own chat template when the template takes `tools`
(Qwen, Hermes, Llama 3.1, Mistral templates do); otherwise by a system message describing them
and the convention below. Either way a call is read back from the reply in the convention most
templates teach: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes, Qwen2.5 and
Qwen3); a reply that is one bare JSON object with "name" and "arguments" (or "parameters", as
Llama 3.1 writes it) naming an offered tool counts too.

`tool_choice`: "auto" (default), "none" (tools not offered), "required" or {"type": "function",
"function": {"name": N}}. A model cannot be constrained token by token here, so "required" and a
named function are honoured by starting the reply with the call's opening: the reply then always
carries a call (its arguments are what the model wrote, which may not be valid JSON, as
OpenAI's own `arguments` strings may not be).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from offload_moe.server.protocol import bad_param
from offload_moe.stop_strings import stop_prefix_length

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.S)


@dataclass(frozen=True)
class ToolRequest:
    """The checked `tools` and `tool_choice` of a request. forced: the function name a reply must
    call ("" for any offered one), or None."""

    tools: list[dict[str, Any]]
    forced: str | None = None

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    def reply_prefix(self) -> str:
        """Text the reply starts with so that it calls the forced function."""
        if self.forced is None:
            return ""
        if self.forced == "":
            return OPEN + "\n"
        return OPEN + "\n" + '{"name": ' + json.dumps(self.forced) + ', "arguments": '


def _check_tool(tool: Any, i: int) -> dict[str, Any]:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise bad_param(where, 'must be {"type": "function", "function": {"name": ..., "parameters": {...}}}')
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise bad_param(f"{where}.function.name", f"must be 1-64 letters, digits, _ . or -, not {name!r}")
    if not isinstance(function.get("parameters", {}), dict):
        raise bad_param(f"{where}.function.parameters", "must be a JSON Schema object")
    return {"type": "function", "function": {k: function[k] for k in ("name", "description", "parameters")
                                             if k in function}}


def checked_tools(body: dict) -> ToolRequest | None:
    """`tools` and `tool_choice` checked, or None when the request offers no tools."""
    tools, choice = body.get("tools"), body.get("tool_choice", "auto")
    if tools in (None, []):
        if choice not in (None, "none", "auto"):
            raise bad_param("tool_choice", f"{choice!r} needs tools")
        return None
    if not isinstance(tools, list):
        raise bad_param("tools", "must be a list of function tools")
    checked = [_check_tool(t, i) for i, t in enumerate(tools)]
    if choice in (None, "auto"):
        return ToolRequest(checked)
    if choice == "none":
        return None
    if choice == "required":
        return ToolRequest(checked, forced="")
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise bad_param("tool_choice", f'must be "auto", "none", "required" or a named function, not {choice!r}')
    if name not in [t["function"]["name"] for t in checked]:
        raise bad_param("tool_choice", f"names the function {name!r}, which is not among the tools")
    return ToolRequest(checked, forced=name)


def template_takes_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    text = template if isinstance(template, str) else " ".join(map(str, dict(template).values()))
    return "tools" in text


def system_prompt(request: ToolRequest) -> str:
    """The tools described for a template that cannot take them."""
    lines = ["You can call these functions. To call one, reply with exactly",
             f'{OPEN}{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}{CLOSE}',
             "and nothing else. The functions, as JSON:"]
    return "\n".join(lines + [json.dumps(t["function"], ensure_ascii=False) for t in request.tools])


def _parse_arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def template_messages(messages: list[dict[str, Any]], request: ToolRequest | None,
                      native: bool) -> list[dict[str, Any]]:
    """Messages for the chat template: assistant tool calls and tool results in transformers'
    format when the template takes tools, else written out in the <tool_call> convention."""
    out = []
    for m in messages:
        calls = m.get("tool_calls") or []
        if native:
            entry = {"role": m["role"], "content": m["content"]}
            if calls:
                entry["tool_calls"] = [{"type": "function", "function": {
                    "name": c["function"]["name"], "arguments": _parse_arguments(c["function"]["arguments"])}}
                    for c in calls]
            if m["role"] == "tool" and m.get("tool_call_id"):
                entry["tool_call_id"] = m["tool_call_id"]
            out.append(entry)
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            written = "".join(f'{OPEN}{json.dumps({"name": c["function"]["name"], "arguments": _parse_arguments(c["function"]["arguments"])}, ensure_ascii=False)}{CLOSE}'
                              for c in calls)
            out.append({"role": m["role"], "content": m["content"] + written})
    if request is not None and not native:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + system_prompt(request)}
        else:
            out.insert(0, {"role": "system", "content": system_prompt(request)})
    return out


def _call(name: str, arguments: Any) -> dict[str, Any]:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": text}}


def _from_json(text: str, names: list[str]) -> dict[str, Any] | None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    return _call(obj["name"], obj.get("arguments", obj.get("parameters", {})))


def _forced_call(request: ToolRequest, body: str) -> dict[str, Any]:
    """The call of a reply that was started as a call of request.forced (see reply_prefix)."""
    if request.forced:
        arguments = body.removesuffix("}").strip() if body.rstrip().endswith("}}") else body.strip()
        return _call(request.forced, _parse_arguments(arguments))
    parsed = _from_json(body, request.names)
    return parsed or _call(request.names[0], body)


def parse_reply(text: str, request: ToolRequest) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a reply (`text` includes the forced prefix, if any)."""
    if request.forced is not None:
        body = text[len(request.reply_prefix()):]
        body = body.split(CLOSE, 1)[0]
        return None, [_forced_call(request, body)]
    calls = []
    for match in _CALL.finditer(text):
        call = _from_json(match.group(1), request.names)
        if call is not None:
            calls.append(call)
    if calls:
        content = _CALL.sub("", text).strip()
        return content or None, calls
    bare = _from_json(text.strip(), request.names)
    if bare is not None:
        return None, [bare]
    return text, []


class ToolStream:
    """Streams a reply's content while it cannot be a call; once it may be one (it opens with
    <tool_call> or a JSON object, or the call was forced), holds the rest for parse_reply."""

    def __init__(self, request: ToolRequest):
        self.request = request
        self.text = request.reply_prefix()
        self.emitted = len(self.text)
        self.held = request.forced is not None

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.held:
            return ""
        if self.text.lstrip().startswith("{") or OPEN in self.text:
            self.held = True
            return ""
        safe = len(self.text) - stop_prefix_length(self.text, [OPEN])
        out, self.emitted = self.text[self.emitted:safe], max(self.emitted, safe)
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content not yet streamed, tool_calls)."""
        content, calls = parse_reply(self.text, self.request)
        if not calls:
            return self.text[self.emitted:], []
        shown = self.text[len(self.request.reply_prefix()):self.emitted]
        rest = (content or "")[len(shown):] if (content or "").startswith(shown) else ""
        return rest, calls
