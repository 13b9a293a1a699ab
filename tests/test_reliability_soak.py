"""Soak (issue 19): a few hundred requests against a real uvicorn on loopback, 24 at a time, with clients
that disconnect (mid-stream, mid-generation, mid-upload) and bad inputs mixed in among good ones. At the end
nothing is running or waiting, the KV cache is empty, no request failed in the engine or got a 5xx, and
every good request completed with the text the engine gives on its own.

Bounded: a fixed seed picks the mix; 8-token completions on a tiny model; every client call has a timeout.
"""
import asyncio
import json
import random

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from light_moe import SamplingParams  # noqa: E402
from tests.test_server import MODEL, _engine, _metric, _metrics, _running_server, _sse_events, _wait_idle  # noqa: E402
from tests.tiny_models import make_tiny_checkpoint  # noqa: E402

NUM_REQUESTS, CONCURRENCY, MAX_TOKENS = 300, 24, 8
PROMPTS = ["def fibonacci(n):", "The quick brown fox", "import os\nimport sys", "Mixture of experts",
           "print('hello world')", "Light-MoE serves"]
CHATS = [[{"role": "user", "content": "Say hello"}],
         [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Count to three"}]]
SEEDS = [11, 22]
BAD = [  # (body: dict or raw bytes, route, expected status)
    (b'{"model": "tiny-moe", "prompt": ', "/v1/completions", 400),
    ({"prompt": "hi", "top_k": 9223372036854775808, "top_p": 0.9}, "/v1/completions", 400),
    (b'{"prompt": "hi", "temperature": Infinity}', "/v1/completions", 400),
    (b'{"prompt": "hi \\ud800"}', "/v1/completions", 400),
    ({"messages": [{"role": "user|>\n<|system", "content": "hi"}]}, "/v1/chat/completions", 400),
    ({"prompt": list(range(5, 300))}, "/v1/completions", 400),
    ({"prompt": "hi", "model": "gpt-9"}, "/v1/completions", 404),
    ({"prompt": "x" * 70_000}, "/v1/completions", 413),
    ({"prompt": "hi", "max_tokens": 0}, "/v1/completions", 400),
    ({"messages": []}, "/v1/chat/completions", 400),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3"), max_position_embeddings=256)


def _expected(ckpt) -> dict:
    engine = _engine(ckpt)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    expected = {("completion", p): o.text for p, o in zip(PROMPTS, engine.generate_outputs(PROMPTS, greedy))}
    for i, messages in enumerate(CHATS):
        expected[("chat", i)] = engine.chat(messages, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    for seed in SEEDS:
        expected[("seeded", seed)] = engine.generate(PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.8, seed=seed,
                                                     ignore_eos=True)
    engine.shutdown()
    return expected


def test_soak_with_disconnects_and_bad_inputs(ckpt):
    expected = _expected(ckpt)
    rng = random.Random(19)
    kinds = rng.choices(["good", "good_stream", "chat", "seeded", "drop_stream", "drop_wait", "drop_upload", "bad"],
                        weights=[5, 4, 2, 1, 2, 1, 1, 3], k=NUM_REQUESTS)
    with _running_server(_engine(ckpt, max_num_seqs=16), max_body_bytes=64 * 1024, body_timeout_s=5.0) as url:
        port = int(url.rsplit(":", 1)[1])
        results: list[tuple[str, object, object]] = []  # (kind, expected, got)

        async def one(client: httpx.AsyncClient, kind: str, r: random.Random) -> None:
            base = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
            if kind in ("good", "drop_wait"):
                prompt = r.choice(PROMPTS)
                try:
                    response = await client.post(f"{url}/v1/completions", json={**base, "prompt": prompt},
                                                 timeout=0.05 if kind == "drop_wait" else 120)
                except httpx.TimeoutException:
                    assert kind == "drop_wait"
                    return
                assert response.status_code == 200, response.text
                results.append((kind, expected[("completion", prompt)], response.json()["choices"][0]["text"]))
            elif kind in ("good_stream", "drop_stream"):
                prompt = r.choice(PROMPTS)
                body = {**base, "prompt": prompt, "stream": True}
                async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
                    assert response.status_code == 200
                    lines = []
                    async for line in response.aiter_lines():
                        lines.append(line)
                        if kind == "drop_stream" and len(_sse_events(lines)) == 2:
                            return  # leaving the block closes the connection mid-stream
                events = _sse_events(lines)
                assert events[-1] == "[DONE]"
                chunks = [json.loads(e) for e in events[:-1]]
                assert chunks[-1]["choices"][0]["finish_reason"] == "length"
                text = "".join(c["choices"][0]["text"] for c in chunks)
                results.append((kind, expected[("completion", prompt)], text))
            elif kind == "chat":
                i = r.randrange(len(CHATS))
                response = await client.post(f"{url}/v1/chat/completions", json={**base, "messages": CHATS[i]},
                                             timeout=120)
                assert response.status_code == 200, response.text
                results.append((kind, expected[("chat", i)], response.json()["choices"][0]["message"]["content"]))
            elif kind == "seeded":
                seed = r.choice(SEEDS)
                body = {**base, "prompt": PROMPTS[0], "temperature": 0.8, "seed": seed}
                response = await client.post(f"{url}/v1/completions", json=body, timeout=120)
                assert response.status_code == 200, response.text
                results.append((kind, expected[("seeded", seed)], response.json()["choices"][0]["text"]))
            elif kind == "drop_upload":
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 5000\r\n\r\n" + b'{"prompt": "he')
                await writer.drain()
                await asyncio.sleep(r.uniform(0.0, 0.2))
                writer.close()
            else:
                payload, route, status = r.choice(BAD)
                if isinstance(payload, bytes):
                    response = await client.post(f"{url}{route}", content=payload, timeout=60,
                                                 headers={"content-type": "application/json"})
                else:
                    response = await client.post(f"{url}{route}", json={"model": MODEL, **payload}, timeout=60)
                assert response.status_code == status, (payload, response.text)
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        async def main() -> None:
            gate = asyncio.Semaphore(CONCURRENCY)
            limits = httpx.Limits(max_connections=CONCURRENCY * 2)
            async with httpx.AsyncClient(limits=limits) as client:
                async def gated(kind: str, seed: int) -> None:
                    async with gate:
                        await one(client, kind, random.Random(seed))

                await asyncio.gather(*(gated(kind, i) for i, kind in enumerate(kinds)))

        asyncio.run(main())
        samples = _wait_idle(url, timeout=60)  # nothing running or waiting, no KV block held
        good = sum(kind in ("good", "good_stream", "chat", "seeded") for kind in kinds)
        assert len(results) == good
        wrong = [(kind, want, got) for kind, want, got in results if want != got]
        assert not wrong, wrong[:5]
        assert _metric(samples, "light_moe_requests_finished_total", finish_reason="error") == 0
        assert _metric(samples, "light_moe_requests_finished_total", finish_reason="abort") >= kinds.count(
            "drop_stream")
        for route in ("/v1/completions", "/v1/chat/completions"):
            assert _metric(samples, "light_moe_http_requests_total", route=route, status="500") == 0
        assert httpx.get(f"{url}/health").status_code == 200
        assert _metric(_metrics(url), "light_moe_kv_cache_usage_ratio") == 0
