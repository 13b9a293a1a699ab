"""`serve --api-server-count N`: N API processes on one port in front of one engine-core process (api_servers.py,
api_server_process.py, metrics_shared.py). With the tiny model on CPU: the engine core serving two clients keeps
their requests apart (ids, deltas, a client leaving frees its KV blocks, the other served on); a real server with
two API processes answers concurrent streamed and plain completions and chat as the engine does, spreads requests
over both processes, adds their metrics up once, refuses bad requests with 400; SIGINT to the process group and
SIGTERM to the parent drain both processes and exit 0; an API process killed stops the server with exit status
1 after the other drained; nothing is left behind."""
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from light_moe import SamplingParams  # noqa: E402
from light_moe.server.engine_client import _child_pids  # noqa: E402
from light_moe.server.engine_core import EngineCore, _Inbox  # noqa: E402
from tests.test_server import (  # noqa: E402
    CONTEXT,
    MODEL,
    REPO,
    _engine,
    _kill,
    _metric,
    _metrics,
    _serve,
    _sse_events,
)
from tests.tiny_models import make_tiny_checkpoint  # noqa: E402

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3"), max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def reference(ckpt):
    return _engine(ckpt)


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        children = _child_pids(todo.pop())
        found.update(children)
        todo += children
    return found


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _assert_clean_exit(proc, processes: set[int]) -> None:
    """The server exited 0 without a traceback and left none of its processes behind."""
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    _assert_gone(processes)


def _assert_gone(pids: set[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while left := [pid for pid in pids if not _gone(pid)]:
        assert time.monotonic() < deadline, {pid: _cmdline(pid) for pid in left}
        time.sleep(0.1)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _spawned(pid: int) -> list[int]:
    """The multiprocessing children of the server: the engine core and the API processes."""
    def spawned(child):
        try:
            return b"multiprocessing.spawn" in Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            return False
    return [child for child in _child_pids(pid) if spawned(child)]


def _api_pids(url: str, count: int) -> set[int]:
    """The API processes' pids, from their per-process request counters, sending requests until all have one."""
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    for _ in range(60):
        with httpx.Client(timeout=30) as client:  # a new connection each time: the kernel picks the process
            assert client.post(f"{url}/v1/completions", json=body).status_code == 200
        pids = {int(dict(labels)["pid"]) for (name, labels), value in _metrics(url).items()
                if name == "light_moe_api_process_requests_total" and value > 0}
        if len(pids) == count:
            return pids
    raise AssertionError(f"requests reached only the API processes {pids}")


def _server_pid_of(response, port: int, api_pids: set[int]) -> int:
    """Which API process holds this response's connection: the server-side socket's inode (/proc/net/tcp, by the
    client's port) among each process's file descriptors."""
    client_port = response.extensions["network_stream"].get_extra_info("client_addr")[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and int(fields[2].split(":")[1], 16) == client_port:
            inode = fields[9]
    assert inode is not None
    for pid in api_pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError("no API process holds the connection")


def _open_streams_on_every_process(url: str, api_pids: set[int], max_tokens: int) -> dict:
    """One stream in flight on each API process (new connections until each has one; the extra ones closed, which
    aborts them): {pid: (client, response context, line iterator, first data line)}."""
    port = int(url.rsplit(":", 1)[1])
    body = {"model": MODEL, "prompt": "hello", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    streams = {}
    for _ in range(40):
        client = httpx.Client(timeout=60)
        context = client.stream("POST", f"{url}/v1/completions", json=body)
        response = context.__enter__()
        owner = _server_pid_of(response, port, api_pids)
        if owner in streams:
            context.__exit__(None, None, None)
            client.close()
            continue
        lines = response.iter_lines()
        streams[owner] = (client, context, lines, next(line for line in lines if line.startswith("data: ")))
        if len(streams) == len(api_pids):
            return streams
    raise AssertionError("could not place a stream on every API process")


def _finish(stream) -> tuple[str, int]:
    """The stream's last finish reason and completion tokens, reading it to its end."""
    client, context, lines, first = stream
    try:
        events = [first[len("data: "):]] + _sse_events(lines)
    finally:
        context.__exit__(None, None, None)
        client.close()
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    return [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1], chunks[-1]["usage"][
        "completion_tokens"]


# ---- the engine core with two clients -----------------------------------------------------------------------

def test_the_engine_core_keeps_two_clients_apart(ckpt):
    """Both clients use the id "r": each gets its own deltas only; client 0 leaving (its pipe closes) aborts its
    request in the engine (KV blocks freed) while client 1 is served on; the core ends when both have left."""
    import multiprocessing

    engine = _engine(ckpt)
    engine.detokenize = False
    pipes = [(multiprocessing.Pipe(duplex=False), multiprocessing.Pipe(duplex=False)) for _ in range(2)]
    core_requests = [requests[0] for requests, _ in pipes]
    client_requests = [requests[1] for requests, _ in pipes]
    client_outputs = [outputs[0] for _, outputs in pipes]
    core = EngineCore(engine, _Inbox(core_requests), [outputs[1] for _, outputs in pipes])
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", core.run()), daemon=True)
    thread.start()
    prompt = engine.tokenizer.encode(PROMPT)
    client_requests[0].send(("add", "r", prompt, SamplingParams(max_tokens=900, ignore_eos=True)))
    client_requests[1].send(("add", "r", prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)))

    def read_until(client, done, deadline=30.0):
        end = time.monotonic() + deadline
        got = []
        while not done(got):
            assert client_outputs[client].poll(max(0.0, end - time.monotonic())), got[-3:]
            got.append(client_outputs[client].recv())
        return got

    def tokens(messages, finished=False):
        deltas = [d for m in messages if m[0] == "step" for d in m[1]]
        assert {d.request_id for d in deltas} <= {"r"}
        return sum(len(d.token_ids) for d in deltas), any(d.finish_reason for d in deltas)

    one = read_until(1, lambda got: tokens(got)[1])
    assert tokens(one) == (6, True)  # its own six tokens, none of client 0's
    assert [m[1] for m in one if m[0] == "accepted" and m[1]] == [[("r", None)]]
    zero = read_until(0, lambda got: tokens(got)[0] >= 6)
    assert [m[1] for m in zero if m[0] == "accepted" and m[1]] == [[("r", None)]]
    assert not tokens(zero)[1] and engine.has_unfinished_requests()

    client_requests[0].close()  # its API process died: the core aborts "r" of client 0
    client_requests[1].send(("add", "s", prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)))
    later = read_until(1, lambda got: any(d.finish_reason for m in got if m[0] == "step" for d in m[1]))
    deltas = [d for m in later if m[0] == "step" for d in m[1]]
    assert {d.request_id for d in deltas} == {"s"} and sum(len(d.token_ids) for d in deltas) == 4
    queue = later[-1][2]["queue"]
    assert queue["num_running"] == 0 and queue["kv_usage"] == 0  # client 0's KV blocks were freed
    assert engine.get_request("0:r") is None and not engine.has_unfinished_requests()
    assert thread.is_alive()
    client_requests[1].send(("shutdown",))
    thread.join(30)
    assert result["code"] == 0


# ---- a server with two API processes ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server2(ckpt):
    """`serve --api-server-count 2` (the engine core implied on the CPU), its URL and its API processes' pids;
    stopped with SIGTERM at the end: exit 0, no traceback, nothing left."""
    proc, url = _serve(ckpt, "--api-server-count", "2")
    try:
        processes = _descendants(proc.pid)
        assert len(_spawned(proc.pid)) == 3  # the core and two API processes
        yield url, _api_pids(url, 2)
        proc.send_signal(signal.SIGTERM)
        _assert_clean_exit(proc, processes)
    finally:
        _kill(proc)


def test_two_api_processes_answer_as_the_engine(server2, reference):
    """Concurrent streamed and plain completions and chat: the engine's greedy text (what one API process
    serves, tests/test_server_split.py), and every request counted once in the aggregated /metrics."""
    url, _ = server2
    prompts = [f"request {i}: the quick brown fox" for i in range(8)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected = [o.text for o in reference.generate_outputs(prompts, params)]
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello"}]
    expected_chat = reference.chat(messages, max_tokens=10, temperature=0.0, ignore_eos=True)
    before = _metrics(url)

    async def completion(prompt, stream):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
        async with httpx.AsyncClient(timeout=60) as client:  # a connection each: both processes take some
            if not stream:
                response = await client.post(f"{url}/v1/completions", json=body)
                assert response.status_code == 200, response.text
                return response.json()["choices"][0]["text"]
            async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as response:
                events = _sse_events([line async for line in response.aiter_lines()])
            assert events[-1] == "[DONE]"
            return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])

    async def chat(stream):
        body = {"model": MODEL, "messages": messages, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
        async with httpx.AsyncClient(timeout=60) as client:
            if not stream:
                return (await client.post(f"{url}/v1/chat/completions", json=body)).json()["choices"][0][
                    "message"]["content"]
            async with client.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}) as r:
                events = _sse_events([line async for line in r.aiter_lines()])
            return "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])

    async def main():
        return await asyncio.gather(*(completion(p, i % 2 == 0) for i, p in enumerate(prompts)),
                                    *(chat(stream) for stream in (True, False, True, False)))

    got = asyncio.run(main())
    assert got[:8] == expected
    assert got[8:] == [expected_chat] * 4
    after = _wait_idle_everywhere(url)

    def grew(name, **labels):
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    assert grew("light_moe_http_requests_total", route="/v1/completions", status="200") == 8
    assert grew("light_moe_http_requests_total", route="/v1/chat/completions", status="200") == 4
    assert grew("light_moe_requests_finished_total", finish_reason="length") == 12
    assert grew("light_moe_generation_tokens_total") == 120
    assert grew("light_moe_time_to_first_token_seconds_count") == 12
    assert grew("light_moe_e2e_request_latency_seconds_count") == 12
    assert grew("light_moe_inter_token_latency_seconds_count") == 12 * 9
    # one series per API process, adding up to the total; the engine's own counters are not summed per process
    per_process = {labels: v for (name, labels), v in after.items() if name == "light_moe_api_process_requests_total"}
    assert len(per_process) == 2 and all(v > 0 for v in per_process.values())
    assert sum(per_process.values()) == sum(v for (name, _), v in after.items()
                                            if name == "light_moe_http_requests_total")
    steps = _metric(after, "light_moe_engine_steps_total")
    assert steps == _metric(after, "light_moe_batch_size_count") and 10 <= grew("light_moe_engine_steps_total") <= 120
    assert _metric(after, "light_moe_model_info", model=MODEL) == 1
    assert len([1 for (name, _), _v in after.items() if name == "light_moe_expert_tokens"]) == 24


def _wait_idle_everywhere(url: str, timeout: float = 15.0) -> dict:
    """tests/test_server.py's _wait_idle, both processes: each scrape reaches one of them at random, so the
    engine must read idle from a few in a row."""
    deadline = time.monotonic() + timeout
    idle = 0
    while idle < 4:
        samples = _metrics(url)
        quiet = all(_metric(samples, name) == 0 for name in ("light_moe_num_requests_running",
                                                             "light_moe_num_requests_waiting",
                                                             "light_moe_kv_cache_usage_ratio"))
        idle = idle + 1 if quiet else 0
        assert time.monotonic() < deadline, "the engine still holds requests or KV blocks"
        time.sleep(0.02)
    return samples


def test_a_bad_request_is_still_a_400(server2):
    url, _ = server2
    for _ in range(4):  # a new connection each: both processes answer
        with httpx.Client() as client:
            response = client.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": [1, 2, 100_000]})
            assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
            bad_json = client.post(f"{url}/v1/completions", content=b'{"model": ',
                                   headers={"content-type": "application/json"})
            assert bad_json.status_code == 400
    assert httpx.get(f"{url}/health").status_code == 200


# ---- signals and failures -----------------------------------------------------------------------------------

@pytest.mark.parametrize("group, shutdown_timeout, max_tokens, finish_reason", [
    (True, 30.0, 150, "length"),  # a terminal's Ctrl-C: every process gets SIGINT; both streams finish
    (False, 0.5, 900, "abort"),  # SIGTERM to the parent only: both streams outlive the timeout, aborted
], ids=["SIGINT-group-finishes", "SIGTERM-parent-aborts"])
def test_signals_drain_every_api_process(ckpt, group, shutdown_timeout, max_tokens, finish_reason):
    proc, url = _serve(ckpt, "--api-server-count", "2", "--shutdown-timeout", str(shutdown_timeout))
    try:
        api_pids = _api_pids(url, 2)
        processes = _descendants(proc.pid)
        core = set(_spawned(proc.pid)) - api_pids
        assert len(core) == 1
        streams = _open_streams_on_every_process(url, api_pids, max_tokens)
        if group:
            for pid in (proc.pid, *api_pids, *core):
                os.kill(pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        for pid, stream in streams.items():
            reason, completion_tokens = _finish(stream)
            assert reason == finish_reason, pid
            assert completion_tokens == max_tokens if finish_reason == "length" else completion_tokens < max_tokens
        _assert_clean_exit(proc, processes)
    finally:
        _kill(proc)


def test_a_killed_api_process_stops_the_server_after_the_other_drained(ckpt):
    """Documented policy (docs/server.md): the core aborts the dead process's requests and serves the other on; the
    parent says which process died, the other drains (its stream finishes), everything exits, status 1."""
    proc, url = _serve(ckpt, "--api-server-count", "2", "--log-level", "info")
    try:
        api_pids = _api_pids(url, 2)
        processes = _descendants(proc.pid)
        victim, survivor = sorted(api_pids)
        streams = _open_streams_on_every_process(url, api_pids, 300)
        os.kill(victim, signal.SIGKILL)
        client, context, lines, _ = streams[victim]
        with pytest.raises(httpx.HTTPError):
            list(lines)  # its connection is gone with it
        context.__exit__(None, None, None)
        client.close()
        assert _finish(streams[survivor]) == ("length", 300)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 1, stderr
        assert f"(pid {victim}) exited with code -9: stopping the server" in stderr
        assert re.search(r"API process \d left; [1-9]\d* of its requests aborted", stderr)  # its KV blocks freed
        assert "Traceback" not in stderr, stderr
        _assert_gone(processes)  # the killed process's chat template workers too (their stdin closed)
    finally:
        _kill(proc)


def test_options_that_exclude_several_api_processes_are_refused(ckpt):
    run = dict(capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    base = ["-m", "light_moe.server.serve", "--model", str(ckpt), "--device", "cpu"]
    refused = subprocess.run([sys.executable, *base, "--api-server-count", "2", "--no-engine-process"], **run)
    assert refused.returncode != 0 and "needs the engine-core process" in refused.stderr
    refused = subprocess.run([sys.executable, *base, "--api-server-count", "0"], **run)
    assert refused.returncode != 0 and "--api-server-count must be at least 1" in refused.stderr
    with socket.socket() as taken:  # the port is bound once, by the parent, before the engine loads
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        refused = subprocess.run([sys.executable, *base, "--api-server-count", "2", "--port", str(port)], **run)
    assert refused.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in refused.stderr
    assert "Traceback" not in refused.stderr and time.monotonic() - start < 30


def test_the_api_processes_sockets_share_a_port_no_other_server_can_take():
    from light_moe.server.api_servers import bind_sockets

    group = bind_sockets("127.0.0.1", 0, 3)
    try:
        port = group[0].getsockname()[1]
        assert [s.getsockname()[1] for s in group] == [port] * 3
        assert len({s.fileno() for s in group}) == (3 if sys.platform.startswith("linux") else 1)
        for s in group[:1]:  # one API process serves
            s.listen()
        with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            bind_sockets("127.0.0.1", port, 2)  # a second server on its port
    finally:
        for s in group:
            s.close()
