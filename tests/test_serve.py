"""`offload-moe serve` against a real server on a free localhost port: the official openai
client, raw SSE framing, every bad input, concurrent clients, disconnects, /metrics, the queue.

Greedy replies are compared with the reply the same request gets alone: batching must never
change a token (offload_moe/server/engine.py says how)."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from serve_util import served, start_server  # noqa: F401  (served is a fixture)

from offload_moe.testing import make_tiny_checkpoint

openai = pytest.importorskip("openai")

PROMPTS = ["The cat sat on", "Numbers: one two", "Once upon a time", "Hello there, my friend", "zzz qqq",
           "abc def ghi jkl", "A B C D", "tiny models ramble"]


def _client(server, key="none"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def _chat(server, text, **extra):
    body = {"model": server.checkpoint.name, "messages": [{"role": "user", "content": text}], "max_tokens": 12,
            "temperature": 0, **extra}
    return server.post("/v1/chat/completions", body)


def _sse_events(server, path, body):
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        raw = response.read().decode()
    blocks = [b for b in raw.split("\n\n") if b]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), raw[:500]
    return [b[len("data: "):] for b in blocks]


def test_openai_client_chat_and_completions(served):
    client = _client(served)
    assert [m.id for m in client.models.list().data] == ["tiny-mixtral"]
    whole = client.chat.completions.create(model="tiny-mixtral", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=10, temperature=0)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 10
    tokenizer_ids = _template_ids(served, [{"role": "user", "content": "hi"}])
    assert whole.usage.prompt_tokens == len(tokenizer_ids)
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 10
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny-mixtral", messages=[{"role": "user", "content": "hi"}], max_tokens=10, temperature=0,
        stream=True) if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    text = client.completions.create(model="tiny-mixtral", prompt="hello", max_tokens=7, temperature=0)
    assert text.usage.completion_tokens == 7 and text.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-mixtral", prompt="hello", max_tokens=7, temperature=0, stream=True))
    assert streamed == text.choices[0].text


def _template_ids(server, messages):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(server.checkpoint, local_files_only=True)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]


def test_sse_framing(served):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    events = _sse_events(served, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    content = chunks[:-1]
    assert [c["choices"][0]["finish_reason"] for c in content][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])
    assert "content" in content[-1]["choices"][0]["delta"]  # the finish rides on the last content chunk
    whole = _chat(served, "hi", max_tokens=6)[1]["choices"][0]["message"]["content"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in content) == whole


def test_stop_string_ends_the_reply(served):
    whole = _chat(served, "stop test", max_tokens=20)[1]["choices"][0]["message"]["content"]
    stop = whole[5:7]
    status, body = _chat(served, "stop test", max_tokens=20, stop=[stop])
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["content"] == whole[: whole.index(stop)]
    assert body["usage"]["completion_tokens"] < 20


BAD_CHATS = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": "tiny-mixtral"}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 7}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ({"messages": [{"role": "user", "content": "hi " * 2000}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "messages"),
    ({"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "retrieval"}]}, 400, "tools[0]"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content[0]"),
]


def test_fields_that_ask_for_nothing_are_accepted(served):
    status, body = _chat(served, "hi", max_tokens=2, logprobs=False, logit_bias={}, tool_choice="none", user="u",
                         response_format={"type": "text"}, n=1, stream_options=None)
    assert status == 200 and body["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("body,status,param", BAD_CHATS)
def test_bad_requests_get_openai_errors(served, body, status, param):
    got, answer = served.post("/v1/chat/completions", body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert "Traceback" not in error["message"]
    assert served.get("/health")[0] == 200  # still serving


def test_completion_token_ids_outside_the_vocabulary(served):
    status, body = served.post("/v1/completions", {"prompt": [1, 5, 10**6], "max_tokens": 2})
    assert status == 400 and body["error"]["param"] == "prompt" and "vocabulary" in body["error"]["message"]
    status, body = served.post("/v1/completions", {"prompt": [1, 5, 9], "max_tokens": 2})
    assert status == 200 and body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_unknown_route_oversized_body_and_server_lives_on(served):
    status, body = served.get("/v1/nothing-here")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    status, body = served.post("/v1/chat/completions", b'{"messages": "' + b"x" * (5 * 2**20) + b'"}')
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert _chat(served, "still alive")[0] == 200


def test_concurrent_clients_get_their_own_greedy_replies(served):
    alone = {p: _chat(served, p, max_tokens=16)[1]["choices"][0]["message"]["content"] for p in PROMPTS}
    steps_before = _metric(served, "offload_moe_decode_steps_total")
    tokens_before = _metric(served, "offload_moe_completion_tokens_total")
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: _chat(served, p, max_tokens=16)[1], PROMPTS))
    assert [r["choices"][0]["message"]["content"] for r in together] == [alone[p] for p in PROMPTS]
    steps = _metric(served, "offload_moe_decode_steps_total") - steps_before
    tokens = _metric(served, "offload_moe_completion_tokens_total") - tokens_before
    assert tokens == sum(r["usage"]["completion_tokens"] for r in together)
    assert steps < tokens - len(PROMPTS)  # forwards were shared


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(served):
    alone = _chat(served, "sample me", temperature=1.0, seed=7, max_tokens=16)[1]["choices"][0]["message"]["content"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_chat, served, p, temperature=1.0, seed=7, max_tokens=16) for p in PROMPTS[:3]]
        seeded = _chat(served, "sample me", temperature=1.0, seed=7, max_tokens=16)
        [f.result() for f in futures]
    assert seeded[1]["choices"][0]["message"]["content"] == alone


def _metric(server, name, labels=None):
    from prometheus_client.parser import text_string_to_metric_families

    text = server.get("/metrics")[1].decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or all(sample.labels.get(k) == v for k, v in labels.items())):
                return sample.value
    raise AssertionError(f"{name} {labels} not in /metrics")


def test_metrics_parse_with_per_layer_cache_counters(served):
    _chat(served, "count me")
    assert _metric(served, "offload_moe_requests_total", {"endpoint": "/v1/chat/completions", "status": "200"}) >= 1
    assert _metric(served, "offload_moe_completion_tokens_total") >= 12
    for layer in ("0", "1", "total"):
        hits = _metric(served, "offload_moe_expert_cache_hits_total", {"layer": layer})
        misses = _metric(served, "offload_moe_expert_cache_misses_total", {"layer": layer})
        rate = _metric(served, "offload_moe_expert_cache_hit_rate", {"layer": layer})
        assert hits + misses > 0 and rate == pytest.approx(hits / (hits + misses))
        _metric(served, "offload_moe_expert_cache_bytes_copied_total", {"layer": layer})
        _metric(served, "offload_moe_expert_cache_prefetch_precision", {"layer": layer})
    for name in ("offload_moe_tokens_per_second", "offload_moe_queue_length", "offload_moe_prompt_tokens_total"):
        _metric(served, name)
    assert _metric(served, "offload_moe_prefill_seconds_total") > 0
    assert _metric(served, "offload_moe_decode_seconds_total") > 0


def test_disconnect_mid_stream_frees_the_place(served):
    before = _metric(served, "offload_moe_completion_tokens_total")
    body = json.dumps({"messages": [{"role": "user", "content": "long"}], "max_tokens": 400, "stream": True,
                       "temperature": 0}).encode()
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while received.count(b"data: ") < 3:
            received += sock.recv(4096)
    deadline = time.monotonic() + 30
    while _metric(served, "offload_moe_active_requests") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(served, "offload_moe_active_requests") == 0
    assert _metric(served, "offload_moe_completion_tokens_total") - before < 400


def test_bounded_load_loses_and_mixes_nothing(served):
    alone = {p: _chat(served, p, max_tokens=8)[1]["choices"][0]["message"]["content"] for p in PROMPTS[:4]}
    requests = PROMPTS[:4] * 5
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda p: _chat(served, p, max_tokens=8), requests))
    assert time.monotonic() - start < 240
    assert [status for status, _ in replies] == [200] * len(requests)
    assert [body["choices"][0]["message"]["content"] for _, body in replies] == [alone[p] for p in requests]


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve-small") / "tiny")


def test_api_key_is_required_on_api_routes(small_checkpoint):
    server = start_server(small_checkpoint, "--api-key", "s3cret")
    try:
        assert server.get("/health")[0] == 200 and server.get("/")[0] == 200  # public: the page asks for the key
        for path in ("/v1/models", "/metrics", "/v1/stats"):
            status, body = server.get(path)
            assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        assert server.get("/v1/models", {"Authorization": "Bearer wrong"})[0] == 401
        assert server.get("/v1/models", {"Authorization": "Bearer s3cret"})[0] == 200
        with pytest.raises(openai.AuthenticationError):
            _client(server, "wrong").models.list()
        reply = _client(server, "s3cret").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.usage.completion_tokens == 3
    finally:
        server.stop()


def test_full_queue_answers_429(small_checkpoint):
    server = start_server(small_checkpoint, "--max-batch", "1", "--max-queue", "1")
    try:
        long = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 300, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(server.post, "/v1/chat/completions", long) for _ in range(4)]
            statuses = sorted(f.result()[0] for f in futures)
        assert statuses.count(429) >= 1 and statuses.count(200) >= 2
        rejected = next(f.result()[1] for f in futures if f.result()[0] == 429)
        assert rejected["error"]["type"] == "rate_limit_error" and "queue" in rejected["error"]["message"]
        assert _chat(server, "after", max_tokens=2)[0] == 200
    finally:
        server.stop()


def test_cli_refuses_a_busy_port_in_one_line(small_checkpoint):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "offload_moe.cli", "serve", str(small_checkpoint), "--port",
                              str(port)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"--port {port}" in run.stderr.strip().splitlines()[-1]


def test_cli_serve_with_a_broken_checkpoint_exits_with_its_error(tmp_path):
    (tmp_path / "config.json").write_text("{broken")
    run = subprocess.run([sys.executable, "-m", "offload_moe.cli", "serve", str(tmp_path), "--port", "0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "config.json" in run.stderr.strip().splitlines()[-1]
