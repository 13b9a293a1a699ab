"""MLA decode attention: the absorbed kernel (light_moe/kernels/mla_decode_attention.py) against the PyTorch path it
replaces (gather each sequence's latents out of the paged cache, then SDPA with every head sharing them), at
DeepSeek-V2-Lite's 16 heads and V3's 128, for B sequences of C cached tokens.

    python scripts/bench_mla_decode.py [--heads 16 128] [--batch 1 16 64] [--context 1024 4096] [--out FILE.json]

Shape legend: B sequences, h heads, C context tokens per sequence, L = 512 latent dims, R = 64 rotary dims; the
latent cache is [blocks, block_size, L + R] bf16 with shuffled block tables (as after a while of serving). Both
variants run inside a CUDA graph (as the decode step does), timed in alternating rounds (median CUDA-event time
per call). GB/s = the latent bytes the step must read (B * C * (L + R) * 2) / time. rel_l2: the kernel's output
against the fp32 reference on the same inputs. The result JSON carries the card, versions and commit.
"""
from __future__ import annotations

import argparse

import torch

from light_moe.bench.env import environment, write_result
from light_moe.bench.timing import graph_replay, round_robin, time_us, timing_entry
from light_moe.kernels import mla_decode_attention as mla

LATENT, ROPE = 512, 64


def _reference(q_abs, cache, tables, context, scale):
    """q_abs [B, h, L + R] over the first `context` latents of each table: [B, h, L] (ops/attention.py's absorbed
    path without the W_UK / W_UV products)."""
    batch, blocks = tables.shape
    ctx = cache[tables].reshape(batch, blocks * cache.shape[1], LATENT + ROPE)[:, :context]  # [B, C, L + R]
    # one latent "head" shared by all h query heads: batched matmuls against it, never a copy per head (SDPA's
    # GQA expansion took 77 GB in float32 at h = 128, B = 64, C = 4096)
    scores = torch.bmm(q_abs, ctx.transpose(1, 2)).float() * scale  # [B, h, C]
    return torch.bmm(torch.softmax(scores, -1).to(ctx.dtype), ctx[..., :LATENT])


def _case(heads: int, batch: int, context: int, bs: int, scale: float, rounds: int, iters: int) -> dict:
    blocks = -(-context // bs)
    cache = torch.randn(batch * blocks + 1, bs, LATENT + ROPE, device="cuda").to(torch.bfloat16)
    tables = (torch.randperm(batch * blocks, device="cuda") + 1).view(batch, blocks).to(torch.int32)
    tables_long = tables.long()
    ctx_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q_abs = torch.randn(batch, heads, LATENT + ROPE, device="cuda").to(torch.bfloat16)
    out = torch.empty(batch, heads, LATENT, device="cuda", dtype=torch.bfloat16)
    ref = _reference(q_abs.float(), cache.float(), tables_long, context, scale)
    got = mla.mla_decode_attention(q_abs, cache, tables, ctx_lens, scale, LATENT, out=out)
    err = ((got.float() - ref).norm() / ref.norm()).item()
    variants = {
        "kernel": graph_replay(lambda: mla.mla_decode_attention(q_abs, cache, tables, ctx_lens, scale, LATENT,
                                                                out=out)),
        "torch": graph_replay(lambda: _reference(q_abs, cache, tables_long, context, scale)),
    }
    stats = round_robin(variants, rounds, lambda replay: time_us(replay, iters))
    latent_bytes = batch * context * (LATENT + ROPE) * 2
    row = dict(heads=heads, batch=batch, context=context, block_size=bs, latent_bytes=latent_bytes, rel_l2=err)
    for name, st in stats.items():
        row[name] = timing_entry(st, latent_bytes)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--context", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20, help="timed replays per round")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    scale = (128 + ROPE) ** -0.5  # DeepSeek's softmax scale over qk_nope + rope head dims (before YaRN's factor)
    for heads in args.heads:
        ok, reason = mla.supports(torch.bfloat16, heads, LATENT, ROPE, args.block_size)
        if not ok:
            print(f"h={heads}: skipped ({reason})")
            continue
        for batch in args.batch:
            for context in args.context:
                row = _case(heads, batch, context, args.block_size, scale, args.rounds, args.iters)
                rows.append(row)
                print(f"h={heads:3d} B={batch:2d} C={context:5d}  kernel {row['kernel']['us']:8.2f} us "
                      f"({row['kernel']['gbps']:7.1f} GB/s)  torch {row['torch']['us']:8.2f} us "
                      f"({row['torch']['gbps']:7.1f} GB/s)  rel L2 {row['rel_l2']:.1e}", flush=True)
                torch.cuda.empty_cache()
    write_result(dict(environment(), benchmark="mla_decode", rows=rows), args.out, echo=False)


if __name__ == "__main__":
    main()
