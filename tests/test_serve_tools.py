"""Function calling in `offload-moe serve`: tools described to the model, calls read back from
its reply (server/tools.py), whole and streamed, through a real server and the openai client."""

from __future__ import annotations

import json

import pytest
from serve_util import served  # noqa: F401  (fixture)

from offload_moe.server.protocol import APIError
from offload_moe.server.tools import ToolRequest, ToolStream, checked_tools, parse_reply, template_messages

openai = pytest.importorskip("openai")

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def test_calls_are_read_back_in_the_templates_conventions():
    request = checked_tools({"tools": [WEATHER, TIME]})
    content, calls = parse_reply('Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                                 '</tool_call><tool_call>{"name": "get_time", "arguments": {}}</tool_call>', request)
    assert content == "Let me look." and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    _, bare = parse_reply('{"name": "get_weather", "parameters": {"city": "Rome"}}', request)  # Llama 3.1's
    assert json.loads(bare[0]["function"]["arguments"]) == {"city": "Rome"}
    assert parse_reply('{"name": "rm_rf", "arguments": {}}', request) == ('{"name": "rm_rf", "arguments": {}}', [])
    assert parse_reply("Just text.", request) == ("Just text.", [])


def test_forced_calls_and_bad_tools():
    named = checked_tools({"tools": [WEATHER, TIME], "tool_choice": {"type": "function",
                                                                     "function": {"name": "get_time"}}})
    assert named.forced == "get_time"
    _, calls = parse_reply(named.reply_prefix() + '{"tz": "UTC"}}</tool_call>', named)
    assert calls[0]["function"] == {"name": "get_time", "arguments": '{"tz": "UTC"}'}
    required = checked_tools({"tools": [WEATHER], "tool_choice": "required"})
    _, calls = parse_reply(required.reply_prefix() + '{"name": "get_weather", "arguments": {"city": "Lima"}}',
                           required)
    assert calls[0]["function"]["name"] == "get_weather"
    assert checked_tools({"tools": [WEATHER], "tool_choice": "none"}) is None
    for body, param in [({"tools": [{"type": "function"}]}, "tools[0]"),
                        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
                        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                         "tool_choice"),
                        ({"tool_choice": "required"}, "tool_choice")]:
        with pytest.raises(APIError) as err:
            checked_tools(body)
        assert err.value.status == 400 and err.value.param == param


def test_stream_holds_back_what_may_be_a_call():
    stream = ToolStream(ToolRequest([WEATHER]))
    assert stream.feed("Sure") == "Sure" and stream.feed(" <tool") == " "
    assert stream.feed('_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>') == ""
    rest, calls = stream.finish()
    assert rest == "" and calls[0]["function"]["name"] == "get_weather"
    plain = ToolStream(ToolRequest([WEATHER]))
    assert plain.feed("<to") == "" and plain.finish() == ("<to", [])


def test_history_with_calls_is_written_for_a_template_without_tools():
    history = [{"role": "user", "content": "Weather in Oslo?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    out = template_messages(history, ToolRequest([WEATHER]), native=False)
    assert out[0]["role"] == "system" and "get_weather" in out[0]["content"]
    assert out[2]["content"] == '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    assert out[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    native = template_messages(history, ToolRequest([WEATHER]), native=True)
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert native[2]["tool_call_id"] == "call_1"


def test_a_forced_call_through_the_openai_client(served):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=120)
    model = served.checkpoint.name
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER], tool_choice=choice,
                                           max_tokens=12, temperature=0)
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert isinstance(call.function.arguments, str)
    chunks = list(client.chat.completions.create(model=model, messages=messages, tools=[WEATHER],
                                                 tool_choice=choice, max_tokens=12, temperature=0, stream=True))
    streamed = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in streamed] == ["get_weather"]
    assert streamed[0].function.arguments == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    history = messages + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    answer = client.chat.completions.create(model=model, messages=history, tools=[WEATHER], max_tokens=6,
                                            temperature=0)
    assert answer.usage.completion_tokens >= 1 and answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
