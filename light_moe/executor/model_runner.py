"""One per rank: scheduled batch -> input tensors and attention metadata -> forward -> logits.

Shape legend: N tokens in the step, B sequences, S sampling rows (sequences whose chunk ends at
their last known token), L layers, g KV heads, D head_dim.
The KV cache is one tensor per layer and kind: [num_blocks, block_size, g, D] (K and V), or what the model's
kv_cache_shapes says (MLA: one latent tensor per layer).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Hashable

import torch

from light_moe.config import CacheConfig
from light_moe.executor.batch import ScheduledRequest
from light_moe.executor.cuda_graphs import DecodeGraphs
from light_moe.executor.pending_tokens import fill_pending_tokens
from light_moe.executor.prefill_graphs import PrefillGraphs
from light_moe.models.base import MoECausalLM
from light_moe.ops.attention import AttentionMetadata
from light_moe.runtime.host_to_device import to_device

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 256 * 1024 * 1024


def slot_ids(table: list[int], start: int, count: int, block_size: int) -> list[int]:
    """The KV-cache slots (block * block_size + row) of positions start .. start + count - 1 through a block table:
    one range per block instead of one division per token (a step's inputs are built before its first kernel)."""
    slots: list[int] = []
    pos, end = start, start + count
    while pos < end:
        block = pos // block_size
        block_end = min(end, (block + 1) * block_size)
        offset = table[block] * block_size - block * block_size  # slot = offset + position within this block
        slots.extend(range(offset + pos, offset + block_end))
        pos = block_end
    return slots


def kv_block_bytes(model: MoECausalLM, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block over every layer's cache tensors (MoECausalLM.kv_cache_shapes)."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return sum(math.prod(shape[1:]) * elem for layer in model.kv_cache_shapes(1, block_size) for shape in layer)


class ModelRunner:
    def __init__(
        self,
        model: MoECausalLM,
        cache: CacheConfig,
        dtype: torch.dtype,
        device: torch.device,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int | None = None,
        cuda_graphs: bool = False,
        prefill_graphs: bool = False,
        graph_warmup: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        self.model = model
        self.cfg = model.config
        self.dtype, self.device = dtype, device
        self.block_size = cache.block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_blocks = self._num_blocks(cache, max_num_batched_tokens, max_num_seqs)
        # one block beyond the pool: the scratch slot that padded rows of a CUDA-graph batch write to
        self.kv_caches = [tuple(torch.zeros(shape, dtype=dtype, device=device) for shape in layer)
                          for layer in model.kv_cache_shapes(self.num_blocks + 1, self.block_size)]
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB)",
            self.num_blocks,
            self.block_size,
            self.num_blocks * kv_block_bytes(self.model, self.block_size, dtype) / 2**20,
        )
        self.decode_graphs = None
        self.prefill_graphs = None
        graph_safe = all(b.graph_safe for b in model.moe_blocks())
        if cuda_graphs and device.type == "cuda" and graph_safe:
            max_len = max_model_len or self.cfg.max_position_embeddings
            self.decode_graphs = DecodeGraphs(model, self.kv_caches, self.block_size,
                                              -(-max_len // self.block_size), self.num_blocks * self.block_size,
                                              max_num_seqs, device, graph_warmup)
            if prefill_graphs:
                self.prefill_graphs = PrefillGraphs(model, self.kv_caches, self.block_size, self.num_blocks, device,
                                                    max_num_batched_tokens)
        elif cuda_graphs and device.type == "cuda":
            logger.info("decode runs eagerly: the MoE backend synchronises with the host (not graph-safe)")

    # ---- KV cache sizing -------------------------------------------------------------------
    def _num_blocks(self, cache: CacheConfig, max_num_batched_tokens: int, max_num_seqs: int) -> int:
        block_bytes = kv_block_bytes(self.model, cache.block_size, self.dtype)
        if cache.num_blocks is not None:
            return cache.num_blocks
        if cache.kv_cache_memory_bytes is not None:
            budget = cache.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            budget = self._cuda_budget(cache.gpu_memory_utilization, max_num_batched_tokens, max_num_seqs)
        else:
            budget = DEFAULT_CPU_KV_BYTES
        num_blocks = budget // block_bytes
        if num_blocks < 1:
            raise RuntimeError(
                f"no memory left for the KV cache (budget {budget} bytes, one block needs "
                f"{block_bytes}); raise gpu_memory_utilization or kv_cache_memory_bytes"
            )
        return int(num_blocks)

    @torch.inference_mode()
    def _cuda_budget(self, utilization: float, max_tokens: int, max_seqs: int) -> int:
        """Card memory * utilization - (weights + the activation peak of the largest step)."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens = min(max_tokens, self.cfg.max_position_embeddings)
        ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
        hidden = self.model(ids, torch.arange(tokens, device=self.device), None, None)
        self.model.compute_logits(hidden[: min(max_seqs, tokens)])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        _, total = torch.cuda.mem_get_info(self.device)
        del hidden
        torch.cuda.empty_cache()
        return int(total * utilization) - peak

    # ---- one step --------------------------------------------------------------------------
    def prepare(self, scheduled: list[ScheduledRequest], prev_tokens: torch.Tensor | None = None):
        input_ids, positions, slots, padded_index, sample_rows = [], [], [], [], []
        ctx_lens, tables, query_pos, query_start = [], [], [], [0]
        max_q = max(s.num_new_tokens for s in scheduled)
        bs = self.block_size
        n = 0
        for b, s in enumerate(scheduled):
            req = s.request
            start, count = req.num_computed_tokens, s.num_new_tokens
            tokens = req.tokens(start, start + count)
            table = req.block_table
            input_ids.extend(tokens)
            pos = range(start, start + count)
            positions.extend(pos)
            slots.extend(slot_ids(table, start, count, bs))
            padded_index.extend(range(b * max_q, b * max_q + count))
            query_pos.extend(pos)
            query_pos.extend([-1] * (max_q - count))
            ctx_lens.append(start + count)
            tables.append(table)
            n += count
            query_start.append(n)
            if s.samples:
                sample_rows.append(n - 1)
        batch, max_blocks = len(scheduled), max(len(t) for t in tables)
        flat_tables = [b for t in tables for b in t + [0] * (max_blocks - len(t))]
        # two uploads per step (int64 and int32 values), each through pinned memory: a step's host time is on
        # the critical path of small prefills, and every separate upload costs its own copy set-up
        longs = to_device(input_ids + positions + slots + padded_index + query_pos + sample_rows, torch.long,
                          self.device)
        ints = to_device(flat_tables + ctx_lens + query_start, torch.int32, self.device)
        ids, pos_t, slot_t, padded_t, qpos_t, rows_t = longs.split([n, n, n, n, batch * max_q, len(sample_rows)])
        tables_t, ctx_t, qstart_t = ints.split([batch * max_blocks, batch, batch + 1])
        meta = AttentionMetadata(
            slot_mapping=slot_t,
            block_tables=tables_t.view(batch, max_blocks),
            ctx_lens=ctx_t,
            query_pos=qpos_t.view(batch, max_q),
            padded_index=padded_t,
            max_query_len=max_q,
            max_ctx_len=max(ctx_lens),
            query_start=qstart_t,
        )
        fill_pending_tokens(ids, input_ids, prev_tokens)
        return ids, pos_t, meta, rows_t

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest], graph_tag: Hashable = None,
                allow_graph: bool = True, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step; returns float32 logits [S, V] for the rows that sample, in scheduled order.
        A pure-decode step replays a CUDA graph (when captured graphs are on and allow_graph), keyed also
        by graph_tag (see DecodeGraphs.run). prev_tokens: the previous step's sampled tokens on the device,
        for input tokens not yet known on the host (async scheduling: see fill_pending_tokens)."""
        if allow_graph and self.decode_graphs is not None and self.decode_graphs.can_run(scheduled):
            return self.decode_graphs.run(scheduled, graph_tag, prev_tokens)
        input_ids, positions, meta, sample_rows = self.prepare(scheduled, prev_tokens)
        if allow_graph and self.prefill_graphs is not None and self.prefill_graphs.can_run(input_ids.shape[0]):
            hidden = self.prefill_graphs.run(input_ids, positions, meta)  # [N, H]
        else:
            hidden = self.model(input_ids, positions, self.kv_caches, meta)  # [N, H]
        return self.model.compute_logits(hidden.index_select(0, sample_rows))

    def warm_up(self) -> tuple[int, int]:
        """Capture the CUDA graphs first requests would otherwise capture (and compile their kernels for) on the
        serving path: every prefill token bucket, and every decode batch bucket at the context bucket of a
        max_num_batched_tokens prompt. Before the first step only. Returns (prefill buckets, decode graphs)
        captured; (0, 0) without graphs (CPU, enforce_eager, a backend that is not graph-safe)."""
        prefill = self.prefill_graphs.warm_up() if self.prefill_graphs is not None else 0
        decode = 0
        if self.decode_graphs is not None:
            decode = self.decode_graphs.warm_up(-(-self.max_num_batched_tokens // self.block_size))
        return prefill, decode

    def release(self) -> None:
        """Free the CUDA graphs and the KV cache now (engine shutdown), whoever still holds this runner."""
        for graphs in (self.decode_graphs, self.prefill_graphs):
            if graphs is not None:
                graphs.release()
        self.decode_graphs = self.prefill_graphs = None
        self.kv_caches.clear()  # the list DecodeGraphs shares: its tensors go with it
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def expert_load(self) -> list[torch.Tensor]:
        """Tokens routed to each expert in the last step, per MoE layer ([E] int32 each)."""
        return [b.last_tokens_per_expert for b in self.model.moe_blocks() if b.last_tokens_per_expert is not None]
