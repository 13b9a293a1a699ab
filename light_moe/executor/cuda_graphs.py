"""CUDA graphs of decode steps.

A decode step of B sequences launches a few hundred small kernels; eagerly each costs ~5-30 us of
host time (CuTe DSL calls 26-35 us, docs/kernels.md), more than the GPU work at small B. A graph
replays them for ~5 us. Graphs are captured lazily, one per (batch bucket, context bucket):
  - batch bucket: the step's sequence count rounded up to 1, 2, 4, 8, 16, 32, 64, 128, 256;
  - context bucket: the longest block table in the step rounded up to a power of two, which fixes
    the key length that the reference paged attention gathers.
Padding rows write their KV to a scratch slot outside the block manager's pool and read block 0;
their outputs are discarded. Only models whose MoE ops are graph-safe (no host sync) are captured.

Under expert parallelism (executor/workers.py) a graph also holds the MoE layers' fixed-capacity
all-to-alls (parallel/dispatch.py), so the key gets a `tag` (the step's exchange capacity), and the
warm-up before a capture runs inside `warmup_context` (the dispatchers' dry run): a capturing rank must
not issue collectives its peers don't, and capture itself only records them; the replay right after
runs them once, like every peer's eager or replayed step.

Shape legend: B padded batch, H hidden, V vocabulary, NB blocks per sequence in the bucket.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Hashable

import torch

from light_moe.executor.pending_tokens import fill_pending_tokens
from light_moe.models.base import MoECausalLM
from light_moe.ops.attention import AttentionMetadata
from light_moe.runtime.host_to_device import copy_to

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _bucket(value: int, buckets) -> int:
    for b in buckets:
        if value <= b:
            return b
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")


class DecodeGraphs:
    def __init__(self, model: MoECausalLM, kv_caches, block_size: int, max_blocks_per_seq: int, scratch_slot: int,
                 max_batch: int, device: torch.device,
                 warmup_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.model = model
        self.warmup_context = warmup_context
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_blocks = max_blocks_per_seq
        self.batch_buckets = tuple(b for b in BATCH_BUCKETS if b < max_batch) + (_bucket(max_batch, BATCH_BUCKETS),)
        self.max_batch = self.batch_buckets[-1]
        self.scratch_slot = scratch_slot
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), scratch_slot, dtype=torch.long, device=device)
        self.ctx_lens = torch.ones(n, dtype=torch.int32, device=device)
        # one contiguous [max batch, NB] table per context bucket (made on first use): the attention kernels
        # take a dense table whose width is the bucket, which also bounds their split-KV work
        self.tables: dict[int, torch.Tensor] = {}
        self.query_pos = torch.zeros(n, 1, dtype=torch.long, device=device)
        self.padded_index = torch.arange(n, dtype=torch.long, device=device)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=device)  # one query row per sequence
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor | None]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def can_run(self, scheduled) -> bool:
        return (len(scheduled) <= self.max_batch
                and all(s.num_new_tokens == 1 and s.samples for s in scheduled))

    def _blocks_bucket(self, blocks: int) -> int:
        bucket = 1
        while bucket < blocks:
            bucket *= 2
        return min(bucket, self.max_blocks)

    def _table(self, blocks: int) -> torch.Tensor:
        if blocks not in self.tables:
            self.tables[blocks] = torch.zeros(self.max_batch, blocks, dtype=torch.int32, device=self.ctx_lens.device)
        return self.tables[blocks]

    def _forward(self, batch: int, blocks: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slots[:batch], block_tables=self._table(blocks)[:batch],
            ctx_lens=self.ctx_lens[:batch], query_pos=self.query_pos[:batch],
            padded_index=self.padded_index[:batch], max_query_len=1, max_ctx_len=blocks * self.block_size,
            query_start=self.query_start[:batch + 1])
        hidden = self.model(self.input_ids[:batch], self.positions[:batch], self.kv_caches, meta)
        return self.model.compute_logits(hidden)  # [B, V]

    def _capture(self, fn: Callable[[], torch.Tensor | None], what: str):
        # warm up on a side stream first: CuTe kernels compile and the allocator settles outside capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), self.warmup_context():
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        logger.info("captured a CUDA graph: %s", what)
        return graph, out

    @torch.inference_mode()
    def warm_up(self, blocks: int = 1) -> int:
        """Capture the decode graph of every batch bucket at the context bucket of `blocks` blocks (tag None) now,
        before any request: the kernels compile and the graphs capture outside the serving path. Only before the
        first step: the static inputs are reset to padding (context 1, the scratch slot). Returns the number of
        graphs captured."""
        self.input_ids.zero_()
        self.positions.zero_()
        self.query_pos.zero_()
        self.slots.fill_(self.scratch_slot)
        self.ctx_lens.fill_(1)
        bucket, captured = self._blocks_bucket(blocks), 0
        self._table(bucket).zero_()
        for batch in self.batch_buckets:
            key = (batch, bucket, None)
            if key not in self.graphs:
                self.graphs[key] = self._capture(lambda b=batch: self._forward(b, bucket),
                                                 f"decode batch {batch}, {bucket} blocks per sequence (warm-up)")
                captured += 1
        return captured

    @torch.inference_mode()
    def replay(self, key: Hashable, fn: Callable[[], None]) -> None:
        """Run fn() from a graph captured on first use of `key`, like a decode step (same warm-up and pool):
        for captured work outside the model forward, e.g. an expert-parallel rank with no sequences that must
        still run every MoE layer's exchange. fn must use only tensors that outlive the graph."""
        key = ("callable", key)
        if key not in self.graphs:
            self.graphs[key] = self._capture(fn, f"{key}")
        self.graphs[key][0].replay()

    def release(self) -> None:
        """Free every captured graph now. Under expert parallelism this must precede destroying the NCCL
        group: a communicator whose collectives live on in captured graphs was seen to hang on destroy."""
        if not self.graphs:
            return
        torch.cuda.synchronize()
        for graph, _ in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        # the allocator drops a private pool once no graph holds it: capturing into its old id again trips
        # an internal assert (seen on the GPU after a rebalance), so later graphs get a new pool
        self.pool = torch.cuda.graph_pool_handle()

    @torch.inference_mode()
    def run(self, scheduled, tag: Hashable = None, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [len(scheduled), V] of a pure-decode step; `tag` tells apart graphs that differ in something
        besides the batch and context buckets (expert parallelism: the exchange capacity); prev_tokens: the
        previous step's sampled tokens for placeholder inputs (model_runner.fill_pending_tokens)."""
        n = len(scheduled)
        batch = _bucket(n, self.batch_buckets)
        bs = self.block_size
        tokens, positions, slots, ctx, tables = [], [], [], [], []
        longest = 1
        for s in scheduled:
            req = s.request
            pos = req.num_computed_tokens
            tokens.append(req.tokens(pos, pos + 1)[0])
            positions.append(pos)
            slots.append(req.block_table[pos // bs] * bs + pos % bs)
            ctx.append(pos + 1)
            tables.append(req.block_table)
            longest = max(longest, len(req.block_table))
        blocks = self._blocks_bucket(longest)
        pad = batch - n
        copy_to(self.input_ids[:batch], tokens + [0] * pad)
        fill_pending_tokens(self.input_ids, tokens, prev_tokens)
        copy_to(self.positions[:batch], positions + [0] * pad)
        self.query_pos[:batch, 0].copy_(self.positions[:batch])  # the same values: a device copy, not a 2nd upload
        copy_to(self.slots[:batch], slots + [self.scratch_slot] * pad)
        copy_to(self.ctx_lens[:batch], ctx + [1] * pad)
        # one host tensor for the whole table: a tensor per row cost ~5 us each at batch 64
        table = [t + [0] * (blocks - len(t)) for t in tables] + [[0] * blocks] * pad
        copy_to(self._table(blocks)[:batch], table)
        key = (batch, blocks, tag)
        if key not in self.graphs:
            self.graphs[key] = self._capture(lambda: self._forward(batch, blocks),
                                             f"decode batch {batch}, {blocks} blocks per sequence, tag {tag}")
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[:n]
