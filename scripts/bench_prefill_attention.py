"""Time the paged prefill attention kernel against the gather + SDPA reference (light_moe.ops.attention).

    python scripts/bench_prefill_attention.py --out prefill_attention.json

Shape legend: h query heads, g KV heads, D head_dim (Mixtral: 32, 8, 128), bs cache block size.
Cases (q_len, ctx_len per sequence): one 128-token prompt, one 2048-token prompt, 8 x 512-token prompts, a
512-token chunk on a 1536-token cached prefix. Per case: median microseconds per call, CUDA-event timed
after warm-up, both eagerly (the kernel's Python launch included) and as a CUDA-graph replay (device time),
for the kernel at both query tiles (64 is the default) and for the reference. Prints a table, writes JSON.
"""
import argparse
import itertools
import json
import math
import platform

import torch

from light_moe.bench.timing import graph_replay, time_us
from light_moe.kernels import prefill_attention as pa
from light_moe.ops.attention import AttentionMetadata, paged_attention

CASES = {
    "prompt_128": [(128, 128)],
    "prompt_2048": [(2048, 2048)],
    "8x_prompt_512": [(512, 512)] * 8,
    "chunk_512_on_1536": [(512, 2048)],
}


def make_case(seqs, h, g, d, block_size, gen):
    dev = "cuda"
    blocks = [-(-ctx // block_size) for _, ctx in seqs]
    num_blocks = sum(blocks) + 1
    k_cache = torch.randn(num_blocks, block_size, g, d, generator=gen, device=dev).bfloat16()
    v_cache = torch.randn(num_blocks, block_size, g, d, generator=gen, device=dev).bfloat16()
    perm = torch.randperm(num_blocks, generator=gen, device=dev).to(torch.int32)
    tables = torch.zeros(len(seqs), max(blocks), dtype=torch.int32, device=dev)
    used = 0
    for b, n in enumerate(blocks):
        tables[b, :n] = perm[used:used + n]
        used += n
    q_lens = [q for q, _ in seqs]
    query_start = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=dev)
    ctx_lens = torch.tensor([c for _, c in seqs], dtype=torch.int32, device=dev)
    q = torch.randn(sum(q_lens), h, d, generator=gen, device=dev).bfloat16()

    max_q, max_c = max(q_lens), max(c for _, c in seqs)
    query_pos = torch.full((len(seqs), max_q), -1, dtype=torch.int64, device=dev)
    padded_index = []
    for b, (q_len, ctx) in enumerate(seqs):
        query_pos[b, :q_len] = torch.arange(ctx - q_len, ctx, device=dev)
        padded_index += range(b * max_q, b * max_q + q_len)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(sum(q_lens), dtype=torch.int64, device=dev),  # unused by paged_attention
        block_tables=tables.long(), ctx_lens=ctx_lens.long(), query_pos=query_pos,
        padded_index=torch.tensor(padded_index, dtype=torch.int64, device=dev),
        max_query_len=max_q, max_ctx_len=max_c,
    )
    return q, k_cache, v_cache, tables, query_start, ctx_lens, max_q, meta


def time_case(name, case, scale, iters):
    q, k_cache, v_cache, tables, query_start, ctx_lens, max_q, meta = case
    ref_out = paged_attention(q, k_cache, v_cache, meta, scale)
    variants = {"reference": (lambda: paged_attention(q, k_cache, v_cache, meta, scale), None)}
    for bm in (64, 128):
        out = torch.empty_like(q)
        call = (lambda bm=bm, out=out: pa.prefill_attention(q, k_cache, v_cache, tables, query_start, ctx_lens,
                                                            max_q, scale, out=out, block_m=bm))
        variants[f"kernel_bm{bm}"] = (call, out)
    row = dict(seqs=[list(s) for s in zip(
        (query_start[1:] - query_start[:-1]).tolist(), ctx_lens.tolist())],
        default_block_m=pa.DEFAULT_BLOCK_M)
    for vname, (fn, out) in variants.items():
        eager = time_us(fn, iters)
        try:
            graph = time_us(graph_replay(fn), iters)
        except Exception as exc:  # noqa: BLE001 - a reference that cannot be captured is timed eagerly only
            graph = float("nan")
            print(f"  {vname}: graph capture failed: {exc!r}"[:200])
        diff = 0.0 if out is None else (out.float() - ref_out.float()).abs().max().item()
        row[vname] = dict(eager_us=eager, graph_us=graph, max_abs_diff=diff)
        print(f"{name:<20}{vname:<15}{eager:>10.1f}{graph:>10.1f}{diff:>12.2e}")
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", default="32,8,128", help="h,g,D")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None, help="JSON file")
    args = parser.parse_args()
    h, g, d = map(int, args.heads.split(","))
    scale = 1 / math.sqrt(d)
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, python=platform.python_version(),
                   heads=[h, g, d], block_size=args.block_size, cases={})
    print(f"card: {results['card']}; h={h} g={g} D={d} bs={args.block_size}; us per call (median of {args.iters})")
    header = f"{'case':<20}{'variant':<15}{'eager us':>10}{'graph us':>10}{'max |diff|':>12}"
    print(header)
    for name, seqs in CASES.items():
        results["cases"][name] = time_case(name, make_case(seqs, h, g, d, args.block_size, gen), scale, args.iters)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
