"""Op backends and their selection: the MoE ops, and the decoder layer's attention, norm and rotary ops.

Shape legend: T tokens, E experts, K top-k, H hidden, I intermediate, M = T * K routed rows;
N tokens of a step, h / g query / KV heads, D head_dim.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from light_moe.ops import reference
from light_moe.ops.attention import AttentionMetadata, paged_attention, paged_attention_sinks, paged_mla_attention

logger = logging.getLogger(__name__)

BACKEND_NAMES = ("auto", "reference", "cute")


class PendingCombine(NamedTuple):
    """A MoE layer's output not yet combined (MoEOps.experts with defer_combine): the next norm
    (layers/norm.py RMSNorm) runs combine_rms_norm on it, the combine fused into its residual add."""

    y: torch.Tensor  # [M, H] expert output rows, sorted by expert
    reverse_index: torch.Tensor  # [M] int32
    topk_weights: torch.Tensor  # [T, K] fp32
    extra: torch.Tensor | None = None  # [T, H]: the shared expert's output, added after the combine


class MoEOps:
    """Base backend: the pure-PyTorch reference for every op. Subclasses override what they speed up.
    fuse_combine_norm (EngineConfig.fuse_combine_norm): MoE layers on one process hand the next norm a
    PendingCombine instead of their combined output (layers/moe.py)."""

    name = "reference"
    fuse_combine_norm = False  # the class default: subclasses that keep their own __init__ stay unfused

    def __init__(self, fuse_combine_norm: bool = False):
        self.fuse_combine_norm = fuse_combine_norm

    def prepare_expert_weights(self, w13: torch.Tensor, w2: torch.Tensor,
                               spec=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts' weights in this backend's layout, once after loading. spec: the layer's
        config.ExpertConfig (None: the default experts); a backend keeps the canonical layout where its
        kernels cannot run that spec."""
        return w13, w2

    def graph_safe(self, gate_weight: torch.Tensor, top_k: int, w13: torch.Tensor, w2: torch.Tensor,
                   spec=None, expert_spec=None) -> bool:
        """True when every op of this layer (its dtype and shapes, its prepared weights, its routing variant
        spec, a config.RouterConfig or None, its expert variant expert_spec, a config.ExpertConfig or None) runs
        without host synchronisation, so the layer can be captured in a CUDA graph. The reference reads expert
        row counts on the host."""
        return False

    def router(self, x, gate_weight, top_k: int, renormalize: bool, counts_out: torch.Tensor | None = None,
               spec=None, correction_bias: torch.Tensor | None = None, gate_bias: torch.Tensor | None = None):
        """(topk_weights [T, K] fp32, topk_ids [T, K] int32, tokens_per_expert [E] int32). counts_out: a
        persistent [E] int32 buffer to write tokens_per_expert into (the MoE block's load statistics, which a
        CUDA graph must update in place), returned as the third value. spec: a config.RouterConfig for the
        DeepSeek / gpt-oss variants (reference.spec_router, with their bias tensors [E]); None: softmax top-k."""
        if spec is None:
            weights, ids, counts = reference.router(x, gate_weight, top_k, renormalize)
        else:
            weights, ids, counts = reference.spec_router(x, gate_weight, top_k, renormalize, spec, correction_bias,
                                                         gate_bias)
        if counts_out is None:
            return weights, ids, counts
        return weights, ids, counts_out.copy_(counts)

    def route(self, x, gate_weight, top_k: int, renormalize: bool, counts_out: torch.Tensor | None = None,
              **variant):
        """router() plus the routing metadata of its ids ((expert_offsets, gather_index, reverse_index), as
        routing_metadata gives them) where the backend computes it in the same launch, else None. variant:
        router()'s spec, correction_bias, gate_bias."""
        weights, ids, counts = self.router(x, gate_weight, top_k, renormalize, counts_out, **variant)
        return weights, ids, counts, None

    def routing_metadata(self, topk_ids, num_experts: int):
        return reference.routing_metadata(topk_ids, num_experts)

    def expert_up(self, x, gather_index, expert_offsets, w13, spec=None, bias=None, next_weights=None):
        """Gathered rows -> gate/up GEMM (+ bias [E, 2I]) -> activation (SiLU * up, or spec's) [M, I].
        next_weights: the w2 the down GEMM streams next, a hint a backend may prefetch while this GEMM drains."""
        return reference.expert_up(x, gather_index, expert_offsets, w13, spec, bias)

    def expert_down(self, act, expert_offsets, w2, bias=None):
        """[M, I] -> down GEMM (+ bias [E, H]) [M, H], rows in sorted order."""
        return reference.expert_down(act, expert_offsets, w2, bias)

    def expert_up_down(self, x, gather_index, expert_offsets, w13, w2):
        """The default experts (SiLU * up, no biases): expert_up then expert_down -> [M, H] sorted rows; a backend
        may run both in one kernel."""
        act = self.expert_up(x, gather_index, expert_offsets, w13, next_weights=w2)  # [M, I]
        return self.expert_down(act, expert_offsets, w2)

    def combine(self, y, reverse_index, topk_weights):
        return reference.combine(y, reverse_index, topk_weights)

    def experts(self, x, topk_weights, topk_ids, w13, w2, padded: bool = False, metadata=None, spec=None,
                biases: tuple[torch.Tensor, torch.Tensor] | None = None,
                defer_combine: bool = False) -> torch.Tensor | PendingCombine:
        """Routed experts for already-routed tokens: metadata -> up -> down -> combine. [T, H]
        defer_combine (unpadded rows only): a PendingCombine of the down projection's rows instead.
        metadata: route()'s metadata of exactly these ids and experts (skips routing_metadata).
        spec: the model's config.ExpertConfig (gpt-oss's clamped SwiGLU), None for SiLU * up; biases: (b13
        [E, 2I], b2 [E, H]) of the experts w13 / w2 hold (rows in the same order), None for none.

        padded (the fixed-capacity expert-parallel exchange, parallel/dispatch.py): ids may also be
        E = w13.shape[0], marking padding rows. They sort after every real row and lie past
        expert_offsets[E], so no GEMM computes them (their outputs are undefined; the dispatcher
        drops them), and each real expert sees exactly the rows it would see without padding."""
        if x.shape[0] == 0:
            return x.new_zeros(x.shape)
        num_experts = w13.shape[0]
        if metadata is not None:
            if padded:
                raise ValueError("router metadata describes unpadded ids; padded rows need routing_metadata")
            offsets, gather_index, reverse_index = metadata
        else:
            offsets, gather_index, reverse_index = self.routing_metadata(topk_ids, num_experts + int(padded))
        if padded:
            offsets = offsets[: num_experts + 1]
        if spec is None and biases is None:  # the default experts: backends may override the plain signatures
            y = self.expert_up_down(x, gather_index, offsets, w13, w2)  # [M, H]
        else:
            b13, b2 = biases if biases is not None else (None, None)
            act = self.expert_up(x, gather_index, offsets, w13, spec=spec, bias=b13, next_weights=w2)  # [M, I]
            y = self.expert_down(act, offsets, w2, bias=b2)  # [M, H]
        if defer_combine and not padded:
            return PendingCombine(y, reverse_index, topk_weights)
        return self.combine(y, reverse_index, topk_weights)

    def combine_rms_norm(self, pending: PendingCombine, residual: torch.Tensor, weight, eps: float):
        """(norm(s), s) for s = combine(pending) (+ pending.extra) + residual: rms_norm with residual of the
        combined rows; a backend may fuse the two and update `residual` in place."""
        x = self.combine(pending.y, pending.reverse_index, pending.topk_weights)
        if pending.extra is not None:
            x = x + pending.extra
        return self.rms_norm(x, weight, eps, residual)

    def moe_forward(self, x, gate_weight, w13, w2, top_k: int, renormalize: bool) -> torch.Tensor:
        topk_weights, topk_ids, _, metadata = self.route(x, gate_weight, top_k, renormalize)
        return self.experts(x, topk_weights, topk_ids, w13, w2, metadata=metadata)

    # ---- the rest of a decoder layer: one backend object serves the whole model ----------------------------
    def rms_norm(self, x, weight, eps: float, residual: torch.Tensor | None = None):
        """norm(x), or with residual (x + residual -> the new residual stream s): (norm(s), s). A backend may
        update `residual` in place to hold s; callers use only the returned tensors."""
        return reference.rms_norm(x, weight, eps, residual)

    def rope_write_kv(self, q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping) -> torch.Tensor:
        """q [N, h*D], k, v [N, g*D] (column slices of the qkv projection) -> rotated q [N, h, D]; rotated k and
        v written into the paged cache at slot_mapping."""
        return reference.rope_write_kv(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)

    def attention(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                  out: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                  sliding_window: int | None = None) -> torch.Tensor:
        """Causal attention of q [N, h, D] over each sequence's cached keys (this step's already written);
        into `out` [N, h, D] when given. sinks [h]: per-head logits in the softmax denominator; sliding_window:
        keys within that many positions of the query (gpt-oss; ops/attention.py paged_attention_sinks)."""
        if sinks is not None or sliding_window is not None:
            result = paged_attention_sinks(q, k_cache, v_cache, meta, scale, sinks, sliding_window)
            return result if out is None else out.copy_(result)
        result = paged_attention(q, k_cache, v_cache, meta, scale)
        return result if out is None else out.copy_(result)

    # ---- multi-head latent attention (layers/mla.py; L kv_lora_rank, R rotary dims, Dn / Dv head dims) ------
    def mla_rope_write(self, q, latent, k_pe, positions, cos, sin, latent_cache, slot_mapping,
                       interleave: bool) -> torch.Tensor:
        """q [N, h, Dn + R], latent [N, L], k_pe [N, R] -> q with its rotary part rotated [N, h, Dn + R];
        [latent, rotated k_pe] written into the paged latent cache [blocks, block_size, L + R] at slot_mapping."""
        return reference.mla_rope_write(q, latent, k_pe, positions, cos, sin, latent_cache, slot_mapping, interleave)

    def mla_attention(self, q, latent_cache, kv_b_weight, meta: AttentionMetadata, scale: float,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        """Causal MLA of q [N, h, Dn + R] over the cached latents (this step's already written), kv_b_weight
        [h * (Dn + Dv), L] the latent's up-projection; [N, h, Dv], into `out` when given."""
        result = paged_mla_attention(q, latent_cache, kv_b_weight, meta, scale)
        return result if out is None else out.copy_(result)

    # ---- W4A16 linear layers (layers/linear.py QuantizedLinear: the attention projections) ----------------
    def prepare_linear_weight(self, weight):
        """A linear's W4A16 weight (a one-expert QuantizedWeight, logical [1, N, K]) in this backend's layout,
        once after loading. The reference keeps the canonical weight."""
        return weight

    def linear(self, x, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        """y [T, N] = x [T, K] W^T (+ bias), W = prepare_linear_weight's result. The reference dequantises W
        on every call (no host sync: graph-safe, slow)."""
        return torch.nn.functional.linear(x, reference.expert_weight(weight, 0), bias)

    # ---- dense (unquantized) linear layers (layers/linear.py DenseLinear: the attention projections) ----------
    def dense_linear(self, x, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """y [..., N] = x [..., K] W^T (+ bias) for a float weight [N, K] as loaded (torch.nn.functional.linear)."""
        return torch.nn.functional.linear(x, weight, bias)


class ReferenceOps(MoEOps):
    name = "reference"
