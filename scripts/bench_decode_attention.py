"""Decode attention timing: the CuTe paged decode kernel (kernels/decode_attention.py) against the engine's
reference (ops/attention.py paged_attention: gather the blocks, then SDPA), Mixtral's heads by default.

    python scripts/bench_decode_attention.py [--out result.json] [--sweep]

Shape: B sequences of one context length each (random non-contiguous block tables, int64 tables and lengths
as the engine builds them, bs = 16), h = 32, g = 8, D = 128, bf16. Every call reads a different layer's cache
(as many layers as keep the caches beyond the L2 cache, >= 256 MB in all), so the K/V really come from HBM,
as in a model step. A CUDA graph holds one call per layer; the time per call is the graph's median replay time
(CUDA events) over the calls. KV TB/s = bytes of K and V read (B * ctx * g * D * 2 * 2) / time per call.
"merged us": the same with merge_counters (the last split CTA merges, no combine kernel; equal to the combine's
output bit for bit, checked). --sweep adds forced split counts and KT = 32 for D = 128 (tuning data).
"""
from __future__ import annotations

import argparse
import math

import torch

from light_moe.bench.env import environment, write_result
from light_moe.bench.timing import graph_replay, time_us
from light_moe.kernels import decode_attention as da
from light_moe.ops.attention import AttentionMetadata, paged_attention

L2_BEATING_BYTES = 256 << 20


class Case:
    def __init__(self, batch: int, ctx: int, heads: int, kv_heads: int, head_dim: int, block_size: int, gen):
        self.batch, self.ctx = batch, ctx
        dev = "cuda"
        blocks = -(-ctx // block_size)
        self.kv_bytes = batch * ctx * kv_heads * head_dim * 2 * 2
        self.layers = max(1, -(-L2_BEATING_BYTES // self.kv_bytes))
        num_blocks = batch * blocks + 1
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.caches = [(torch.randn(shape, generator=gen, device=dev).to(torch.bfloat16),
                        torch.randn(shape, generator=gen, device=dev).to(torch.bfloat16)) for _ in range(self.layers)]
        perm = torch.randperm(num_blocks - 1, generator=gen, device=dev) + 1
        self.tables = perm[:batch * blocks].view(batch, blocks).to(torch.int64)
        self.ctx_lens = torch.full((batch,), ctx, dtype=torch.int64, device=dev)
        self.q = torch.randn(batch, heads, head_dim, generator=gen, device=dev).to(torch.bfloat16)
        self.out = torch.empty_like(self.q)
        self.scale = 1.0 / math.sqrt(head_dim)
        self.meta = AttentionMetadata(
            slot_mapping=torch.zeros(batch, dtype=torch.long, device=dev), block_tables=self.tables,
            ctx_lens=self.ctx_lens, query_pos=(self.ctx_lens - 1).view(batch, 1),
            padded_index=torch.arange(batch, device=dev), max_query_len=1, max_ctx_len=blocks * block_size)

    def kernel(self, **overrides):
        if overrides.pop("merged", False):
            overrides["merge_counters"] = torch.zeros(self.batch * self.q.shape[1], dtype=torch.int32,
                                                      device=self.q.device)  # >= B * g

        def run():
            for k_cache, v_cache in self.caches:
                da.decode_attention(self.q, k_cache, v_cache, self.tables, self.ctx_lens, self.scale, out=self.out,
                                    **overrides)
        return run

    def reference(self):
        def run():
            for k_cache, v_cache in self.caches:
                paged_attention(self.q, k_cache, v_cache, self.meta, self.scale)
        return run

    def time_per_call(self, fn, iters: int) -> float:
        return time_us(graph_replay(fn), iters) / self.layers

    def check(self) -> float:
        """rel L2 of the kernel against the reference on the first layer (the timing must time a correct kernel)."""
        k_cache, v_cache = self.caches[0]
        ref = paged_attention(self.q, k_cache, v_cache, self.meta, self.scale).float()
        out = da.decode_attention(self.q, k_cache, v_cache, self.tables, self.ctx_lens, self.scale).float()
        counters = torch.zeros(self.batch * self.q.shape[1], dtype=torch.int32, device=self.q.device)
        merged = da.decode_attention(self.q, k_cache, v_cache, self.tables, self.ctx_lens, self.scale,
                                     merge_counters=counters).float()
        if not torch.equal(merged, out) or counters.any():
            raise AssertionError("the in-kernel merge differs from the combine kernel's, or left a counter set")
        return ((out - ref).norm() / ref.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON result path (printed if omitted)")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--contexts", default="256,2048")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also forced split counts and KT = 32")
    args = parser.parse_args()

    gen = torch.Generator(device="cuda").manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    print(f"{torch.cuda.get_device_name()}, h={args.heads} g={args.kv_heads} D={args.head_dim} bs={args.block_size}")
    print(f"{'B':>4} {'ctx':>5} {'S':>3} {'kernel us':>10} {'merged us':>10} {'ref us':>9} {'speedup':>8} "
          f"{'kernel TB/s':>12} {'ref TB/s':>9} {'relL2':>8}")
    for batch in map(int, args.batches.split(",")):
        for ctx in map(int, args.contexts.split(",")):
            case = Case(batch, ctx, args.heads, args.kv_heads, args.head_dim, args.block_size, gen)
            err = case.check()
            kt = da.keys_per_tile(args.head_dim)
            splits, _ = da.choose_splits(batch, args.kv_heads, case.tables.shape[1], args.block_size, kt, sms)
            ours = case.time_per_call(case.kernel(), args.iters)
            merged = case.time_per_call(case.kernel(merged=True), args.iters)
            ref = case.time_per_call(case.reference(), args.iters)
            row = dict(batch=batch, ctx=ctx, splits=splits, tile_keys=kt, kernel_us=ours, merged_us=merged,
                       reference_us=ref,
                       kernel_tbps=case.kv_bytes / ours / 1e6, reference_tbps=case.kv_bytes / ref / 1e6,
                       rel_l2=err, layers=case.layers)
            rows.append(row)
            print(f"{batch:>4} {ctx:>5} {splits:>3} {ours:>10.1f} {merged:>10.1f} {ref:>9.1f} {ref / ours:>7.1f}x "
                  f"{row['kernel_tbps']:>12.2f} {row['reference_tbps']:>9.2f} {err:>8.1e}", flush=True)
            if args.sweep:
                variants = {f"S={s}": dict(num_splits=s) for s in sorted({1, max(1, splits // 2), 2 * splits,
                                                                          4 * splits})}
                if args.head_dim == 128:
                    variants["KT=32"] = dict(tile_keys=32)
                for label, overrides in variants.items():
                    t = case.time_per_call(case.kernel(**overrides), args.iters)
                    rows.append(dict(batch=batch, ctx=ctx, variant=label, kernel_us=t,
                                     kernel_tbps=case.kv_bytes / t / 1e6))
                    print(f"{'':>4} {'':>5} {label:>9} {t:>10.1f} us {case.kv_bytes / t / 1e6:>6.2f} TB/s", flush=True)
            del case
            torch.cuda.empty_cache()
    write_result(dict(benchmark="decode_attention", env=environment(), sms=sms, heads=args.heads,
                      kv_heads=args.kv_heads, head_dim=args.head_dim, block_size=args.block_size, rows=rows),
                 args.out)


if __name__ == "__main__":
    main()
