"""The split server (engine_core.py / engine_client.py): the engine in an engine-core process, HTTP,
tokenisation, detokenisation and stop strings in the API process. Against a real uvicorn on a loopback port
with the tiny model on CPU: the same answers as the in-process server (greedy, byte for byte, streamed and
not, chat, stop strings, logprobs), the server tests' representative cases in both modes (aborts mid-stream,
400s, /metrics), and what only the split has: an engine core that fails or dies is a 503 for every stream and a
clean exit, a start failure is the engine's own error, and `serve --engine-process` stops both processes on
SIGINT / SIGTERM without leaving one behind."""
import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import light_moe.engine.sampler as sampler_module  # noqa: E402
from light_moe import LightMoEEngine, SamplingParams  # noqa: E402
from light_moe.engine.args import EngineArgs  # noqa: E402
from light_moe.engine.outputs import RequestOutput  # noqa: E402
from light_moe.server.engine_client import EngineProcess, _child_pids  # noqa: E402
from light_moe.server.engine_loop import RequestFailedError, RequestStream  # noqa: E402
from tests.test_server import (  # noqa: E402
    CONTEXT,
    MODEL,
    _engine,
    _kill,
    _metric,
    _metrics,
    _running_server,
    _serve,
    _sse_events,
    _wait_idle,
)
from tests.tiny_models import make_tiny_checkpoint  # noqa: E402

MODES = ("thread", "process")


def _args(ckpt, **options) -> EngineArgs:
    return EngineArgs(ckpt, dtype="float32", device="cpu", show_progress=False, **options)


# ---- engines for the engine-core process (module level: the child process imports them by name) --------------
def build_failing_step(args):
    engine = LightMoEEngine.from_engine_args(args)

    def broken_step():
        raise RuntimeError("simulated device failure")

    engine.step = broken_step
    return engine


def build_with_sampler_bug(args):
    """top_k 4242 raises in the sampler, as tests/test_server_reliability.py simulates a value the bounds missed."""
    real = sampler_module._filter

    def filter_with_a_bug(logits, rows):
        if any(row.params.top_k == 4242 for row in rows):
            raise OverflowError("Overflow when unpacking long long")
        return real(logits, rows)

    sampler_module._filter = filter_with_a_bug
    return LightMoEEngine.from_engine_args(args)


def build_with_a_child_process(args):
    """An engine whose core has a child process of its own (as expert-parallel workers are)."""
    import subprocess

    subprocess.Popen(["sleep", "600"])
    return LightMoEEngine.from_engine_args(args)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3"), max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def reference(ckpt):
    return _engine(ckpt)


@pytest.fixture(scope="module")
def servers(ckpt):
    """{mode: base URL}: the in-process server and the split one, over engines with the same options."""
    process = EngineProcess(_args(ckpt))
    try:
        with _running_server(_engine(ckpt), max_body_bytes=64 * 1024) as thread_url, \
                _running_server(process, max_body_bytes=64 * 1024) as process_url:
            yield {"thread": thread_url, "process": process_url}
    finally:
        process.shutdown()
    assert not process.process.is_alive() and process.process.exitcode == 0


@pytest.fixture(params=MODES)
def server(request, servers):
    return servers[request.param]


def _normalized(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def _stream(url: str, route: str, body: dict) -> dict:
    """A stream's content, whatever its chunking (a handler behind the engine joins outputs): the text, the
    logprobs, the finish reason and the usage."""
    with httpx.stream("POST", f"{url}{route}", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200, response.read()
        events = _sse_events(list(response.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    summary = {"text": "", "logprobs": [], "finish_reasons": [], "usage": chunks[-1]["usage"]}
    for chunk in chunks:
        for choice in chunk["choices"]:
            summary["text"] += choice["text"] if "text" in choice else choice["delta"].get("content", "")
            summary["finish_reasons"].append(choice["finish_reason"])
            logprobs = choice["logprobs"] or {}
            if "tokens" in logprobs:  # completions
                summary["logprobs"] += list(zip(logprobs["tokens"], logprobs["token_logprobs"],
                                                logprobs["text_offset"]))
            summary["logprobs"] += logprobs.get("content") or []  # chat
    summary["finish_reasons"] = [r for r in summary["finish_reasons"] if r is not None]
    return summary


def _children(pid: int) -> set[int]:
    return set(_child_pids(pid))


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie is gone too
    except OSError:
        return True


def _is_engine_core(pid: int) -> bool:
    try:
        return b"multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


# ---- the same answers in both modes ------------------------------------------------------------------------

def test_split_answers_are_identical_to_the_in_process_server(servers, reference):
    prompt = "def fibonacci(n):"
    greedy = reference.generate(prompt, max_tokens=24, temperature=0.0, ignore_eos=True)
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 3]  # a stop string the greedy text reaches mid-way
    assert stop.strip(), greedy
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello"}]
    completions = [
        dict(prompt=prompt, max_tokens=24, temperature=0, ignore_eos=True, logprobs=1),
        dict(prompt=prompt, max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]),
        dict(prompt=prompt, max_tokens=24, temperature=0, ignore_eos=True, stop=["zzz", stop + greedy[-2:]]),
        dict(prompt=prompt, max_tokens=24, temperature=0, stop_token_ids=[reference.tokenizer.encode(greedy)[5]]),
        dict(prompt=reference.tokenizer.encode("The quick brown fox"), max_tokens=8, temperature=0, ignore_eos=True),
        dict(prompt=prompt, max_tokens=16, temperature=1.0, top_k=20, seed=1234, ignore_eos=True),
    ]
    chats = [dict(messages=messages, max_tokens=10, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=1),
             dict(messages=messages, max_tokens=10, temperature=0, stop=["l"])]
    got = {}
    for mode, url in servers.items():
        answers = []
        for route, bodies in (("/v1/completions", completions), ("/v1/chat/completions", chats)):
            for body in bodies:
                body = {"model": MODEL, **body}
                response = httpx.post(f"{url}{route}", json=body, timeout=60)
                assert response.status_code == 200, response.text
                answer = _normalized(response.json())
                streamed = _stream(url, route, {**body, "stream_options": {"include_usage": True}})
                choice = answer["choices"][0]
                assert streamed["text"] == choice.get("text", choice.get("message", {}).get("content"))
                assert streamed["finish_reasons"] == [choice["finish_reason"]]
                uncached = {k: v for k, v in answer["usage"].items() if k != "prompt_tokens_details"}
                assert {k: streamed["usage"][k] for k in uncached} == uncached  # the stream's prompt was cached
                answers += [answer, streamed]
        got[mode] = answers
        _wait_idle(url)  # the stop-string requests were stopped in the engine core too: no KV left
    assert got["process"] == got["thread"]
    # and what the Python API gives
    assert got["process"][0]["choices"][0]["text"] == greedy
    stopped = got["process"][2]["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == reference.generate(prompt, max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop])


def test_concurrent_streams_match_the_engine(servers, reference):
    prompts = [f"request {i}: the quick brown fox" for i in range(16)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = [o.text for o in reference.generate_outputs(prompts, params)]

    async def one(client, url, prompt):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                "stream": True}
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            events = _sse_events([line async for line in response.aiter_lines()])
        return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])

    async def main(url):
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(one(client, url, p) for p in prompts))

    assert asyncio.run(main(servers["process"])) == expected
    samples = _wait_idle(servers["process"])
    assert _metric(samples, "light_moe_max_batch_size") > 1


def test_a_handler_that_fell_behind_gets_the_queued_outputs_joined():
    """Split mode: outputs queued for a handler since it last ran come out as one (deltas joined, the latest
    text and counts), so it never lags the engine by more than one event; an error behind them comes next.
    In-process, one output per token (clients timing each token rely on it)."""
    def output(ids, text, finished=False):
        return RequestOutput("r", None, [1], text, ids, text[-1:], ids[-1:], finished, "length" if finished else None,
                             logprobs=[-0.5] * len(ids))

    async def main():
        stream = RequestStream("r", asyncio.get_running_loop(), 0.0, True, join_outputs=True)
        for out in (output([7], "a"), output([7, 8], "ab"), output([7, 8, 9], "abc")):
            stream._put(out)
        stream._put(RequestFailedError("boom"))
        joined = await stream.next()
        assert (joined.delta_text, joined.delta_token_ids, joined.text, joined.token_ids) == ("abc", [7, 8, 9], "abc",
                                                                                              [7, 8, 9])
        assert joined.logprobs == [-0.5] * 3 and not stream.finished
        with pytest.raises(RequestFailedError):
            await stream.next()
        assert stream.finished

        stream = RequestStream("r", asyncio.get_running_loop(), 0.0, True, join_outputs=True)
        for out in (output([7], "a"), output([7, 8], "ab", finished=True)):
            stream._put(out)
        last = await stream.next()
        assert last.finished and last.delta_text == "ab" and stream.finished

        stream = RequestStream("r", asyncio.get_running_loop(), 0.0, True)  # in-process: token by token
        for out in (output([7], "a"), output([7, 8], "ab", finished=True)):
            stream._put(out)
        assert [(await stream.next()).delta_text for _ in range(2)] == ["a", "b"] and stream.finished

    asyncio.run(main())


# ---- the server tests' representative cases, in both modes -------------------------------------------------

@pytest.mark.parametrize("payload, status, param", [
    (b'{"model": "tiny-moe", "prompt": ', 400, None),
    ({"model": MODEL, "prompt": [1, 2, 100_000], "max_tokens": 2}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hello", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": list(range(5, 300)) * 4, "max_tokens": 2}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hello", "top_k": 2**40}, 400, "top_k"),
    ({"model": "gpt-9", "prompt": "hello"}, 404, "model"),
], ids=["malformed JSON", "ids outside the vocab", "beyond the context", "prompt over the context", "top_k",
        "unknown model"])
def test_bad_requests_get_their_status_and_the_server_keeps_serving(server, payload, status, param):
    if isinstance(payload, bytes):
        response = httpx.post(f"{server}/v1/completions", content=payload, headers={"content-type": "application/json"})
    else:
        response = httpx.post(f"{server}/v1/completions", json=payload)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
    ok = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 2,
                                                      "ignore_eos": True}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_dropped_clients_are_aborted_and_free_their_kv_blocks(server):
    aborted = _metric(_metrics(server), "light_moe_requests_finished_total", finish_reason="abort")
    long_request = {"model": MODEL, "prompt": "hello", "max_tokens": 900, "ignore_eos": True}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{server}/v1/completions", json={**long_request, "stream": True}) as response:
            seen = 0
            for line in response.iter_lines():
                seen += line.startswith("data: ")
                if seen == 3:
                    break
        assert seen == 3
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=long_request, timeout=0.3)
    samples = _wait_idle(server)
    assert _metric(samples, "light_moe_requests_finished_total", finish_reason="abort") == aborted + 2


def test_metrics_report_the_engine_and_the_requests(server):
    before = _metrics(server)
    prompt = "the quick brown fox jumps over the lazy dog " * 4  # whole KV blocks: the later two hit the cache
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    for _ in range(3):
        assert httpx.post(f"{server}/v1/completions", json=body, timeout=30).status_code == 200
    after = _wait_idle(server)

    def grew(name, **labels):
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    assert grew("light_moe_generation_tokens_total") == 18
    assert grew("light_moe_requests_finished_total", finish_reason="length") == 3
    assert grew("light_moe_time_to_first_token_seconds_count") == 3
    assert grew("light_moe_request_queue_time_seconds_count") == 3
    assert grew("light_moe_time_per_output_token_seconds_count") == 3
    assert grew("light_moe_prompt_tokens_total") > 0 and grew("light_moe_engine_steps_total") >= 6
    assert grew("light_moe_prefix_cache_queries_total") > 0 and grew("light_moe_prefix_cache_hits_total") > 0
    assert grew("light_moe_http_requests_total", route="/v1/completions", status="200") == 3
    routed = [v for (name, _), v in after.items() if name == "light_moe_expert_tokens"]
    assert len(routed) == 24 and sum(routed) > 0  # 3 MoE layers x 8 experts
    assert httpx.get(f"{server}/health").status_code == 200


# ---- only the split: the engine core failing, dying, not starting ------------------------------------------

def test_a_failed_step_in_the_engine_core_is_a_503_and_the_core_exits(ckpt):
    process = EngineProcess(_args(ckpt), build=build_failing_step)
    try:
        with _running_server(process) as url:
            response = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
            assert response.status_code == 503 and "simulated device failure" in response.json()["error"]["message"]
            assert httpx.get(f"{url}/health").status_code == 503
            assert httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi"}).status_code == 503
            process.process.join(30)
            assert process.process.exitcode == 1
    finally:
        process.shutdown()


def test_a_killed_engine_core_ends_every_stream_with_a_503(ckpt):
    process = EngineProcess(_args(ckpt))
    try:
        with _running_server(process) as url:
            body = {"model": MODEL, "prompt": "hello", "max_tokens": 900, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
                lines = response.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                os.kill(process.process.pid, signal.SIGKILL)
                events = [first[len("data: "):]] + _sse_events(lines)
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert error["type"] == "service_unavailable" and "engine-core process exited" in error["message"]
            assert httpx.get(f"{url}/health").status_code == 503
            assert httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi"}).status_code == 503
    finally:
        process.shutdown()
    assert process.process.exitcode == -signal.SIGKILL


def test_a_request_failing_in_the_engine_core_fails_alone(ckpt, reference):
    good = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    bad = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 24, "temperature": 1, "top_k": 4242}
    expected = reference.generate(good["prompt"], max_tokens=24, temperature=0.0, ignore_eos=True)
    process = EngineProcess(_args(ckpt), build=build_with_sampler_bug)
    try:
        with _running_server(process) as url:
            async def together():
                async with httpx.AsyncClient(timeout=60) as client:
                    return await asyncio.gather(client.post(f"{url}/v1/completions", json=good),
                                                client.post(f"{url}/v1/completions", json=bad))
            ok, failed = asyncio.run(together())
            assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == expected
            assert failed.status_code == 500 and "Overflow" in failed.json()["error"]["message"]
            samples = _wait_idle(url)
            assert _metric(samples, "light_moe_requests_finished_total", finish_reason="error") == 1
            assert httpx.get(f"{url}/health").status_code == 200
    finally:
        process.shutdown()


def test_an_engine_that_cannot_be_built_raises_its_own_error(ckpt):
    before = {pid for pid in _children(os.getpid()) if _is_engine_core(pid)}
    start = time.monotonic()
    with pytest.raises(ValueError, match="exceeds the model's context window"):
        EngineProcess(_args(ckpt, max_model_len=CONTEXT * 4))
    assert time.monotonic() - start < 60
    assert {pid for pid in _children(os.getpid()) if _is_engine_core(pid)} <= before  # nothing left behind


def test_an_engine_process_serves_a_second_app(ckpt):
    """The loop, not the process, ends with an app: a second app over the same engine-core process serves, and a
    stream the first one left running is gone from the core."""
    process = EngineProcess(_args(ckpt))
    try:
        for _ in range(2):
            with _running_server(process) as url:
                body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "ignore_eos": True}
                assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
                with httpx.stream("POST", f"{url}/v1/completions", json={**body, "max_tokens": 900, "stream": True},
                                  timeout=30) as response:
                    lines = response.iter_lines()
                    next(line for line in lines if line.startswith("data: "))
                    # the app shuts down with this stream still running: the core aborts it
        assert process.process.is_alive()
    finally:
        process.shutdown()
    assert process.process.exitcode == 0


def test_an_expert_parallel_engine_core_serves_and_stops_with_its_workers(ckpt, reference):
    """The core starts the expert-parallel ranks itself (it is no daemon); greedy answers equal one process's,
    and shutdown stops the ranks too."""
    process = EngineProcess(_args(ckpt, expert_parallel_size=2, collective_timeout_s=60.0))
    try:
        workers = _children(process.process.pid)
        assert workers
        with _running_server(process) as url:
            for prompt in ("def fibonacci(n):", "Hello"):
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
                got = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
                assert got == reference.generate(prompt, max_tokens=8, temperature=0.0, ignore_eos=True)
    finally:
        process.shutdown()
    assert process.process.exitcode == 0 and all(_gone(pid) for pid in workers)


def test_a_core_that_does_not_stop_is_killed_with_its_children(ckpt):
    process = EngineProcess(_args(ckpt), build=build_with_a_child_process)
    children = _children(process.process.pid)
    assert children
    process.shutdown(timeout=0.0)  # no time to stop on its own
    assert process.process.exitcode == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in children):
        assert time.monotonic() < deadline, children
        time.sleep(0.1)


# ---- `serve --engine-process`: signals stop both processes -------------------------------------------------

@pytest.mark.parametrize("signum, shutdown_timeout, max_tokens, finish_reason", [
    (signal.SIGTERM, 30.0, 40, "length"),  # the in-flight request finishes
    (signal.SIGINT, 0.5, 900, "abort"),  # it outlives the shutdown timeout and is aborted
], ids=["SIGTERM-finishes", "SIGINT-aborts"])
def test_serve_with_an_engine_process_shuts_down_cleanly(ckpt, signum, shutdown_timeout, max_tokens, finish_reason):
    proc, url = _serve(ckpt, "--engine-process", "--shutdown-timeout", str(shutdown_timeout))
    try:
        cores = [pid for pid in _children(proc.pid) if _is_engine_core(pid)]
        assert len(cores) == 1, _children(proc.pid)
        body = {"model": MODEL, "prompt": "hello", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            for pid in (proc.pid, cores[0]):  # as a terminal's Ctrl-C or a supervisor reaches the whole group
                os.kill(pid, signum)
            events = [first[len("data: "):]] + _sse_events(lines)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == finish_reason
        completion_tokens = chunks[-1]["usage"]["completion_tokens"]
        assert completion_tokens == max_tokens if finish_reason == "length" else completion_tokens < max_tokens
        _, stderr = proc.communicate(timeout=30)  # returns once both processes closed their stderr
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr, stderr
        assert not Path(f"/proc/{cores[0]}").exists() or not _is_engine_core(cores[0])
    finally:
        _kill(proc)


def test_serve_on_the_cpu_keeps_the_engine_in_process_by_default(ckpt):
    proc, url = _serve(ckpt)
    try:
        assert not [pid for pid in _children(proc.pid) if _is_engine_core(pid)]
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr
    finally:
        _kill(proc)


# ---- on a GPU: the default there --------------------------------------------------------------------------

@pytest.mark.gpu
def test_the_split_on_a_gpu_answers_as_the_in_process_server(tmp_path):
    """CUDA in a spawned engine-core process (the default of `serve` on a GPU), CUDA graphs and all: requests
    one at a time (the same batches, so the same kernels) get the in-process server's greedy answers."""
    import torch

    ckpt = make_tiny_checkpoint("qwen3_moe", tmp_path / "qwen3", hidden_size=128, moe_intermediate_size=128,
                                head_dim=64, max_position_embeddings=CONTEXT)
    args = EngineArgs(ckpt, dtype="bfloat16", device="cuda", show_progress=False, kv_cache_memory_bytes=256 << 20)
    process = EngineProcess(args)
    engine = LightMoEEngine.from_engine_args(args)
    try:
        assert process.device.startswith("cuda")
        answers = {}
        for mode, served in (("thread", engine), ("process", process)):
            with _running_server(served) as url:
                got = []
                for prompt in ("def fibonacci(n):", "The quick brown fox", "import os\nimport sys"):
                    body = {"model": MODEL, "prompt": prompt, "max_tokens": 32, "temperature": 0, "ignore_eos": True}
                    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
                    assert response.status_code == 200, response.text
                    got.append(response.json()["choices"][0]["text"])
                    got.append(_stream(url, "/v1/completions", body)["text"])
                answers[mode] = got
                _wait_idle(url)
        assert answers["process"] == answers["thread"]
    finally:
        process.shutdown()
        engine.shutdown()
        torch.cuda.empty_cache()
    assert process.process.exitcode == 0


class _PipeOnlyCore:
    """An EngineCoreClient's reading side alone: the outputs pipe, nothing sent anywhere."""

    def __init__(self, outputs):
        self.outputs = outputs

    def send(self, message) -> bool:
        return True

    def core_alive(self) -> bool:
        return True

    def core_gone_reason(self) -> str:
        return "the pipe closed"


@pytest.mark.parametrize("loop_kind", ["uvloop", "nonblocking-fd"])
def test_an_output_message_longer_than_the_pipe_is_read_whole(loop_kind):
    """uvloop's add_reader makes the outputs fd non-blocking, and Connection.recv() on a message longer than the pipe
    holds (64 KB: one step of a few hundred streams) then raised EAGAIN, which the API process took for a dead core:
    every stream got a 503 from 256 streams on (scripts/serve_overhead.py --engine-process --streams 256). The loop
    must read such a message whole, under uvloop and where anything else made the fd non-blocking."""
    import multiprocessing
    import threading

    from light_moe.server.engine_client import EngineProcessLoop

    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    reader, writer = multiprocessing.Pipe(duplex=False)
    engine_loop = EngineProcessLoop(_PipeOnlyCore(reader), metrics=None)
    received = []
    engine_loop._handle = received.append  # the reading is under test, not the handling
    big = ("step", "x" * (4 << 20), {"queue": {}})  # 4 MB: 64 times the pipe
    try:
        loop.call_soon(engine_loop.start, loop)
        if loop_kind == "nonblocking-fd":
            loop.call_soon(os.set_blocking, reader.fileno(), False)
        sender = threading.Thread(target=lambda: [writer.send(big) for _ in range(3)], daemon=True)
        loop.call_soon(sender.start)

        async def until_received():
            deadline = time.monotonic() + 20
            while len(received) < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)

        loop.run_until_complete(until_received())
        sender.join(5)
    finally:
        engine_loop._stopping = True
        if engine_loop._reading:
            loop.remove_reader(reader.fileno())
        loop.close()
        reader.close()
        writer.close()
    assert engine_loop._error is None, engine_loop._error
    assert received == [big] * 3
