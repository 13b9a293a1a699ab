"""End-to-end throughput: prefill and decode tokens/s of the whole engine for given batch sizes.

Prefill time runs from submitting the batch until every request has its first token; decode time
from then until the last token. Prompts are random token ids; EOS is ignored so every request
generates exactly output_len tokens. With --shape mixtral the model is Mixtral-8x7B's layer shape
(E=8, H=4096, I=14336, top-2, 32 heads, 8 KV heads) cut to --layers layers, with random weights.
"""
from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from light_moe.bench.env import environment, write_result

MIXTRAL_8X7B = dict(
    architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=32000, hidden_size=4096,
    intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
    rms_norm_eps=1e-5, rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False,
    torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)


def write_shaped_model(out: Path, layers: int) -> Path:
    """config.json of the Mixtral-8x7B shape with `layers` layers, plus a small tokenizer (ids only)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**MIXTRAL_8X7B, "num_hidden_layers": layers}))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["benchmark text"], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(out / "tokenizer.json"))
    return out


def bench_model(args) -> tuple[Path, str, Path | None]:
    """(model directory, load_format, temporary directory to remove or None) for a benchmark's
    --model / --shape / --layers: the Mixtral shape with random weights, a given checkpoint, or the
    bundled demo model."""
    if args.shape == "mixtral":
        tmp = Path(tempfile.mkdtemp(prefix="light-moe-bench-"))
        return write_shaped_model(tmp, args.layers), "dummy", tmp
    if args.model is not None:
        return Path(args.model), "auto", None
    from light_moe.assets import DEMO_MODEL_DIR

    return DEMO_MODEL_DIR, "auto", None


def run_e2e(engine, batch_sizes: list[int], input_len: int, output_len: int, seed: int = 0,
            repeats: int = 1) -> list[dict]:
    """Prefill and decode throughput per batch size: one warm-up batch, then `repeats` measured batches of
    fresh random prompts; the figures are the medians over the repeats (each repeat's in the *_runs lists)."""
    from light_moe import SamplingParams

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    rows = []
    for batch in batch_sizes:
        # warm-up with the same batch: kernel compilation and CUDA-graph capture for every batch and
        # context bucket the measured run will meet happen here, not inside the timing
        engine.generate_outputs([torch.randint(0, vocab, (input_len,), generator=gen).tolist()
                                 for _ in range(batch)], params)
        runs = [_timed_batch(engine, gen, vocab, batch, input_len, params) for _ in range(repeats)]
        prefill = [batch * input_len / p for p, _, _ in runs]
        decode_tokens = batch * (output_len - 1)
        decode = [decode_tokens / d if d > 0 else float("nan") for _, d, _ in runs]
        rows.append(dict(batch=batch, input_len=input_len, output_len=output_len, steps=runs[-1][2],
                         prefill_s=statistics.median(p for p, _, _ in runs),
                         decode_s=statistics.median(d for _, d, _ in runs),
                         prefill_tok_s=statistics.median(prefill), decode_tok_s=statistics.median(decode),
                         repeats=repeats, prefill_tok_s_runs=prefill, decode_tok_s_runs=decode))
    return rows


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


def main(args) -> dict:
    from light_moe import LightMoEEngine
    from light_moe.cli import async_kwargs, parallel_kwargs, quant_kwargs

    model_path, load_format, tmp = bench_model(args)
    try:
        engine = LightMoEEngine(model_path, dtype=args.dtype, device=args.device, load_format=load_format,
                                max_model_len=args.input_len + args.output_len + 16,
                                max_num_seqs=max(args.batch_sizes), moe_backend=args.moe_backend,
                                max_num_batched_tokens=args.max_num_batched_tokens, show_progress=False,
                                **async_kwargs(args),
                                **parallel_kwargs(args), **quant_kwargs(args))
        rows = run_e2e(engine, args.batch_sizes, args.input_len, args.output_len, repeats=args.repeats)
        engine.shutdown()  # expert parallelism: stops the workers (spawned, or torchrun's other ranks)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result = dict(benchmark="e2e", env=environment(), model=str(model_path) if tmp is None else
                  f"mixtral-8x7b-shape-{args.layers}-layers (random weights)", dtype=str(engine.config.dtype),
                  moe_backend=engine.ops.name, expert_parallel_size=engine.config.parallel.expert_parallel_size,
                  quantization=None if engine.config.quantization is None
                  else engine.config.quantization.name, rows=rows, **async_kwargs(args))
    print(f"{'batch':>6} {'prefill tok/s':>14} {'decode tok/s':>13} {'steps':>6}")
    for r in rows:
        print(f"{r['batch']:>6} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f} {r['steps']:>6}")
    write_result(result, args.output)
    return result
