"""End-to-end throughput: prefill and decode tokens/s of the whole engine for given batch sizes.

Prefill time runs from submitting the batch until every request has its first token; decode time
from then until the last token. Prompts are random token ids; EOS is ignored so every request
generates exactly output_len tokens. With --shape (mixtral, deepseek-v2-lite, gpt-oss-20b: bench/shapes.py)
the model is that release's shape cut to --layers layers, with random weights.

Each row also has the bytes a decode step must move (light_moe/bench/bytes_model.py) and the decode
tokens/s they allow at --bandwidth-tbps, and the run ends with the time to first token of one prompt
alone (docs/performance.md).
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from light_moe.bench.bytes_model import (
    DEFAULT_BANDWIDTH_TBPS,
    ModelBytes,
    bound_tok_s,
    decode_step_bytes,
    model_bytes,
    prefill_bytes,
)
from light_moe.bench.env import environment, write_result
from light_moe.bench.shapes import shape_label, write_shaped_model


def bench_model(args) -> tuple[Path, str, Path | None]:
    """(model directory, load_format, temporary directory to remove or None) for a benchmark's
    --model / --shape / --layers: a release's shape with random weights (bench/shapes.py), a given checkpoint,
    or the bundled demo model."""
    if args.shape is not None:
        tmp = Path(tempfile.mkdtemp(prefix="light-moe-bench-"))
        return write_shaped_model(tmp, args.shape, args.layers), "dummy", tmp
    if args.model is not None:
        return Path(args.model), "auto", None
    from light_moe.assets import DEMO_MODEL_DIR

    return DEMO_MODEL_DIR, "auto", None


def run_e2e(engine, batch_sizes: list[int], input_len: int, output_len: int, seed: int = 0,
            repeats: int = 1, bandwidth_tbps: float = DEFAULT_BANDWIDTH_TBPS) -> list[dict]:
    """Prefill and decode throughput per batch size: one warm-up batch, then `repeats` measured batches of
    fresh random prompts; the figures are the medians over the repeats (each repeat's in the *_runs lists).
    Each row also carries the decode bytes model and its bound at `bandwidth_tbps` (decode_bound; not
    under expert parallelism)."""
    from light_moe import SamplingParams

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    weights = engine_model_bytes(engine)
    rows = []
    for batch in batch_sizes:
        # warm-up with the same batch: kernel compilation and CUDA-graph capture for every batch and
        # context bucket the measured run will meet happen here, not inside the timing
        measured_hits = _warm_up(engine, gen, vocab, batch, input_len, params)
        runs = [_timed_batch(engine, gen, vocab, batch, input_len, params) for _ in range(repeats)]
        prefill = [batch * input_len / p for p, _, _ in runs]
        decode_tokens = batch * (output_len - 1)
        decode = [decode_tokens / d if d > 0 else float("nan") for _, d, _ in runs]
        row = dict(batch=batch, input_len=input_len, output_len=output_len, steps=runs[-1][2],
                   prefill_s=statistics.median(p for p, _, _ in runs),
                   decode_s=statistics.median(d for _, d, _ in runs),
                   prefill_tok_s=statistics.median(prefill), decode_tok_s=statistics.median(decode),
                   repeats=repeats, prefill_tok_s_runs=prefill, decode_tok_s_runs=decode)
        if weights is not None:
            row.update(decode_bound(weights, batch, input_len, output_len, bandwidth_tbps, row["decode_tok_s"],
                                    measured_hits))
        rows.append(row)
    return rows


def engine_model_bytes(engine) -> ModelBytes | None:
    """The bytes model of a one-process engine's loaded model (KV cache in the engine's dtype); None under
    expert parallelism, where the model is split over processes."""
    if engine.workers is not None:
        return None
    return model_bytes(engine.model, torch.empty((), dtype=engine.config.dtype).element_size())


def decode_bound(weights: ModelBytes, batch: int, input_len: int, output_len: int, bandwidth_tbps: float,
                 decode_tok_s: float, measured_hits: list[float] | None = None) -> dict:
    """The bytes of a decode step of `batch` sequences at the mean context of the decode phase
    (input_len + output_len / 2), with experts hit under uniform random routing, the bound they set at
    `bandwidth_tbps` and the share of it reached; the same with the routing measured in the warm-up when
    given. Keys: see docs/performance.md."""
    bandwidth = bandwidth_tbps * 1e12
    context = input_len + output_len / 2
    step = decode_step_bytes(weights, batch, context)
    bound = bound_tok_s(batch, step, bandwidth)
    out = dict(bandwidth_tbps=bandwidth_tbps, mean_context=context, bytes_per_step=step.total,
               bytes_per_step_parts=step.as_dict(), experts_hit_uniform=step.experts_hit[0] if step.experts_hit
               else 0.0, bound_tok_s=bound, pct_of_bound=100 * decode_tok_s / bound,
               experts_hit_measured=measured_hits)
    if measured_hits is not None:
        measured = decode_step_bytes(weights, batch, context, measured_hits)
        measured_bound = bound_tok_s(batch, measured, bandwidth)
        out.update(bytes_per_step_measured_routing=measured.total, bound_tok_s_measured_routing=measured_bound,
                   pct_of_bound_measured_routing=100 * decode_tok_s / measured_bound)
    return out


def _warm_up(engine, gen, vocab: int, batch: int, input_len: int, params) -> list[float] | None:
    """Run one untimed batch; returns the distinct experts hit per MoE layer, averaged over its decode steps
    of the full batch (from the engine's per-step expert load, read once per step: fine untimed), or None
    when there is none to read (expert parallelism, or no decode step)."""
    runner = engine.runner if engine.workers is None else None
    ids = {engine.add_request(torch.randint(0, vocab, (input_len,), generator=gen).tolist(), params)
           for _ in range(batch)}
    have_first, hits = set(), []
    decoding = False  # set after the call that returned the last first token: later launches are decode steps
    while engine.has_unfinished_requests():
        steps = engine.stats["steps"]
        outputs = engine.step()
        launched = engine.stats["steps"] > steps
        if decoding and launched and runner is not None and engine.stats["last_batch_size"] == batch:
            load = runner.expert_load()
            if load:
                hits.append([int((tokens > 0).sum()) for tokens in load])
        have_first.update(o.request_id for o in outputs if o.request_id in ids)
        decoding = decoding or len(have_first) == batch
    if not hits:
        return None
    return [statistics.fmean(layer) for layer in zip(*hits)]


def measure_ttft(engine, input_len: int, repeats: int, bandwidth_tbps: float, seed: int = 1) -> dict:
    """Time to first token of one prompt of input_len alone (max_tokens=1): from add_request until its token
    is on the host, after one untimed prompt; the median of `repeats`, each in ttft_ms_runs. Also the time
    to stream every weight the prompt touches once at bandwidth_tbps (prefill_bytes), for reference."""
    from light_moe import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    device = engine.config.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    times = []
    for i in range(repeats + 1):
        prompt = torch.randint(0, vocab, (input_len,), generator=gen).tolist()
        seconds, _ = first_token_seconds(engine, prompt, params, sync)
        if i > 0:  # the first prompt compiles the prefill kernels of this length
            times.append(1e3 * seconds)
    out = dict(input_len=input_len, repeats=repeats, ttft_ms_p50=statistics.median(times), ttft_ms_runs=times)
    weights = engine_model_bytes(engine)
    if weights is not None:
        prompt_bytes = prefill_bytes(weights, input_len)
        out.update(prefill_bytes=prompt_bytes.total, bandwidth_tbps=bandwidth_tbps,
                   weights_stream_ms=1e3 * prompt_bytes.total / (bandwidth_tbps * 1e12))
    return out


def first_token_seconds(engine, prompt: list[int], params, sync=None) -> tuple[float, int]:
    """(seconds from add_request until the prompt's first output comes out of engine.step, step calls); the
    engine is drained afterwards. sync (a device synchronize), if given, runs before the clock starts, so no
    earlier work is in the figure, and before it stops, so every kernel the prompt launched has run."""
    if sync is not None:
        sync()
    start = time.perf_counter()
    rid = engine.add_request(prompt, params)
    calls, done = 0, False
    while not done:
        if not engine.has_unfinished_requests():
            raise RuntimeError(f"request {rid} finished without an output")
        done = any(o.request_id == rid for o in engine.step())
        calls += 1
    if sync is not None:
        sync()
    seconds = time.perf_counter() - start
    engine.abort(rid)  # a request with more tokens to go
    while engine.has_unfinished_requests():
        engine.step()
    return seconds, calls


def _timed_batch(engine, gen, vocab: int, batch: int, input_len: int, params) -> tuple[float, float, int]:
    """(seconds until every request has its first token, seconds after that until all finish, steps)."""
    prompts = [torch.randint(0, vocab, (input_len,), generator=gen).tolist() for _ in range(batch)]
    ids = {engine.add_request(p, params) for p in prompts}
    have_first, done = set(), set()
    start = time.perf_counter()
    prefill_end = None
    steps = 0
    while len(done) < batch:
        for out in engine.step():
            if out.request_id in ids:
                have_first.add(out.request_id)
                if out.finished:
                    done.add(out.request_id)
        steps += 1
        if prefill_end is None and len(have_first) == batch:
            prefill_end = time.perf_counter()
    end = time.perf_counter()
    return prefill_end - start, end - prefill_end, steps


def print_table(rows: list[dict], ttft: dict | None) -> None:
    """The rows as a table (bound columns blank where there is no bytes model), then the TTFT line."""
    print(f"{'batch':>6} {'decode tok/s':>13} {'bound tok/s':>12} {'% bound':>8} {'GB/step':>8} "
          f"{'experts/layer unif|meas':>24} {'prefill tok/s':>14} {'steps':>6}")
    for r in rows:
        bound = "bound_tok_s" in r
        measured = r.get("experts_hit_measured")
        hits = (f"{r['experts_hit_uniform']:.2f} | " + (f"{statistics.fmean(measured):.2f}" if measured else "-")
                if bound else "-")
        print(f"{r['batch']:>6} {r['decode_tok_s']:>13.1f} "
              + (f"{r['bound_tok_s']:>12.1f} {r['pct_of_bound']:>7.1f}% {r['bytes_per_step'] / 1e9:>8.3f} "
                 if bound else f"{'-':>12} {'-':>8} {'-':>8} ")
              + f"{hits:>24} {r['prefill_tok_s']:>14.1f} {r['steps']:>6}")
    if ttft is not None:
        stream = (f"; weights stream {ttft['weights_stream_ms']:.2f} ms at {ttft['bandwidth_tbps']} TB/s"
                  if "weights_stream_ms" in ttft else "")
        print(f"TTFT (one prompt of {ttft['input_len']} tokens alone, p50 of {ttft['repeats']}): "
              f"{ttft['ttft_ms_p50']:.2f} ms{stream}")


def main(args) -> dict:
    from light_moe import LightMoEEngine
    from light_moe.cli_args import async_kwargs
    from light_moe.engine.args import EngineArgs

    model_path, load_format, tmp = bench_model(args)
    try:
        engine = LightMoEEngine.from_engine_args(EngineArgs.from_cli_args(
            args, model=model_path, load_format=load_format, max_num_seqs=max(args.batch_sizes),
            max_model_len=args.max_model_len or args.input_len + args.output_len + 16))
        rows = run_e2e(engine, args.batch_sizes, args.input_len, args.output_len, repeats=args.repeats,
                       bandwidth_tbps=args.bandwidth_tbps)
        ttft = (measure_ttft(engine, args.input_len, args.ttft_repeats, args.bandwidth_tbps)
                if args.ttft_repeats > 0 else None)
        weights = engine_model_bytes(engine)
        engine.shutdown()  # expert parallelism: stops the workers (spawned, or torchrun's other ranks)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result = dict(benchmark="e2e", env=environment(), model=str(model_path) if tmp is None else
                  shape_label(args.shape, args.layers), dtype=str(engine.config.dtype),
                  moe_backend=engine.ops.name, expert_parallel_size=engine.config.parallel.expert_parallel_size,
                  quantization=None if engine.config.quantization is None
                  else engine.config.quantization.name, rows=rows, ttft=ttft,
                  bandwidth_tbps=args.bandwidth_tbps, bytes_model=None if weights is None else weights.as_dict(),
                  # the execution options an A/B toggles, so that each JSON says which side it is
                  engine_options={name: getattr(engine.config, name) for name in (
                      "skinny_gemm", "skinny_gemm_max_rows", "fuse_combine_norm", "fuse_attention_merge",
                      "w4a16_decode_kernel", "w4a16_prefetch_down", "w4a16_fused_decode",
                      "enable_cuda_graphs")},
                  **async_kwargs(args))
    print_table(rows, ttft)
    write_result(result, args.output)
    return result
