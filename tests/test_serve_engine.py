"""The server's batching engine without HTTP: replies under batching equal replies alone (fp32
and bf16, greedy and seeded), and equal generate(); joins and leaves keep every row's cache
right; families that cannot batch run one at a time; /health says 503 while loading."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
import uvicorn

import offload_moe
from offload_moe.errors import ConfigError
from offload_moe.server.app import ServerState, create_app
from offload_moe.server.engine import BatchEngine, Delta, Finished, QueueFullError
from offload_moe.server.sampling import SamplingParams
from offload_moe.server.serve import listen
from offload_moe.testing import make_tiny_checkpoint

PROMPTS = [[1, 5, 9, 33, 7], [1, 100, 200], [1, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51], [1, 7], [1, 300, 301, 302]]


class _Collector:
    def __init__(self, n):
        self.events = [[] for _ in range(n)]
        self.done = [threading.Event() for _ in range(n)]

    def deliver(self, i):
        def f(event):
            self.events[i].append(event)
            if isinstance(event, Finished):
                self.done[i].set()
        return f

    def wait(self):
        for d in self.done:
            assert d.wait(120)
        return ["".join(e.text for e in ev if isinstance(e, Delta)) for ev in self.events], [ev[-1] for ev in self.events]


def _run(engine, prompts, params):
    got = _Collector(len(prompts))
    for i, p in enumerate(prompts):
        engine.submit(p, params, got.deliver(i))
    return got.wait()


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def engine(request, tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("engine") / "ck", dtype=request.param)
    llm = offload_moe.load(path, device="cpu", slots_per_layer=3, progress=False)
    eng = BatchEngine(llm, max_batch=4)
    eng.start()
    yield eng
    eng.stop()
    llm.close()


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=24),
                                    SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.8, top_k=50, seed=3)],
                         ids=["greedy", "seeded"])
def test_batched_replies_equal_replies_alone(engine, params):
    alone = [_run(engine, [p], params)[0][0] for p in PROMPTS]
    together, finished = _run(engine, PROMPTS, params)  # 5 prompts, 4 places: one joins mid-decode
    assert together == alone
    assert [f.completion_tokens for f in finished] == [24] * len(PROMPTS)
    assert all(f.reason == "length" for f in finished)


def test_greedy_replies_equal_generate(engine):
    replies, _ = _run(engine, PROMPTS[:3], SamplingParams(max_new_tokens=16))
    tok = engine.tokenizer
    for prompt, reply in zip(PROMPTS[:3], replies):
        out = engine.llm.generate(torch.tensor(prompt), max_new_tokens=16, do_sample=False)
        assert tok.decode(out[0, len(prompt):], skip_special_tokens=True) == reply


def test_cancel_frees_the_place_and_eos_stops(engine):
    got = _Collector(2)
    handle = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=400), got.deliver(0))
    _run(engine, [PROMPTS[1]], SamplingParams(max_new_tokens=1))  # decoded beside the long one
    handle.cancel()
    assert got.done[0].wait(60)
    assert got.events[0][-1].reason == "cancelled" and got.events[0][-1].completion_tokens < 400
    first = int(engine.llm.generate(torch.tensor(PROMPTS[1]), max_new_tokens=1, do_sample=False)[0, -1])
    _, finished = _run(engine, [PROMPTS[1]], SamplingParams(max_new_tokens=10, eos_token_ids=frozenset([first])))
    assert finished[0].reason == "stop" and finished[0].completion_tokens == 1
    assert engine.active == 0


def test_queue_limit(tmp_path):
    llm = offload_moe.load(make_tiny_checkpoint(tmp_path / "ck"), device="cpu", progress=False)
    eng = BatchEngine(llm, max_batch=1, max_queue=0)  # not started: nothing leaves the queue
    with pytest.raises(QueueFullError, match="queue"):
        eng.submit([1, 2], SamplingParams(max_new_tokens=2), lambda e: None)
    llm.close()


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2", "deepseek_moe", "llama_moe", "dbrx"])
def test_other_families_batch_exactly(tmp_path, arch):
    llm = offload_moe.load(make_tiny_checkpoint(tmp_path / "ck", arch=arch), device="cpu", slots_per_layer=2,
                           progress=False)
    eng = BatchEngine(llm, max_batch=4)
    eng.start()
    try:
        alone = [_run(eng, [p], SamplingParams(max_new_tokens=10))[0][0] for p in PROMPTS]
        assert _run(eng, PROMPTS, SamplingParams(max_new_tokens=10))[0] == alone
    finally:
        eng.stop()
        llm.close()


def test_a_family_that_cannot_batch_runs_one_at_a_time(tmp_path):
    llm = offload_moe.load(make_tiny_checkpoint(tmp_path / "ck", arch="gpt_oss"), device="cpu", progress=False)
    eng = BatchEngine(llm, max_batch=8)
    assert eng.max_batch == 1  # sliding-window layers: their cache is not one padded tensor
    eng.start()
    try:
        alone = [_run(eng, [p], SamplingParams(max_new_tokens=8))[0][0] for p in PROMPTS[:3]]
        assert _run(eng, PROMPTS[:3], SamplingParams(max_new_tokens=8))[0] == alone
    finally:
        eng.stop()
        llm.close()


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_an_encoder_decoder_model_is_refused_by_name(tmp_path):
    llm = offload_moe.load(make_tiny_checkpoint(tmp_path / "ck", arch="switch_transformers"), device="cpu",
                           progress=False)
    with pytest.raises(ConfigError, match="switch_transformers is encoder-decoder"):
        BatchEngine(llm)
    llm.close()


def test_health_is_503_while_loading_then_ok(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "ck")
    release = threading.Event()

    def slow_load():
        release.wait(60)
        return offload_moe.load(path, device="cpu", progress=False)

    state = ServerState(slow_load, "ck")
    sock = listen("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _get(url + "/health") == (503, {"status": "loading"})
        status, body = _get(url + "/v1/models")
        assert status == 200  # what needs no model answers at once
        release.set()
        assert state.ready.wait(60)
        assert _get(url + "/health") == (200, {"status": "ok"})
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)
        sock.close()
