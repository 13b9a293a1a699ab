"""The CuTe DSL backend: router, routing metadata, grouped expert GEMMs and combine on sm_90a, and the
decoder layer's fused residual-add + RMSNorm, rotary + KV-cache write and paged attention (decode and
prefill kernels that read the cache in place through the block table).

Each op uses its kernel where the kernel's `supports(...)` accepts the shapes and dtypes, and the
PyTorch reference otherwise; the reason for every fallback is logged once per (op, reason).
All kernels launch on torch's current stream without host synchronisation, so a model whose MoE
layers run here can be captured in a CUDA graph (`graph_safe`).
W4A16 experts (light_moe.quant.QuantizedWeight) are repacked once into the W4A16 kernel's layout
(W4A16Weights) and run on the W4A16 grouped GEMM; act-order checkpoints stay on the reference.
"""
from __future__ import annotations

import logging

import torch

from light_moe.config import SKINNY_GEMM_MAX_ROWS, W4A16_DECODE_KERNELS
from light_moe.kernels import combine as combine_kernel
from light_moe.kernels import decode_attention as decode_kernel
from light_moe.kernels import grouped_gemm, skinny_gemm, w4a16_fused, w4a16_gemm, w4a16_linear
from light_moe.kernels import mla_decode_attention as mla_kernel
from light_moe.kernels import mla_rope_kv as mla_rope_kernel
from light_moe.kernels import prefill_attention as prefill_kernel
from light_moe.kernels import rms_norm as rms_norm_kernel
from light_moe.kernels import rope_kv as rope_kernel
from light_moe.kernels import router as router_kernel
from light_moe.kernels import router_select as select_kernel
from light_moe.kernels import routing as routing_kernel
from light_moe.kernels.expert_epilogue import ExpertEpilogue
from light_moe.kernels.w4a16_layout import W4A16Weights, prepare_w4a16_weights
from light_moe.ops.attention import AttentionMetadata
from light_moe.ops.backend import MoEOps
from light_moe.quant.w4a16 import QuantizedWeight

logger = logging.getLogger(__name__)

# expert weights repacked for the grouped GEMM carry this attribute, so a layer whose weights the
# kernel cannot take keeps the canonical layout and the reference path
_CUTE_LAYOUT = "_light_moe_cute_layout"


class CuteOps(MoEOps):
    name = "cute"

    def __init__(self, fuse_routing_metadata: bool = True, skinny_gemm: bool = True, skinny_max_rows: int = 16,
                 fuse_combine_norm: bool = False, fuse_attention_merge: bool = False,
                 w4a16_decode_kernel: str = "direct", w4a16_prefetch_down: bool = False,
                 w4a16_fused_decode: bool = False):
        super().__init__(fuse_combine_norm)
        self._logged: set[tuple[str, str]] = set()
        # dense_linear: steps of up to skinny_max_rows rows on kernels/skinny_gemm.py, else torch's F.linear
        # (EngineConfig.skinny_gemm, skinny_gemm_max_rows)
        if not 1 <= skinny_max_rows <= SKINNY_GEMM_MAX_ROWS:
            raise ValueError(f"skinny_gemm_max_rows must be in [1, {SKINNY_GEMM_MAX_ROWS}], got {skinny_max_rows}")
        self.skinny_gemm = skinny_gemm
        self.skinny_max_rows = skinny_max_rows
        # route(): the router kernel's single CTA also writes the routing metadata where one CTA covers T (decode,
        # E <= 16): one launch fewer per MoE layer, outputs bit-equal (timings: docs/kernels.md, Router, "fused");
        # False keeps the separate metadata launch (the bench's *_two_launch_routing cases).
        self.fuse_routing_metadata = fuse_routing_metadata
        # decode attention: the last split CTA merges the splits (EngineConfig.fuse_attention_merge) through
        # counters that every launch leaves zero; one buffer per device, as attention only ever runs on the
        # compute stream (kernels/decode_attention.py)
        self.fuse_attention_merge = fuse_attention_merge
        self._merge_counters: dict[torch.device, torch.Tensor] = {}
        # W4A16 experts at decode: the grouped GEMM's split-K tiles or kernels/w4a16_direct.py
        # (EngineConfig.w4a16_decode_kernel; the tile table decides where decode ends)
        if w4a16_decode_kernel not in W4A16_DECODE_KERNELS:
            raise ValueError(f"w4a16_decode_kernel must be one of {W4A16_DECODE_KERNELS}, got {w4a16_decode_kernel!r}")
        self.w4a16_decode_kernel = w4a16_decode_kernel
        # the direct up kernel's early CTAs prefetch the down projection's weights into L2 (EngineConfig.
        # w4a16_prefetch_down; opt-in until measured: docs/kernels.md)
        self.w4a16_prefetch_down = w4a16_prefetch_down
        # W4A16 experts at decode: up and down in one launch (kernels/w4a16_fused.py; EngineConfig.w4a16_fused_decode,
        # opt-in until measured)
        self.w4a16_fused_decode = w4a16_fused_decode
        self._outgrown_counters: list[torch.Tensor] = []  # kept alive: graphs captured with them still use them

    def _fallback(self, op: str, reason: str) -> None:
        if (op, reason) not in self._logged:
            self._logged.add((op, reason))
            logger.warning("CuTe %s unavailable for these shapes (%s); using the PyTorch reference", op, reason)

    @staticmethod
    def _gemm_supports(w13: torch.Tensor, w2: torch.Tensor) -> tuple[bool, str]:
        if w13.dtype != torch.bfloat16:
            return False, f"grouped GEMM is bf16-only, weights are {w13.dtype}"
        num_experts, two_inter, hidden = w13.shape
        inter = two_inter // 2
        if hidden % 64 or inter % 64:
            return False, f"H={hidden} and I={inter} must be multiples of 64"
        return True, "ok"

    @staticmethod
    def _w4a16_supports(w13: QuantizedWeight, w2: QuantizedWeight) -> tuple[bool, str]:
        if w13.perm is not None or w2.perm is not None:
            return False, "act-order (permuted) W4A16 weights are not supported by the W4A16 kernel"
        if w13.scales.dtype != torch.bfloat16 or w2.scales.dtype != torch.bfloat16:
            return False, f"the W4A16 kernel takes bf16 scales (bf16 activations), got {w13.scales.dtype}"
        if w13.group_size != w2.group_size:
            return False, f"group sizes differ: {w13.group_size} vs {w2.group_size}"
        num_experts, two_inter, hidden = w13.shape
        return w4a16_gemm.supports(num_experts, hidden, two_inter // 2, w13.group_size)

    def prepare_expert_weights(self, w13, w2, spec=None):
        # spec (gpt-oss's biases and clamped SwiGLU) needs no other layout: both GEMMs take it as an epilogue variant
        if isinstance(w13, QuantizedWeight):
            ok, reason = self._w4a16_supports(w13, w2)
            if not ok:
                self._fallback("W4A16 grouped GEMM", reason)
                return w13, w2
            return (prepare_w4a16_weights(w13.qweight, w13.scales, w13.zeros, w13.group_size, gated=True),
                    prepare_w4a16_weights(w2.qweight, w2.scales, w2.zeros, w2.group_size, gated=False))
        ok, reason = self._gemm_supports(w13, w2)
        if not ok:
            self._fallback("grouped GEMM", reason)
            return w13, w2
        w13p, w2p = grouped_gemm.prepare_expert_weights(w13, w2)
        setattr(w13p, _CUTE_LAYOUT, True)
        setattr(w2p, _CUTE_LAYOUT, True)
        return w13p, w2p

    @staticmethod
    def _kernel_layout(w) -> bool:
        return isinstance(w, W4A16Weights) or getattr(w, _CUTE_LAYOUT, False)

    def graph_safe(self, gate_weight, top_k: int, w13, w2, spec=None, expert_spec=None) -> bool:
        num_experts, hidden = gate_weight.shape
        # the routing variants (spec) the router kernel's selection step does not take run on the reference router,
        # whose bincount syncs with the host; the expert variants (expert_spec) are epilogue variants of the grouped
        # GEMMs, so weights in a kernel layout run them without the host
        return (self._variant_supports(spec, num_experts, top_k)[0]
                and self._kernel_layout(w13) and self._kernel_layout(w2)
                and router_kernel.supports(gate_weight.dtype, hidden, num_experts, top_k)[0]
                and routing_kernel.supports(num_experts, top_k)[0]
                and combine_kernel.supports(gate_weight.dtype, hidden, top_k)[0])

    @staticmethod
    def _router_supports(x, gate_weight, top_k: int) -> tuple[bool, str]:
        if gate_weight.dtype != x.dtype:
            return False, f"gate weight is {gate_weight.dtype}, activations {x.dtype}"
        return router_kernel.supports(x.dtype, x.shape[1], gate_weight.shape[0], top_k)

    @staticmethod
    def _variant_supports(spec, num_experts: int, top_k: int) -> tuple[bool, str]:
        """Whether the router kernel's selection step (kernels/router_select.py) takes this routing variant."""
        if spec is None:
            return True, "ok"
        return select_kernel.supports(select_kernel.selection_for(spec), num_experts, top_k)

    def _variant_args(self, x, gate_weight, top_k: int, spec, correction_bias=None, gate_bias=None):
        """(x, gate_weight, the selection's keyword arguments) for the router kernel with a routing variant, or None
        (the reason logged) where it cannot run. x and an fp32 gate of another dtype both go to fp32, as the
        reference computes them (router_kernel.common_dtype)."""
        num_experts = gate_weight.shape[0]
        selection = select_kernel.selection_for(spec, gate_bias, correction_bias)
        dtype = x.dtype if x.dtype == gate_weight.dtype else torch.float32
        ok, reason = router_kernel.supports(dtype, x.shape[1], num_experts, top_k)
        if ok and not x.is_cuda:
            ok, reason = False, f"x on {x.device}, not a CUDA device"
        if ok:
            ok, reason = select_kernel.supports(selection, num_experts, top_k)
        if not ok:
            self._fallback("router", f"routing variant {spec}: {reason}")
            return None
        x, gate_weight = router_kernel.common_dtype(x.contiguous(), gate_weight.contiguous())
        return x, gate_weight, dict(selection=selection, gate_bias=gate_bias,
                                    correction_bias=correction_bias if selection.correction_bias else None)

    def router(self, x, gate_weight, top_k: int, renormalize: bool, counts_out: torch.Tensor | None = None,
               spec=None, correction_bias: torch.Tensor | None = None, gate_bias: torch.Tensor | None = None):
        if spec is not None:
            args = self._variant_args(x, gate_weight, top_k, spec, correction_bias, gate_bias)
            if args is None:
                return super().router(x, gate_weight, top_k, renormalize, counts_out, spec, correction_bias,
                                      gate_bias)
            return router_kernel.router(args[0], args[1], top_k, renormalize, counts_out, **args[2])
        ok, reason = self._router_supports(x, gate_weight, top_k)
        if ok:
            return router_kernel.router(x.contiguous(), gate_weight, top_k, renormalize, counts_out)
        self._fallback("router", reason)
        return super().router(x, gate_weight, top_k, renormalize, counts_out)

    def route(self, x, gate_weight, top_k: int, renormalize: bool, counts_out: torch.Tensor | None = None,
              **variant):
        if variant.get("spec") is not None and self.fuse_routing_metadata:
            args = self._variant_args(x, gate_weight, top_k, **variant)
            if args is not None:
                return router_kernel.route(args[0], args[1], top_k, renormalize, counts_out, **args[2])
        if variant.get("spec") is not None or not (self.fuse_routing_metadata
                                                   and self._router_supports(x, gate_weight, top_k)[0]):
            return super().route(x, gate_weight, top_k, renormalize, counts_out, **variant)
        return router_kernel.route(x.contiguous(), gate_weight, top_k, renormalize, counts_out)

    def routing_metadata(self, topk_ids, num_experts: int):
        ok, reason = routing_kernel.supports(num_experts, topk_ids.shape[1])
        if ok:
            return routing_kernel.routing_metadata(topk_ids.contiguous(), num_experts)
        self._fallback("routing metadata", reason)
        return super().routing_metadata(topk_ids, num_experts)

    def expert_up(self, x, gather_index, expert_offsets, w13, spec=None, bias=None, next_weights=None):
        if not self._kernel_layout(w13):
            return super().expert_up(x, gather_index, expert_offsets, w13, spec, bias)
        # the spec (gpt-oss's clamped SwiGLU) and b13 (canonical row order) become the kernel's epilogue variant;
        # (None, None) is the default kernel
        variant = dict(epilogue=ExpertEpilogue.of(spec, bias is not None), bias=bias)
        if isinstance(w13, W4A16Weights):
            prefetch = next_weights if self.w4a16_prefetch_down and isinstance(next_weights, W4A16Weights) else None
            return w4a16_gemm.w4a16_expert_up(x.contiguous(), gather_index, expert_offsets, w13, **variant,
                                              decode_kernel=self.w4a16_decode_kernel, next_weights=prefetch)
        return grouped_gemm.expert_up(x.contiguous(), gather_index, expert_offsets, w13, **variant)

    def expert_up_down(self, x, gather_index, expert_offsets, w13, w2):
        if self.w4a16_fused_decode and isinstance(w13, W4A16Weights) and isinstance(w2, W4A16Weights):
            config = w4a16_fused.fused_config(gather_index.shape[0], w13, w2)  # None: not a decode-sized step
            if config is not None:
                return w4a16_fused.w4a16_fused_experts(x.contiguous(), gather_index, expert_offsets, w13, w2,
                                                       config=config)[1]
        return super().expert_up_down(x, gather_index, expert_offsets, w13, w2)

    def expert_down(self, act, expert_offsets, w2, bias=None):
        if not self._kernel_layout(w2):
            return super().expert_down(act, expert_offsets, w2, bias)
        if isinstance(w2, W4A16Weights):  # + b2 in the epilogue, before the combine's weights
            return w4a16_gemm.w4a16_expert_down(act, expert_offsets, w2, bias=bias,
                                                decode_kernel=self.w4a16_decode_kernel)
        return grouped_gemm.expert_down(act, expert_offsets, w2, bias=bias)

    def combine(self, y, reverse_index, topk_weights):
        ok, reason = combine_kernel.supports(y.dtype, y.shape[1], topk_weights.shape[1])
        if ok:
            return combine_kernel.combine(y, reverse_index, topk_weights)
        self._fallback("combine", reason)
        return super().combine(y, reverse_index, topk_weights)

    # ---- the rest of the decoder layer -------------------------------------------------------------------------
    def rms_norm(self, x, weight, eps: float, residual: torch.Tensor | None = None):
        ok, reason = rms_norm_kernel.supports(x.dtype, x.shape[-1])
        if ok and weight.dtype != x.dtype:
            ok, reason = False, f"weight is {weight.dtype}, activations {x.dtype}"
        if ok and (x.dim() != 2 or x.stride(-1) != 1 or (residual is not None and not residual.is_contiguous())):
            ok, reason = False, "x must be 2-D with contiguous rows, residual contiguous"
        if not ok:
            self._fallback("RMSNorm", reason)
            return super().rms_norm(x, weight, eps, residual)
        out = rms_norm_kernel.rms_norm(x, weight, eps, residual)  # residual updated in place
        return out if residual is None else (out, residual)

    def combine_rms_norm(self, pending, residual: torch.Tensor, weight, eps: float):
        y, reverse_index, topk_weights, extra = pending
        ok, reason = rms_norm_kernel.combine_supports(y.dtype, y.shape[-1], topk_weights.shape[-1])
        tensors = (y, reverse_index, topk_weights, residual, weight) + (() if extra is None else (extra,))
        if ok and not all(t.is_cuda and t.is_contiguous() for t in tensors):
            ok, reason = False, "every input must be a contiguous CUDA tensor"
        if ok and (weight.dtype != y.dtype or residual.dtype != y.dtype or topk_weights.dtype != torch.float32
                   or reverse_index.dtype != torch.int32 or (extra is not None and extra.dtype != y.dtype)):
            ok, reason = False, f"dtypes: y {y.dtype}, residual {residual.dtype}, weight {weight.dtype}"
        if not ok:
            self._fallback("combine + RMSNorm", reason)
            return super().combine_rms_norm(pending, residual, weight, eps)  # the two kernels
        out = rms_norm_kernel.combine_rms_norm(y, reverse_index, topk_weights, extra, residual, weight, eps)
        return out, residual  # residual updated in place

    def rope_write_kv(self, q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping) -> torch.Tensor:
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        ok, reason = rope_kernel.supports(q.dtype, q.shape[1] // head_dim, num_kv_heads, head_dim, k_cache.shape[1])
        if not ok:
            self._fallback("rotary + KV write", reason)
            return super().rope_write_kv(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)
        return rope_kernel.rope_write_kv(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)

    def attention(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                  out: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                  sliding_window: int | None = None) -> torch.Tensor:
        heads, head_dim = q.shape[1], q.shape[2]
        kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
        decode = meta.max_query_len == 1
        kernel = decode_kernel if decode else prefill_kernel
        # gpt-oss's sinks and sliding window are compile-time variants of both kernels (kernels/attention_variant.py)
        ok, reason = kernel.supports(q.dtype, heads, kv_heads, head_dim, block_size, sinks, sliding_window)
        if ok and (meta.block_tables.dtype != torch.int32 or meta.ctx_lens.dtype != torch.int32
                   or (not decode and meta.query_start is None)):
            ok, reason = False, "metadata without int32 block tables / context lengths / query starts"
        if not ok:
            variant = "" if sinks is None and sliding_window is None else " with sinks / sliding window"
            self._fallback(("decode attention" if decode else "prefill attention") + variant, reason)
            return super().attention(q, k_cache, v_cache, meta, scale, out, sinks, sliding_window)
        if decode:  # one query row per sequence
            counters = self._attention_merge_counters(q.device, q.shape[0] * kv_heads)
            return decode_kernel.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.ctx_lens, scale,
                                                  out=out, sinks=sinks, sliding_window=sliding_window,
                                                  merge_counters=counters)
        return prefill_kernel.prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start,
                                                meta.ctx_lens, meta.max_query_len, scale, out=out, sinks=sinks,
                                                sliding_window=sliding_window)

    def _attention_merge_counters(self, device: torch.device, needed: int) -> torch.Tensor | None:
        """The zeroed merge counters of decode attention (None: the combine kernel merges). Allocated outside CUDA
        graph capture only (a buffer made during capture would be zeroed only when that graph replays): the
        graphs' warm-up runs every batch eagerly first, so a capture finds them there."""
        if not self.fuse_attention_merge:
            return None
        counters = self._merge_counters.get(device)
        if counters is None or counters.numel() < needed:
            if torch.cuda.is_current_stream_capturing():
                if ("attention merge", "capture") not in self._logged:
                    self._logged.add(("attention merge", "capture"))
                    logger.warning("decode attention: %d merge counters first needed inside CUDA graph capture; "
                                   "this graph merges with the combine kernel", needed)
                return None
            if counters is not None:
                self._outgrown_counters.append(counters)
            size = 1 << max(12, (needed - 1).bit_length())
            counters = self._merge_counters[device] = torch.zeros(size, dtype=torch.int32, device=device)
        return counters

    # ---- multi-head latent attention: decode on kernels/mla_decode_attention.py, the rest on the reference --
    def mla_rope_write(self, q, latent, k_pe, positions, cos, sin, latent_cache, slot_mapping, interleave: bool):
        ok, reason = mla_rope_kernel.supports(q.dtype, q.shape[1], q.shape[2] - k_pe.shape[1], k_pe.shape[1],
                                              latent.shape[1])
        if ok and not q.is_cuda:
            ok, reason = False, f"q on {q.device}"
        if not ok:
            self._fallback("MLA rotary + latent write", reason)
            return super().mla_rope_write(q, latent, k_pe, positions, cos, sin, latent_cache, slot_mapping,
                                          interleave)
        return mla_rope_kernel.mla_rope_write(q, latent, k_pe, positions, cos, sin, latent_cache, slot_mapping,
                                              interleave)

    def mla_attention(self, q, latent_cache, kv_b_weight, meta: AttentionMetadata, scale: float,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode steps: the absorbed path of the reference (ops/attention.py paged_mla_attention) with its attention
        over the latents on kernels/mla_decode_attention.py; W_UK and W_UV stay batched matmuls, as there."""
        decode = meta.max_query_len == 1
        num_tokens, heads, qk_dim = q.shape
        lora = kv_b_weight.shape[-1]
        rope = latent_cache.shape[-1] - lora
        if not decode:
            ok, reason = False, "prefill / mixed steps decompress the latents on the reference (decode-only kernel)"
        else:
            ok, reason = mla_kernel.supports(q.dtype, heads, lora, rope, latent_cache.shape[1])
        if ok and not (q.is_cuda and isinstance(kv_b_weight, torch.Tensor) and kv_b_weight.dtype == q.dtype):
            ok, reason = False, f"q on {q.device}, kv_b_proj weight {type(kv_b_weight).__name__}: not both CUDA"
        if ok and (meta.block_tables.dtype != torch.int32 or meta.ctx_lens.dtype != torch.int32
                   or meta.block_tables.shape[0] != num_tokens):
            ok, reason = False, "metadata without int32 block tables / context lengths, or not one query per sequence"
        if ok and (not latent_cache.is_contiguous() or latent_cache.data_ptr() % 16):
            ok, reason = False, "latent cache not contiguous and 16-byte aligned"
        if not ok:
            self._fallback("MLA decode attention" if decode else "MLA prefill attention", reason)
            return super().mla_attention(q, latent_cache, kv_b_weight, meta, scale, out)
        nope = qk_dim - rope
        w = kv_b_weight.view(heads, -1, lora)
        w_uk, w_uv = w[:, :nope], w[:, nope:]  # [h, Dn, L], [h, Dv, L]
        q_abs = torch.cat((torch.einsum("bhd,hdl->bhl", q[..., :nope], w_uk), q[..., nope:]), dim=-1)  # [B, h, L + R]
        out_lat = mla_kernel.mla_decode_attention(q_abs, latent_cache, meta.block_tables, meta.ctx_lens, scale,
                                                  lora)  # [B, h, L]
        result = torch.einsum("bhl,hvl->bhv", out_lat, w_uv)  # [B, h, Dv]
        return result if out is None else out.copy_(result)

    # ---- W4A16 linear layers (the attention projections): the W4A16 grouped GEMM with one expert ------------
    def prepare_linear_weight(self, weight):
        if not isinstance(weight, QuantizedWeight):
            return weight
        ok, reason = (False, "act-order (permuted) W4A16 weights") if weight.perm is not None else \
            w4a16_linear.supports(weight.shape[1], weight.shape[2], weight.group_size, weight.scales.dtype)
        if not ok:
            self._fallback("W4A16 linear", reason)
            return weight
        return w4a16_linear.prepare_linear(weight.qweight, weight.scales, weight.zeros, weight.group_size)

    def linear(self, x, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(weight, W4A16Weights):
            return w4a16_linear.w4a16_linear(x, weight, bias)
        return super().linear(x, weight, bias)

    # ---- dense bf16 linear layers at decode (the attention projections): the skinny GEMM ----------------------
    def dense_linear(self, x, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """With skinny_gemm (the default), steps of up to skinny_max_rows rows of a bf16 weight on
        kernels/skinny_gemm.py;
        prefill rows, CPU tensors and what the kernel does not take on torch's F.linear (cuBLAS). A captured decode
        graph has a fixed M, so a fixed choice."""
        if not self.skinny_gemm:
            return super().dense_linear(x, weight, bias)
        ok, reason = self._skinny_supports(x, weight, bias)
        if not ok:
            if reason is not None:
                self._fallback("skinny linear", reason)
            return super().dense_linear(x, weight, bias)
        if not x.is_contiguous() or x.data_ptr() % 16:  # the kernel's TMA reads 16-byte aligned rows
            x = x.clone(memory_format=torch.contiguous_format)
        return skinny_gemm.skinny_linear(x, weight, bias)

    def _skinny_supports(self, x, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[bool, str | None]:
        """(ok, reason) for the skinny GEMM; reason None where F.linear is the intended path (more than
        skinny_max_rows or no rows, CPU tensors) rather than a fallback worth logging."""
        num_rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not x.is_cuda or not 1 <= num_rows <= self.skinny_max_rows:
            return False, None
        ok, reason = skinny_gemm.supports(x.dtype, num_rows, weight.shape[0], weight.shape[-1], bias is not None)
        if ok and (weight.dim() != 2 or weight.dtype != x.dtype or not weight.is_contiguous()
                   or weight.data_ptr() % 16):
            ok, reason = False, f"weight {list(weight.shape)} {weight.dtype}: not a contiguous, 16-byte aligned [N, K]"
        if ok and bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
            ok, reason = False, f"bias {bias.dtype}: not contiguous in the activations' dtype {x.dtype}"
        return ok, reason
