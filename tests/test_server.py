"""The OpenAI-compatible server against a real uvicorn on a loopback port, with a tiny model on CPU:
the official openai client gets what LightMoEEngine gives, 64 concurrent streams are batched,
every bad input gets its status code and the server keeps serving, dropped clients free their
KV blocks, and SIGINT/SIGTERM shut the `serve` entry point down cleanly."""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

from light_moe import LightMoEEngine, SamplingParams  # noqa: E402
from light_moe.server.app import DrainingServer, build_app  # noqa: E402
from tests.tiny_models import make_tiny_checkpoint  # noqa: E402

MODEL = "tiny-moe"
CONTEXT = 1024
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _running_server(engine, **app_kwargs):
    """uvicorn in a background thread on a free loopback port; yields its base URL."""
    app = build_app(engine, served_model_name=MODEL, expert_sync_interval_s=0.0, **app_kwargs)
    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = DrainingServer(config, app.state.server.loop, drain_timeout=1.0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def _engine(ckpt, **kwargs) -> LightMoEEngine:
    return LightMoEEngine(ckpt, dtype="float32", device="cpu", show_progress=False, **kwargs)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3"), max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def reference(ckpt):
    return _engine(ckpt)


@pytest.fixture(scope="module")
def server(ckpt):
    with _running_server(_engine(ckpt), max_body_bytes=64 * 1024) as url:
        yield url


@pytest.fixture(scope="module")
def limited_server(ckpt):
    """One batch seat, one waiting place, an API key."""
    with _running_server(_engine(ckpt, max_num_seqs=1), api_key="sekret", max_waiting=1) as url:
        yield url


def _metrics(url: str) -> dict:
    """{(sample name, ((label, value), ...)): value} from /metrics."""
    text = httpx.get(f"{url}/metrics").text
    samples = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _wait_idle(url: str, timeout: float = 15.0) -> dict:
    """Poll /metrics until nothing runs or waits and the KV cache is empty."""
    deadline = time.monotonic() + timeout
    while True:
        samples = _metrics(url)
        idle = (_metric(samples, "light_moe_num_requests_running") == 0
                and _metric(samples, "light_moe_num_requests_waiting") == 0
                and _metric(samples, "light_moe_kv_cache_usage_ratio") == 0)
        if idle:
            return samples
        assert time.monotonic() < deadline, "the engine still holds requests or KV blocks"
        time.sleep(0.05)


def _sse_events(lines) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


# ---- the openai client gets what the engine gives --------------------------------------------------

def test_models_and_health(server):
    assert httpx.get(f"{server}/health").status_code == 200
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completions_match_the_engine(server, reference):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    prompt = "def fibonacci(n):"
    expected = reference.generate_outputs(prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                                 logprobs=True))[0]
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=1,
                                    extra_body={"ignore_eos": True})
    choice = got.choices[0]
    assert choice.text == expected.text
    assert choice.finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(expected.prompt_token_ids), 12)
    assert choice.logprobs.token_logprobs == pytest.approx(expected.logprobs, abs=1e-4)

    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12

    ids = reference.tokenizer.encode("The quick brown fox")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == reference.generate(ids, max_tokens=6, temperature=0.0, ignore_eos=True)

    # without max_tokens a completion is 16 tokens long (OpenAI's legacy default)
    default = client.completions.create(model=MODEL, prompt=prompt, temperature=0, extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16


def test_start_up_objects_are_frozen_while_serving(ckpt):
    """The app's lifespan freezes what exists at start-up (the collector's full passes skip it) and unfreezes it
    at shutdown."""
    import gc

    with _running_server(_engine(ckpt)) as url:
        assert gc.get_freeze_count() > 0
        assert httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}).status_code \
            == 200
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize("flags", [dict(async_scheduling=False), dict(async_output_processing=True,
                                                                      async_scheduling=False)])
def test_sync_and_async_output_engines_serve_the_same(ckpt, reference, flags):
    """The server's default engine schedules asynchronously (outputs one step later); a synchronous engine
    and one with async output processing only: the same completions, plain and streamed, and nothing left
    behind."""
    prompt = "def fibonacci(n):"
    expected = reference.generate_outputs(prompt, SamplingParams(max_tokens=12, temperature=0.0,
                                                                 ignore_eos=True))[0]
    with _running_server(_engine(ckpt, **flags)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert got.choices[0].text == expected.text and got.usage.completion_tokens == 12
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
        _wait_idle(url)


def test_chat_matches_the_engine(server, reference):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello"}]
    expected = reference.chat(messages, max_tokens=10, temperature=0.0, ignore_eos=True)
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                         logprobs=True, extra_body={"ignore_eos": True})
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == expected
    assert got.usage.completion_tokens == 10 and got.usage.prompt_tokens == len(reference.apply_chat_template(messages))
    assert len(got.choices[0].logprobs.content) == 10

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10,
                                                 temperature=0, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


# ---- concurrency --------------------------------------------------------------------------------

def test_64_concurrent_streams_are_batched(server):
    num_clients, max_tokens = 64, 8
    before = _metrics(server)

    async def one(client: "httpx.AsyncClient", i: int) -> tuple[int, str]:
        body = {"model": MODEL, "prompt": f"request {i}: the quick brown fox", "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", f"{server}/v1/completions", json=body) as response:
            assert response.status_code == 200
            events = _sse_events([line async for line in response.aiter_lines()])
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        return chunks[-1]["usage"]["completion_tokens"], "".join(c["choices"][0]["text"] for c in chunks
                                                                   if c["choices"])

    async def main():
        limits = httpx.Limits(max_connections=num_clients + 8)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(num_clients)))

    results = asyncio.run(main())
    assert [n for n, _ in results] == [max_tokens] * num_clients
    after = _wait_idle(server)
    steps = _metric(after, "light_moe_batch_size_count") - _metric(before, "light_moe_batch_size_count")
    single = (_metric(after, "light_moe_batch_size_bucket", le="1.0")
              - _metric(before, "light_moe_batch_size_bucket", le="1.0"))
    assert steps - single > 0, "no engine step ran more than one request"
    assert _metric(after, "light_moe_max_batch_size") > 1
    generated = (_metric(after, "light_moe_generation_tokens_total")
                 - _metric(before, "light_moe_generation_tokens_total"))
    assert generated == num_clients * max_tokens
    assert _metric(after, "light_moe_time_to_first_token_seconds_count") >= num_clients
    # expert load: every MoE layer of the tiny model (3 layers, 8 experts) routed tokens
    routed = {(dict(labels)["layer"], dict(labels)["expert"]): v for (name, labels), v in after.items()
              if name == "light_moe_expert_tokens"}
    assert {layer for layer, _ in routed} == {"0", "1", "2"} and len(routed) == 24
    assert sum(routed.values()) > 0
    assert _metric(after, "light_moe_expert_rank_imbalance", layer="0") == 1.0  # one process


# ---- bad input ----------------------------------------------------------------------------------

def _body(**fields):
    return {"model": MODEL, "prompt": "hello", "max_tokens": 2, **fields}


def _chat(**fields):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


def _chunked(data: bytes):
    for i in range(0, len(data), 8192):
        yield data[i:i + 8192]


BAD_INPUTS = [
    ("malformed JSON", "/v1/completions", b'{"model": "tiny-moe", "prompt": ', 400, None),
    ("not an object", "/v1/completions", [1, 2], 400, None),
    ("wrong type", "/v1/completions", _body(max_tokens="ten"), 400, "max_tokens"),
    ("wrong type of temperature", "/v1/completions", _body(temperature="hot"), 400, "temperature"),
    ("prompt of a number", "/v1/completions", _body(prompt=5), 400, "prompt"),
    ("no prompt", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("empty prompt", "/v1/completions", _body(prompt=""), 400, "prompt"),
    ("ids outside the vocab", "/v1/completions", _body(prompt=[1, 2, 100_000]), 400, "prompt"),
    ("several prompts", "/v1/completions", _body(prompt=["a", "b"]), 400, "prompt"),
    ("unknown model", "/v1/completions", _body(model="gpt-9"), 404, "model"),
    ("max_tokens 0", "/v1/completions", _body(max_tokens=0), 400, "max_tokens"),
    ("max_tokens negative", "/v1/completions", _body(max_tokens=-3), 400, "max_tokens"),
    ("beyond the context", "/v1/completions", _body(max_tokens=CONTEXT), 400, "max_tokens"),
    ("prompt over the context", "/v1/completions", _body(prompt=list(range(5, 300)) * 4), 400, "prompt"),
    ("n 2", "/v1/completions", _body(n=2), 400, "n"),
    ("presence penalty", "/v1/completions", _body(presence_penalty=0.5), 400, "presence_penalty"),
    ("frequency penalty", "/v1/chat/completions", _chat(frequency_penalty=1.0), 400, "frequency_penalty"),
    ("top_p 0", "/v1/completions", _body(top_p=0.0), 400, "top_p"),
    ("no messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", _chat(messages=[]), 400, "messages"),
    ("message without role", "/v1/chat/completions", _chat(messages=[{"content": "hi"}]), 400, "messages"),
    ("max_completion_tokens 0", "/v1/chat/completions", _chat(max_completion_tokens=0), 400,
     "max_completion_tokens"),
    ("chat beyond the context", "/v1/chat/completions", _chat(max_tokens=CONTEXT), 400, "max_tokens"),
    ("unknown chat model", "/v1/chat/completions", _chat(model="gpt-9"), 404, "model"),
    ("body too large", "/v1/completions", _body(prompt="x" * 100_000), 413, None),
    ("chunked body too large", "/v1/completions", ("chunked", _body(prompt="x" * 100_000)), 413, None),
]


@pytest.mark.parametrize("route, payload, status, param", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, route, payload, status, param):
    if isinstance(payload, bytes):
        response = httpx.post(f"{server}{route}", content=payload, headers={"content-type": "application/json"})
    elif isinstance(payload, tuple):  # no Content-Length: the limit must hold while reading
        data = json.dumps(payload[1]).encode()
        response = httpx.post(f"{server}{route}", content=_chunked(data), headers={"content-type": "application/json"})
    else:
        response = httpx.post(f"{server}{route}", json=payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    ok = httpx.post(f"{server}/v1/completions", json=_body(ignore_eos=True))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_unknown_fields_are_ignored(server):
    response = httpx.post(f"{server}/v1/completions", json=_body(ignore_eos=True, some_future_field={"x": 1}))
    assert response.status_code == 200


# ---- clients that go away -----------------------------------------------------------------------

def test_dropped_clients_are_aborted_and_free_their_kv_blocks(server):
    aborted = _metric(_metrics(server), "light_moe_requests_finished_total", finish_reason="abort")
    long_request = _body(max_tokens=900, ignore_eos=True)
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{server}/v1/completions", json={**long_request, "stream": True}) as response:
            seen = 0
            for line in response.iter_lines():
                seen += line.startswith("data: ")
                if seen == 3:
                    break
        assert seen == 3
        samples = _metrics(server)
        assert _metric(samples, "light_moe_num_requests_running") <= 1
    # a non-streamed request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=long_request, timeout=0.3)
    samples = _wait_idle(server)
    assert _metric(samples, "light_moe_requests_finished_total", finish_reason="abort") == aborted + 2


# ---- API key and the waiting-queue limit ----------------------------------------------------------

def test_api_key_is_required_on_v1(limited_server):
    url = limited_server
    assert httpx.get(f"{url}/v1/models").status_code == 401
    wrong = httpx.post(f"{url}/v1/completions", json=_body(), headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope").models.list()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret")
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def test_full_waiting_queue_gets_429_with_retry_after(limited_server):
    url = limited_server
    headers = {"Authorization": "Bearer sekret"}
    long_stream = {**_body(max_tokens=900, ignore_eos=True), "stream": True}
    with httpx.Client(headers=headers, timeout=30) as client:
        with client.stream("POST", f"{url}/v1/completions", json=long_stream) as running:
            # keep the line iterator referenced: a discarded one closes the connection, and the server
            # (rightly) aborts the request
            running_lines = running.iter_lines()
            next(line for line in running_lines if line.startswith("data: "))  # holds the one seat
            with client.stream("POST", f"{url}/v1/completions", json=long_stream) as waiting:
                assert waiting.status_code == 200  # accepted, waits for the seat
                refused = client.post(f"{url}/v1/completions", json=_body())
                assert refused.status_code == 429, refused.text
                assert refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    _wait_idle(url)
    ok = httpx.post(f"{url}/v1/completions", json=_body(), headers=headers)
    assert ok.status_code == 200


def test_a_failed_step_is_a_503_and_health_says_so(ckpt):
    engine = _engine(ckpt)

    def broken_step():
        raise RuntimeError("simulated device failure")

    engine.step = broken_step
    with _running_server(engine) as url:
        response = httpx.post(f"{url}/v1/completions", json=_body())
        assert response.status_code == 503 and "simulated device failure" in response.json()["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 503
        assert httpx.post(f"{url}/v1/completions", json=_body()).status_code == 503


# ---- the `serve` entry point and signals ----------------------------------------------------------

def _serve(ckpt, *extra) -> tuple[subprocess.Popen, str]:
    """`python -m light_moe.server.serve` on a free port, once /health answers: (process, base URL)."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "light_moe.server.serve", "--model", str(ckpt), "--port", str(port),
         "--device", "cpu", "--dtype", "float32", "--served-model-name", MODEL, "--log-level", "warning", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.1)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("signum, shutdown_timeout, max_tokens, finish_reason", [
    (signal.SIGTERM, 30.0, 40, "length"),  # the in-flight request finishes
    (signal.SIGINT, 0.5, 900, "abort"),  # it outlives the shutdown timeout and is aborted
], ids=["SIGTERM-finishes", "SIGINT-aborts"])
def test_signal_shuts_down_cleanly(ckpt, signum, shutdown_timeout, max_tokens, finish_reason):
    proc, url = _serve(ckpt, "--shutdown-timeout", str(shutdown_timeout))
    try:
        body = {**_body(max_tokens=max_tokens, ignore_eos=True), "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signum)
            events = [first[len("data: "):]] + _sse_events(lines)
        assert events[-1] == "[DONE]"  # the stream ended properly either way
        chunks = [json.loads(e) for e in events[:-1]]
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == finish_reason
        completion_tokens = chunks[-1]["usage"]["completion_tokens"]
        assert completion_tokens == max_tokens if finish_reason == "length" else completion_tokens < max_tokens
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr, stderr
    finally:
        _kill(proc)


def test_expert_parallel_engine_serves_the_same_completions(ckpt, reference):
    """The server over a 2-process expert-parallel engine (gloo on CPU): concurrent greedy completions equal
    the one-process engine's, and /metrics reports the expert load gathered from both ranks."""
    engine = _engine(ckpt, expert_parallel_size=2, collective_timeout_s=60.0)
    try:
        prompts = ["def fibonacci(n):", "The quick brown fox", "import os\nimport sys", "Hello"]
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        expected = [o.text for o in reference.generate_outputs(prompts, params)]
        with _running_server(engine) as url:
            async def one(client, prompt):
                got = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                                      extra_body={"ignore_eos": True})
                return got.choices[0].text

            async def main():
                client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")
                return await asyncio.gather(*(one(client, p) for p in prompts))

            assert asyncio.run(main()) == expected
            samples = _metrics(url)
            load = [v for (name, _), v in samples.items() if name.startswith("light_moe_expert")]
            assert load and sum(load) > 0, sorted({name for name, _ in samples})
    finally:
        engine.shutdown()
