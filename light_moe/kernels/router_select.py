"""The router's selection step for the routing variants of config.RouterConfig (DeepSeek-V2 / V3, gpt-oss).

Shape legend: T tokens, E experts, K top-k, G groups (n_group), E / G experts per group.
The gate GEMM is router.py's (shared); its top-k stage hands one token's fp32 logits to TokenSelect, one warp
per token, lane l holding experts l + 32 j. Semantics: light_moe.ops.reference.spec_router, computed in fp32:

  logits (+ gate bias)                                               gpt-oss: gate.bias
  scores  = softmax | sigmoid of the logits (softmax_topk: the logits)
  choice  = scores (+ correction bias)                               DeepSeek-V3: e_score_correction_bias
  groups  : choice of experts outside the topk_group best of G groups -> -inf; a group scores its best choice
            ("max", V2 group_limited_greedy) or the sum of its two best ("top2_sum", V3 noaux_tc)
  top-K of the choice, exact fp32 order, the lower expert id first on equal values
  weights = the chosen scores (softmax_topk: softmax of the chosen logits), optionally renormalised
            (sum + 1e-20), times routed_scaling_factor

The variant is static (Selection, a frozen dataclass in the router's compile key); the bias vectors [E] are
extra pointers, read in their own dtype. Unlike the default softmax top-k, which ranks 24-bit images of the
logits, the choice is ranked on its full fp32 value (a 64-bit key: order-preserving image of the value, then
255 - id), because the reference computes these variants in fp32 and V3's correction bias is fp32: the ids then
differ from the reference only where its fp32 rounding could reorder two choices.
"""
from __future__ import annotations

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
import torch
from cutlass import Float32, Int32, Int64
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

SCORINGS = ("softmax", "sigmoid", "softmax_topk")
GROUP_SCORES = ("max", "top2_sum")
MAX_GROUPS = 16  # the kept groups are ranked by G x G static compares
BIAS_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_CUTE_TYPES = {"bf16": cutlass.BFloat16, "fp16": cutlass.Float16, "fp32": Float32}
_KEY_REMOVED = -(2 ** 63)  # below every key, the image of -inf included


@dataclass(frozen=True)
class Selection:
    """A routing variant as the kernel compiles it (config.RouterConfig plus the bias vectors' storage)."""

    scoring: str = "softmax"  # softmax | sigmoid | softmax_topk
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"  # max | top2_sum
    scale: float = 1.0  # routed_scaling_factor
    gate_bias: str | None = None  # dtype name of the gate bias [E] added to the logits; None: no bias
    correction_bias: str | None = None  # dtype name of the correction bias [E] added to the choice; None: none

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {self.group_score!r}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} outside [1, n_group={self.n_group}]")
        for name in ("gate_bias", "correction_bias"):
            dtype = getattr(self, name)
            if dtype not in (None, *_CUTE_TYPES):
                raise ValueError(f"{name} dtype must be None or one of {tuple(_CUTE_TYPES)}, got {dtype!r}")

    @property
    def groups(self) -> bool:
        return self.n_group > 1

    def bias_type(self, name: str):
        """The CuTe element type of a bias pointer (fp32 for an absent one: a placeholder never read)."""
        return _CUTE_TYPES[getattr(self, name) or "fp32"]


def selection_for(spec, gate_bias: torch.Tensor | None = None,
                  correction_bias: torch.Tensor | None = None) -> Selection:
    """The Selection of a config.RouterConfig, as reference.spec_router applies it: a bias acts when its tensor is
    given; softmax_topk (gpt-oss) has neither groups nor a correction bias."""
    for name, bias in (("gate_bias", gate_bias), ("correction_bias", correction_bias)):
        if bias is not None and bias.dtype not in BIAS_DTYPES:
            raise TypeError(f"{name} must be bf16, fp16 or fp32, got {bias.dtype}")
    topk_only = spec.scoring == "softmax_topk"
    return Selection(
        scoring=spec.scoring,
        n_group=1 if topk_only else spec.n_group,
        topk_group=1 if topk_only else spec.topk_group,
        group_score=spec.group_score,
        scale=float(spec.routed_scaling_factor),
        gate_bias=None if gate_bias is None else BIAS_DTYPES[gate_bias.dtype],
        correction_bias=None if correction_bias is None or topk_only else BIAS_DTYPES[correction_bias.dtype])


def supports(selection: Selection, num_experts: int, top_k: int) -> tuple[bool, str]:
    """Whether TokenSelect takes this variant (the router's own limits: router.supports)."""
    if not selection.groups:
        return True, "ok"
    n_group, per_group = selection.n_group, num_experts // selection.n_group
    if num_experts % n_group:
        return False, f"num_experts={num_experts} is not a multiple of n_group={n_group}"
    if n_group > MAX_GROUPS:
        return False, f"n_group={n_group} above {MAX_GROUPS}"
    if selection.group_score == "top2_sum" and per_group < 2:
        return False, f"top2_sum group scores need >= 2 experts per group, got {per_group}"
    if selection.topk_group * per_group < top_k:
        return False, (f"top_k={top_k} exceeds the {selection.topk_group * per_group} experts of the "
                       f"topk_group={selection.topk_group} kept groups")
    return True, "ok"


@dsl_user_op
def exact_key(value, expert, *, loc=None, ip=None):
    """Int64 key ordered like (fp32 value, then lower expert id): the order-preserving int32 image of the value
    (negative floats: magnitude bits flipped), sign-extended, shifted left 8, with 255 - expert below."""
    bits = Int32(llvm.bitcast(T.i32(), Float32(value).ir_value(loc=loc, ip=ip), loc=loc, ip=ip))
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    wide = llvm.sext(T.i64(), ordered.ir_value(loc=loc, ip=ip), loc=loc, ip=ip)
    low = llvm.zext(T.i64(), Int32(255 - expert).ir_value(loc=loc, ip=ip), loc=loc, ip=ip)
    return (Int64(wide) << 8) | Int64(low)


@dsl_user_op
def key_expert(key, *, loc=None, ip=None):
    """The expert id of an exact_key."""
    low = llvm.trunc(T.i32(), Int64(key).ir_value(loc=loc, ip=ip), llvm.IntegerOverflowFlags.none, loc=loc, ip=ip)
    return 255 - (Int32(low) & 0xFF)


@cute.jit
def take_best(keys: cute.Tensor, values: cute.Tensor, lane: Int32, expert_of: cutlass.Constexpr,
              removed: cutlass.Constexpr):
    """One round of a warp arg-max over integer keys (lane l holds experts l + 32 j in keys[j]; expert_of(key) gives
    a key's expert): returns the winner's id and values[j] from the winner's lane, and removes the winner's key."""
    per_lane = cute.size(keys)
    key = keys.element_type(removed)
    v = -Float32.inf
    for j in cutlass.range_constexpr(per_lane):
        better = keys[j] > key
        v = values[j] if better else v
        key = keys[j] if better else key
    for step in cutlass.range_constexpr(5):
        other = cute.arch.shuffle_sync_bfly(key, offset=16 >> step)
        key = other if other > key else key
    i = expert_of(key)
    v = cute.arch.shuffle_sync(v, i % 32)  # the winner's value from its lane
    for j in cutlass.range_constexpr(per_lane):
        if i == lane + 32 * j:
            keys[j] = keys.element_type(removed)
    return i, v


def _fmin(a, b):
    return -cute.arch.fmax(-a, -b)  # 4.3.5 has fmax only


class TokenSelect:
    """One token's selection on one warp (traced inline by router.RouterKernel.topk_tokens)."""

    def __init__(self, selection: Selection, num_experts: int, top_k: int, renormalize: bool):
        self.sel = selection
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.per_lane = (num_experts + 31) // 32
        self.per_group = num_experts // selection.n_group
        # a group of a multiple of 32 experts is whole registers j of every lane: membership known while tracing
        self.static_groups = self.per_group % 32 == 0

    @cute.jit
    def select(self, vals: cute.Tensor, lane: Int32, correction: cute.Tensor, best_w: cute.Tensor,
               best_id: cute.Tensor):
        """vals: this lane's logits (gate bias included, -inf past E) -> best_w [K] (final weights) and best_id [K],
        the same on every lane, in descending choice order."""
        sel, n_exp, k, per_lane = self.sel, self.num_experts, self.top_k, self.per_lane
        scores = cute.make_rmem_tensor((per_lane,), Float32)
        choice = cute.make_rmem_tensor((per_lane,), Float32)
        if cutlass.const_expr(sel.scoring == "softmax"):
            row_max = -Float32.inf
            for j in cutlass.range_constexpr(per_lane):
                row_max = cute.arch.fmax(row_max, vals[j])
            row_max = cute.arch.warp_reduction_max(row_max)
            denom = Float32(0.0)
            for j in cutlass.range_constexpr(per_lane):
                scores[j] = cute.math.exp(vals[j] - row_max, fastmath=True)
                denom += scores[j]
            denom = cute.arch.warp_reduction_sum(denom)
            for j in cutlass.range_constexpr(per_lane):
                scores[j] = scores[j] / denom
        elif cutlass.const_expr(sel.scoring == "sigmoid"):
            for j in cutlass.range_constexpr(per_lane):
                scores[j] = 1.0 / (1.0 + cute.math.exp(-vals[j], fastmath=True))
        else:
            for j in cutlass.range_constexpr(per_lane):
                scores[j] = vals[j]
        for j in cutlass.range_constexpr(per_lane):
            e = lane + 32 * j
            c = -Float32.inf  # experts past E are never chosen
            if e < n_exp:
                c = scores[j]
                if cutlass.const_expr(sel.correction_bias is not None):
                    c = c + correction[e].to(Float32)
            choice[j] = c
        if cutlass.const_expr(sel.groups):
            self.limit_groups(choice, lane)

        keys = cute.make_rmem_tensor((per_lane,), Int64)
        for j in cutlass.range_constexpr(per_lane):
            keys[j] = exact_key(choice[j], lane + 32 * j)
        for kk in cutlass.range_constexpr(k):
            i, s = take_best(keys, scores, lane, key_expert, _KEY_REMOVED)  # the winner and its unbiased score
            best_id[kk] = i
            best_w[kk] = s

        scale = Float32(sel.scale)
        if cutlass.const_expr(sel.scoring == "softmax_topk"):
            top = best_w[0]  # the largest chosen logit
            total = Float32(0.0)
            for kk in cutlass.range_constexpr(k):
                best_w[kk] = cute.math.exp(best_w[kk] - top, fastmath=True)
                total += best_w[kk]
            scale = scale / total
        elif cutlass.const_expr(self.renormalize):
            total = Float32(0.0)
            for kk in cutlass.range_constexpr(k):
                total += best_w[kk]
            scale = scale / (total + 1e-20)
        for kk in cutlass.range_constexpr(k):
            best_w[kk] = best_w[kk] * scale

    @cute.jit
    def limit_groups(self, choice: cute.Tensor, lane: Int32):
        """Sets the choice of every expert outside the topk_group best groups to -inf. A group's score is its best
        choice, or the sum of its two best (top2_sum), over the whole warp; groups rank by score, the lower group
        first on equal scores."""
        sel, per_lane, per_group = self.sel, self.per_lane, self.per_group
        n_group = sel.n_group
        top2 = sel.group_score == "top2_sum"
        group_score = cute.make_rmem_tensor((n_group,), Float32)
        for g in cutlass.range_constexpr(n_group):
            m1 = -Float32.inf  # this lane's best choice in group g, then the warp's
            m2 = -Float32.inf  # second best
            for j in cutlass.range_constexpr(per_lane):
                if cutlass.const_expr(self.static_groups):
                    if cutlass.const_expr(j // (per_group // 32) == g):
                        m2 = cute.arch.fmax(m2, _fmin(m1, choice[j]))
                        m1 = cute.arch.fmax(m1, choice[j])
                else:
                    c = -Float32.inf
                    if (lane + 32 * j) // per_group == g:
                        c = choice[j]
                    m2 = cute.arch.fmax(m2, _fmin(m1, c))
                    m1 = cute.arch.fmax(m1, c)
            if cutlass.const_expr(top2):
                for step in cutlass.range_constexpr(5):  # merge disjoint halves' top-2s: all lanes end equal
                    o1 = cute.arch.shuffle_sync_bfly(m1, offset=16 >> step)
                    o2 = cute.arch.shuffle_sync_bfly(m2, offset=16 >> step)
                    m2 = cute.arch.fmax(cute.arch.fmax(m2, o2), _fmin(m1, o1))
                    m1 = cute.arch.fmax(m1, o1)
                group_score[g] = m1 + m2
            else:
                group_score[g] = cute.arch.warp_reduction_max(m1)
        kept = cute.make_rmem_tensor((n_group,), Int32)
        for g in cutlass.range_constexpr(n_group):
            rank = Int32(0)  # groups ahead of g
            for h in cutlass.range_constexpr(n_group):
                if cutlass.const_expr(h < g):
                    rank += Int32(1) if group_score[h] >= group_score[g] else Int32(0)
                elif cutlass.const_expr(h > g):
                    rank += Int32(1) if group_score[h] > group_score[g] else Int32(0)
            kept[g] = Int32(1) if rank < sel.topk_group else Int32(0)
        for j in cutlass.range_constexpr(per_lane):
            keep = Int32(0)
            if cutlass.const_expr(self.static_groups):
                keep = kept[j // (per_group // 32)]
            else:
                group = (lane + 32 * j) // per_group
                for g in cutlass.range_constexpr(n_group):
                    keep = kept[g] if group == g else keep
            if keep == 0:
                choice[j] = -Float32.inf
