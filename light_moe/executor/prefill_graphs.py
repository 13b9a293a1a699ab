"""Piecewise CUDA graphs of prefill and mixed steps.

Run eagerly, a prefill of a few hundred tokens is host-bound: every layer launches tens of kernels and
each CuTe DSL call costs tens of microseconds of host time (docs/kernels.md), more than the GPU needs
at T = 128. The step cannot be one graph, because attention depends on the batch's sequences (count,
lengths, block tables), which vary freely. Everything else in a layer is per token. So the forward is
captured in L + 1 pieces split at the attention op (as vLLM's piecewise graphs do):

    piece 0:  embed -> layer 0: norm -> qkv -> rotary + KV write          (q of layer 0)
    attention of layer 0, eager, on the real rows only
    piece i:  o_proj -> add + norm -> MoE -> add + norm -> qkv -> rotary + KV write of layer i
    ...
    piece L:  o_proj -> add + norm -> MoE -> final add + norm             (hidden states)

A piece depends only on the padded token count, the bucket. Padding rows take token 0 at position 0 and
write their KV into the scratch slot outside the block manager's pool; their attention rows are never
written (zeros or an earlier step's finite values) and their outputs are dropped. They do pass through
the MoE layers, so the layers' expert-load statistics of such a step include them.

The pieces are captured with the real backend, the attention calls replaced by a recorder that ends the
piece being captured and starts the next. All buckets share one memory pool: a bucket's pieces are always
replayed together and in capture order, and tensors that cross from one piece to the next stay alive
during capture, so no later capture reuses them while they matter.

Shape legend: N real tokens of the step, Tb the bucket (padded tokens), h heads, D head_dim, H hidden.
"""
from __future__ import annotations

import logging

import torch

from light_moe.executor.cuda_graphs import _bucket
from light_moe.models.base import MoECausalLM
from light_moe.ops.attention import AttentionMetadata

logger = logging.getLogger(__name__)

# ~1.5x apart, so padding wastes at most a third of a step
TOKEN_BUCKETS = (16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


class _AttentionRecorder:
    """Stands in for an Attention module's ops backend while the pieces are captured: rotary, norms and the
    rest pass through to the backend; each attention call closes the piece under capture, records what the
    replay must run in its place, and opens the next piece."""

    def __init__(self, backend, capture: _Capture, out: torch.Tensor):
        self.backend, self.capture, self.out = backend, capture, out

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def attention(self, q, k_cache, v_cache, meta, scale, **variant):
        # variant: gpt-oss's sinks (a parameter, static) and sliding window, replayed as given
        self.capture.split(("attention", q, (k_cache, v_cache), scale, self.out, variant))
        return self.out[: q.shape[0]]

    def mla_attention(self, q, latent_cache, kv_b_weight, meta, scale):  # layers/mla.py
        self.capture.split(("mla_attention", q, (latent_cache, kv_b_weight), scale, self.out, {}))
        return self.out[: q.shape[0]]


class _Capture:
    """The graphs of one bucket being captured in sequence into one pool."""

    def __init__(self, pool):
        self.pool = pool
        self.graphs: list[torch.cuda.CUDAGraph] = []
        # per attention: (the backend op, q, its cache / weight tensors, scale, out, variant kwargs), static tensors
        self.holes: list[tuple] = []

    def begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool)
        self.graphs.append(graph)

    def end(self) -> None:
        self.graphs[-1].capture_end()

    def split(self, hole: tuple) -> None:
        self.end()
        self.holes.append(hole)
        self.begin()


class _Bucket:
    """Static inputs and the captured pieces of one token bucket."""

    def __init__(self, tokens: int, scratch_slot: int, device: torch.device):
        self.tokens = tokens
        self.input_ids = torch.zeros(tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(tokens, dtype=torch.long, device=device)
        self.slots = torch.full((tokens,), scratch_slot, dtype=torch.long, device=device)
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.holes: list[tuple] = []
        self.hidden: torch.Tensor | None = None  # [Tb, H], the last piece's output


class PrefillGraphs:
    def __init__(self, model: MoECausalLM, kv_caches, block_size: int, scratch_block: int, device: torch.device,
                 max_tokens: int):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_block = scratch_block  # the block one past the pool (ModelRunner allocates it)
        self.device = device
        self.buckets = tuple(b for b in TOKEN_BUCKETS if b <= max_tokens) or (TOKEN_BUCKETS[0],)
        self.captured: dict[int, _Bucket] = {}
        self.pool = torch.cuda.graph_pool_handle()
        # the eager attention's output, outside the pool: ONE buffer of the largest bucket per shape, shared by
        # every layer and bucket. Safe in stream order: piece i + 1 reads layer i's output (o_proj) before
        # layer i + 1's attention overwrites it, and buckets are replayed one whole step at a time
        self.attention_outputs: dict[tuple, torch.Tensor] = {}
        self.attention_modules = [layer.self_attn for layer in model.model.layers]

    def _attention_output(self, heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        key = (heads, head_dim, dtype)
        if key not in self.attention_outputs:
            self.attention_outputs[key] = torch.zeros(self.buckets[-1], heads, head_dim, dtype=dtype,
                                                      device=self.device)
        return self.attention_outputs[key]

    def can_run(self, num_tokens: int) -> bool:
        return num_tokens <= self.buckets[-1]

    # ---- capture -------------------------------------------------------------------------------------------
    def _padding_meta(self, bucket: _Bucket) -> AttentionMetadata:
        """One sequence of Tb tokens living in the scratch block: the metadata of the warm-up step."""
        tokens, blocks = bucket.tokens, -(-bucket.tokens // self.block_size)
        tables = torch.full((1, blocks), self.scratch_block, dtype=torch.int32, device=self.device)
        return AttentionMetadata.for_lengths([tokens], [tokens], tables, bucket.slots)

    def _capture(self, tokens: int) -> _Bucket:
        bucket = _Bucket(tokens, self.scratch_block * self.block_size, self.device)
        meta = self._padding_meta(bucket)
        model = self.model
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: kernels compile, the allocator settles
            model(bucket.input_ids, bucket.positions, self.kv_caches, meta)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        capture = _Capture(self.pool)
        backends = [attn.ops for attn in self.attention_modules]
        for attn, backend in zip(self.attention_modules, backends):
            out = self._attention_output(attn.num_heads, attn.head_dim, model.lm_head.weight.dtype)[:tokens]
            attn.ops = _AttentionRecorder(backend, capture, out)
        try:
            with torch.cuda.stream(stream):
                capture.begin()
                try:
                    bucket.hidden = model(bucket.input_ids, bucket.positions, self.kv_caches, meta)
                finally:
                    capture.end()
        finally:
            for attn, backend in zip(self.attention_modules, backends):
                attn.ops = backend
        torch.cuda.current_stream().wait_stream(stream)
        bucket.graphs, bucket.holes = capture.graphs, capture.holes
        logger.info("captured piecewise prefill graphs: %d tokens, %d pieces", tokens, len(bucket.graphs))
        return bucket

    @torch.inference_mode()  # as run(): buffers the first forward made in inference mode are updated in place
    def warm_up(self) -> int:
        """Capture every token bucket's pieces now, before any request (see DecodeGraphs.warm_up). Returns the
        number of buckets captured."""
        missing = [tokens for tokens in self.buckets if tokens not in self.captured]
        for tokens in missing:
            self.captured[tokens] = self._capture(tokens)
        return len(missing)

    # ---- replay --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [N, H] of a step whose N tokens fit a bucket (inputs as ModelRunner.prepare gives them)."""
        n = input_ids.shape[0]
        tokens = _bucket(n, self.buckets)
        bucket = self.captured.get(tokens)
        if bucket is None:
            bucket = self.captured[tokens] = self._capture(tokens)
        bucket.input_ids[:n].copy_(input_ids)
        bucket.positions[:n].copy_(positions)
        bucket.slots[:n].copy_(meta.slot_mapping)
        if n < tokens:  # rows of a bigger earlier step: back to padding
            bucket.input_ids[n:].zero_()
            bucket.positions[n:].zero_()
            bucket.slots[n:].fill_(self.scratch_block * self.block_size)
        backend = self.attention_modules[0].ops
        for graph, hole in zip(bucket.graphs, bucket.holes):
            graph.replay()
            op, q, tensors, scale, out, variant = hole
            getattr(backend, op)(q[:n], *tensors, meta, scale, out=out[:n], **variant)
        bucket.graphs[-1].replay()
        return bucket.hidden[:n]

    def release(self) -> None:
        if not self.captured:
            return
        torch.cuda.synchronize()
        for bucket in self.captured.values():
            for graph in bucket.graphs:
                graph.reset()
        self.captured.clear()
        self.pool = torch.cuda.graph_pool_handle()
