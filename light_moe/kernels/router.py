"""Fused MoE router: gate GEMM + softmax + top-k + optional renormalisation + per-expert counts.

Shape legend: T tokens, E experts, K top-k, H hidden.
x [T, H] and gate_weight [E, H] (bf16, fp16 or fp32, the same dtype) ->
topk_weights [T, K] fp32, topk_ids [T, K] int32, tokens_per_expert [E] int32.
Semantics: light_moe.ops.reference.router (ties go to the lower expert id).

One launch (plus a memset of tokens_per_expert). A CTA owns TM tokens and all E experts:
  1. Gate GEMM on the tensor cores with warp-level mma.sync, fed straight from global memory.
     The reduction dimension H may be permuted freely as long as x and gate_weight use the same
     permutation, so each lane loads 16 contiguous bytes of a row (one 128-bit load) and uses the
     four 32-bit words as the A / B fragments of two mma k-steps. No shared-memory staging or
     ldmatrix is needed; every x byte is read by exactly one lane. bf16/fp16 use m16n8k16 with
     fp32 accumulation; fp32 uses m16n8k8 tf32 three times (big*big + big*small + small*big),
     which keeps fp32 accuracy (~1e-6 relative).
  2. Warps split the CTA tile into MW token groups x NG expert groups x KS slices of H; the KS
     partial sums meet in shared memory (summed in a fixed order: deterministic).
  3. One warp per token: softmax statistics and top-k over the E logits (fp32) with warp
     shuffles; top-k runs on the logits (softmax is monotonic), lower id wins ties.
  4. Counts: shared-memory histogram per CTA, then one global atomic per non-empty expert.

Logits stay fp32; the reference rounds F.linear's bf16 output to bf16 first, so near-ties may pick
a different expert and weights differ by ~bf16 rounding of the logits (<1e-2 relative).
"""
from __future__ import annotations

from dataclasses import dataclass

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import torch
from cutlass import Float32, Int32
from cutlass._mlir.dialects import llvm, nvvm
from cutlass._mlir.dialects.nvvm import AtomicOpKind, MemOrderKind, MemScopeKind
from cutlass.cute.runtime import make_ptr
from cutlass.cutlass_dsl import T, dsl_user_op

_TORCH_TO_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
MAX_EXPERTS = 256
MAX_TOP_K = 8
# Token counts above this use the "large" tile table (more tokens per CTA: gate_weight re-read
# from L2 fewer times); at or below it, the "small" table (H split across warps: more CTAs in
# flight for few tokens).
LARGE_T_THRESHOLD = 1024


@dataclass(frozen=True)
class RouterTile:
    """Static work split of one CTA. TM = 16 * MW * MT tokens; NG * NTW * 8 >= E experts."""

    mw: int  # warps along tokens
    ng: int  # warps along experts
    ks: int  # warps along H (partial sums reduced in shared memory)
    mt: int  # 16-token mma tiles per warp
    ntw: int  # 8-expert mma tiles per warp
    unroll: int  # 64-byte chunks of each row loaded per loop step and lane group

    @property
    def warps(self) -> int:
        return self.mw * self.ng * self.ks

    @property
    def tokens(self) -> int:
        return 16 * self.mw * self.mt


def choose_tile(num_experts: int, num_tokens: int) -> RouterTile:
    """Tile from a small table on (E, T regime). Uses host-known sizes only (graph-safe)."""
    n_tiles = -(-num_experts // 8)
    large = num_tokens > LARGE_T_THRESHOLD
    if n_tiles <= 2:
        return RouterTile(4, 1, 2, 1, n_tiles, 4) if large else RouterTile(1, 1, 8, 1, n_tiles, 4)
    if n_tiles <= 8:
        return RouterTile(4, 1, 2, 1, n_tiles, 2) if large else RouterTile(1, 1, 8, 1, n_tiles, 2)
    if n_tiles <= 16:
        ntw = -(-n_tiles // 2)
        return RouterTile(4, 2, 1, 1, ntw, 2) if large else RouterTile(1, 2, 4, 1, ntw, 2)
    ntw = -(-n_tiles // 4)
    return RouterTile(2, 4, 1, 2, ntw, 1) if large else RouterTile(1, 4, 2, 1, ntw, 2)


def supports(dtype: torch.dtype, hidden_size: int, num_experts: int, top_k: int) -> tuple[bool, str]:
    """Whether the fused router kernel handles this problem; the reason names what is wrong."""
    if dtype not in _TORCH_TO_NAME:
        return False, f"dtype {dtype} unsupported (bf16, fp16, fp32)"
    if not 1 <= num_experts <= MAX_EXPERTS:
        return False, f"num_experts={num_experts} outside [1, {MAX_EXPERTS}]"
    if not 1 <= top_k <= min(MAX_TOP_K, num_experts):
        return False, f"top_k={top_k} outside [1, min({MAX_TOP_K}, num_experts={num_experts})]"
    row_bytes = hidden_size * torch.empty((), dtype=dtype).element_size()
    if hidden_size <= 0 or row_bytes % 64:
        return False, f"hidden_size={hidden_size}: rows must be a multiple of 64 bytes"
    return True, "ok"


# --------------------------------------------------------------------------------------------
# Device helpers (inline PTX for what CuTe DSL 4.3.5 does not wrap)
# --------------------------------------------------------------------------------------------

def _struct4():
    return llvm.StructType.get_literal([T.f32(), T.f32(), T.f32(), T.f32()])

@dsl_user_op
def mma_16bit(a, b, c, instr, *, loc=None, ip=None):
    """c += A(16 x k16) B(k16 x 8): a = 4 x i32, b = 2 x i32, c = 4 x f32; returns 4 x f32."""
    ops = [Int32(v).ir_value(loc=loc, ip=ip) for v in (*a, *b)]
    ops += [Float32(v).ir_value(loc=loc, ip=ip) for v in c]
    res = llvm.inline_asm(
        _struct4(), ops,
        f"mma.sync.aligned.m16n8k16.row.col.f32.{instr}.{instr}.f32 "
        "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
        "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
        has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
        loc=loc, ip=ip)
    return [Float32(llvm.extractvalue(T.f32(), res, [i], loc=loc, ip=ip)) for i in range(4)]

@dsl_user_op
def mma_3xtf32(a_big, a_small, b_big, b_small, c, *, loc=None, ip=None):
    """c += A B in ~fp32 accuracy: three m16n8k8 tf32 mma (small terms first)."""
    ops = [Int32(v).ir_value(loc=loc, ip=ip) for v in (*a_big, *a_small, *b_big, *b_small)]
    ops += [Float32(v).ir_value(loc=loc, ip=ip) for v in c]
    res = llvm.inline_asm(
        _struct4(), ops,
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{$0, $1, $2, $3}, {$8, $9, $10, $11}, {$12, $13}, {$16, $17, $18, $19};\n\t"
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$14, $15}, {$0, $1, $2, $3};\n\t"
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$12, $13}, {$0, $1, $2, $3};",
        "=&f,=&f,=&f,=&f,r,r,r,r,r,r,r,r,r,r,r,r,f,f,f,f",
        has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
        loc=loc, ip=ip)
    return [Float32(llvm.extractvalue(T.f32(), res, [i], loc=loc, ip=ip)) for i in range(4)]

@dsl_user_op
def split_tf32(word, *, loc=None, ip=None):
    """fp32 bits -> (tf32 big, tf32 small) with big + small ~= value to ~2^-22."""
    res = llvm.inline_asm(
        llvm.StructType.get_literal([T.i32(), T.i32()]),
        [Int32(word).ir_value(loc=loc, ip=ip)],
        "{\n\t.reg .f32 rest;\n\t"
        "cvt.rna.tf32.f32 $0, $2;\n\t"
        "sub.f32 rest, $2, $0;\n\t"
        "cvt.rna.tf32.f32 $1, rest;\n\t}",
        "=r,=r,r",
        has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
        loc=loc, ip=ip)
    return (Int32(llvm.extractvalue(T.i32(), res, [0], loc=loc, ip=ip)),
            Int32(llvm.extractvalue(T.i32(), res, [1], loc=loc, ip=ip)))

@dsl_user_op
def atomic_add(ptr, val, scope, *, loc=None, ip=None):
    """Relaxed atomic add on an int32 (global or shared pointer)."""
    nvvm.atomicrmw(T.i32(), AtomicOpKind.ADD, ptr.llvm_ptr, Int32(val).ir_value(loc=loc, ip=ip),
                   mem_order=MemOrderKind.RELAXED, syncscope=scope, loc=loc, ip=ip)

class RouterKernel:
    """Compiled once per (dtype, H, E, K, renormalize, tile)."""

    def __init__(self, dtype_name: str, hidden: int, num_experts: int, top_k: int,
                 renormalize: bool, tile: RouterTile):
        self.dtype_name = dtype_name
        self.words = hidden * (4 if dtype_name == "fp32" else 2) // 4  # 32-bit words per row
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.tile = tile
        self.e_pad = 8 * tile.ng * tile.ntw
        self.threads = 32 * tile.warps

    @cute.jit
    def __call__(self, x_ptr: cute.Pointer, w_ptr: cute.Pointer, weights_ptr: cute.Pointer,
                 ids_ptr: cute.Pointer, counts_ptr: cute.Pointer, n_tokens: Int32,
                 stream: cuda.CUstream):
        words, n_exp, k = self.words, self.num_experts, self.top_k
        x = cute.make_tensor(x_ptr, cute.make_layout((n_tokens, words), stride=(words, 1)))
        w = cute.make_tensor(w_ptr, cute.make_layout((n_exp, words), stride=(words, 1)))
        weights = cute.make_tensor(weights_ptr, cute.make_layout((n_tokens, k), stride=(k, 1)))
        ids = cute.make_tensor(ids_ptr, cute.make_layout((n_tokens, k), stride=(k, 1)))
        counts = cute.make_tensor(counts_ptr, cute.make_layout((n_exp,)))
        self.kernel(x, w, weights, ids, counts, n_tokens).launch(
            grid=(cute.ceil_div(n_tokens, self.tile.tokens), 1, 1),
            block=(self.threads, 1, 1), stream=stream)

    # Plain-Python helpers: traced inline (loops unroll at trace time, no DSL preprocessing).
    def load_chunk(self, copy128, x_rows, w_rows, chunk, quad, xa, wb, u):
        """Lane (group, quad) loads 16 bytes at vector 4 * chunk + quad of its x rows and expert rows."""
        vec = chunk * 4 + quad
        for i in range(2 * self.tile.mt):
            cute.copy(copy128, x_rows[i][None, vec], xa[None, u * 2 * self.tile.mt + i])
        for nt in range(self.tile.ntw):
            cute.copy(copy128, w_rows[nt][None, vec], wb[None, u * self.tile.ntw + nt])

    def mma_chunk(self, acc, xa, wb, u):
        """Two mma k-steps per 16-byte vector: step s uses words 2s, 2s+1 of every loaded vector as
        the (k-pair quad, k-pair quad + 4) halves of the A and B fragments (same for m16n8k16 bf16
        and m16n8k8 tf32), i.e. a permutation of H applied to x and gate_weight alike."""
        mt_n, ntw = self.tile.mt, self.tile.ntw
        for s in range(2):
            if self.dtype_name == "fp32":
                b_split = []
                for nt in range(ntw):
                    col = u * ntw + nt
                    b_split.append((split_tf32(wb[2 * s, col]), split_tf32(wb[2 * s + 1, col])))
                for mt in range(mt_n):
                    r0 = u * 2 * mt_n + 2 * mt
                    parts = [split_tf32(xa[2 * s, r0]), split_tf32(xa[2 * s, r0 + 1]),
                             split_tf32(xa[2 * s + 1, r0]), split_tf32(xa[2 * s + 1, r0 + 1])]
                    a_big = [p[0] for p in parts]
                    a_small = [p[1] for p in parts]
                    for nt in range(ntw):
                        (b0_big, b0_small), (b1_big, b1_small) = b_split[nt]
                        j = mt * ntw + nt
                        res = mma_3xtf32(a_big, a_small, (b0_big, b1_big), (b0_small, b1_small),
                                         [acc[0, j], acc[1, j], acc[2, j], acc[3, j]])
                        for q in range(4):
                            acc[q, j] = res[q]
            else:
                instr = "bf16" if self.dtype_name == "bf16" else "f16"
                for mt in range(mt_n):
                    r0 = u * 2 * mt_n + 2 * mt
                    a = (xa[2 * s, r0], xa[2 * s, r0 + 1], xa[2 * s + 1, r0], xa[2 * s + 1, r0 + 1])
                    for nt in range(ntw):
                        col = u * ntw + nt
                        j = mt * ntw + nt
                        res = mma_16bit(a, (wb[2 * s, col], wb[2 * s + 1, col]),
                                        [acc[0, j], acc[1, j], acc[2, j], acc[3, j]], instr)
                        for q in range(4):
                            acc[q, j] = res[q]

    @cute.kernel
    def kernel(self, x: cute.Tensor, w: cute.Tensor, weights: cute.Tensor, ids: cute.Tensor,
               counts: cute.Tensor, n_tokens: Int32):
        tile = self.tile
        n_exp, k, e_pad, threads = self.num_experts, self.top_k, self.e_pad, self.threads
        mw_n, ng_n, ks_n, mt_n, ntw, unroll = tile.mw, tile.ng, tile.ks, tile.mt, tile.ntw, tile.unroll
        tm = tile.tokens
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        lane = cute.arch.lane_idx()
        group = lane // 4  # mma groupID: token row / expert column
        quad = lane % 4  # mma threadID_in_group: which 16-byte vector of a 64-byte chunk
        w_m = warp % mw_n
        w_n = (warp // mw_n) % ng_n
        w_k = warp // (mw_n * ng_n)

        smem = cutlass.utils.SmemAllocator()
        partial = smem.allocate_tensor(Float32, cute.make_layout((e_pad, tm, ks_n), stride=(1, e_pad, e_pad * tm)),
                                       byte_alignment=16)
        hist = smem.allocate_tensor(Int32, cute.make_layout((n_exp,)), byte_alignment=16)
        for e in range(tidx, n_exp, threads):
            hist[e] = Int32(0)

        # ---- 1. gate GEMM: acc[mt, nt] (16 tokens x 8 experts) over this warp's H slice ----
        copy128 = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), Int32, num_bits_per_copy=128)
        last_token = n_tokens - 1
        token0 = bidx * tm + w_m * (16 * mt_n)
        x_rows = []  # [mt][half] -> ((4), words/4) view; rows past T are clamped (never stored)
        for mt in cutlass.range_constexpr(mt_n):
            for half in cutlass.range_constexpr(2):
                row = token0 + mt * 16 + half * 8 + group
                row = row if row < n_tokens else last_token
                x_rows.append(cute.zipped_divide(x[row, None], (4,)))
        w_rows = []  # experts past E are clamped (masked in the top-k)
        for nt in cutlass.range_constexpr(ntw):
            expert = (w_n * ntw + nt) * 8 + group
            expert = expert if expert < n_exp else n_exp - 1
            w_rows.append(cute.zipped_divide(w[expert, None], (4,)))

        acc = cute.make_rmem_tensor((4, mt_n * ntw), Float32)
        acc.fill(0.0)
        n_chunks = self.words // 16  # 64-byte chunks per row
        n_steps = n_chunks // (ks_n * unroll)

        xa = cute.make_rmem_tensor((4, unroll * 2 * mt_n), Int32)
        wb = cute.make_rmem_tensor((4, unroll * ntw), Int32)
        for step in range(n_steps):
            for u in cutlass.range_constexpr(unroll):
                self.load_chunk(copy128, x_rows, w_rows, (step * ks_n + w_k) * unroll + u, quad, xa, wb, u)
            for u in cutlass.range_constexpr(unroll):
                self.mma_chunk(acc, xa, wb, u)
        if cutlass.const_expr(n_steps * ks_n * unroll < n_chunks):
            for chunk in range(n_steps * ks_n * unroll + w_k, n_chunks, ks_n):
                self.load_chunk(copy128, x_rows, w_rows, chunk, quad, xa, wb, 0)
                self.mma_chunk(acc, xa, wb, 0)

        # accumulator fragment: c0,c1 -> (row group, cols 2q, 2q+1); c2,c3 -> row group + 8
        for mt in cutlass.range_constexpr(mt_n):
            row = w_m * (16 * mt_n) + mt * 16 + group
            for nt in cutlass.range_constexpr(ntw):
                col = (w_n * ntw + nt) * 8 + 2 * quad
                j = mt * ntw + nt
                partial[col, row, w_k] = acc[0, j]
                partial[col + 1, row, w_k] = acc[1, j]
                partial[col, row + 8, w_k] = acc[2, j]
                partial[col + 1, row + 8, w_k] = acc[3, j]
        cute.arch.sync_threads()

        # ---- 2. softmax + top-k, one warp per token; lane owns experts lane + 32 j ----
        per_lane = (n_exp + 31) // 32
        vals = cute.make_rmem_tensor((per_lane,), Float32)
        best_p = cute.make_rmem_tensor((k,), Float32)
        best_id = cute.make_rmem_tensor((k,), Int32)
        for local in range(warp, tm, tile.warps):
            token = bidx * tm + local
            if token < n_tokens:
                row_max = -Float32.inf
                for j in cutlass.range_constexpr(per_lane):
                    e = lane + 32 * j
                    v = -Float32.inf
                    if e < n_exp:
                        v = partial[e, local, 0]
                        for kk in cutlass.range_constexpr(1, ks_n):
                            v = v + partial[e, local, kk]
                    vals[j] = v
                    row_max = cute.arch.fmax(row_max, v)
                row_max = cute.arch.warp_reduction_max(row_max)
                denom = Float32(0.0)
                for j in cutlass.range_constexpr(per_lane):
                    denom += cute.math.exp(vals[j] - row_max, fastmath=True)
                denom = cute.arch.warp_reduction_sum(denom)
                picked = Float32(0.0)
                for kk in cutlass.range_constexpr(k):
                    v = -Float32.inf
                    i = Int32(n_exp)
                    for j in cutlass.range_constexpr(per_lane):
                        if vals[j] > v:  # strict: the lower id wins inside a lane
                            v = vals[j]
                            i = lane + 32 * j
                    for s in cutlass.range_constexpr(5):
                        other_v = cute.arch.shuffle_sync_bfly(v, offset=16 >> s)
                        other_i = cute.arch.shuffle_sync_bfly(i, offset=16 >> s)
                        if other_v > v or (other_v == v and other_i < i):
                            v = other_v
                            i = other_i
                    for j in cutlass.range_constexpr(per_lane):
                        if i == lane + 32 * j:
                            vals[j] = -Float32.inf
                    p = cute.math.exp(v - row_max, fastmath=True)
                    best_p[kk] = p
                    best_id[kk] = i
                    picked += p
                scale = 1.0 / denom
                if cutlass.const_expr(self.renormalize):
                    scale = 1.0 / picked
                for kk in cutlass.range_constexpr(k):
                    if lane == kk:
                        weights[token, kk] = best_p[kk] * scale
                        ids[token, kk] = best_id[kk]
                        if best_id[kk] < n_exp:  # only NaN logits leave no winner
                            atomic_add(hist.iterator + best_id[kk], Int32(1), MemScopeKind.CTA)
        cute.arch.sync_threads()
        for e in range(tidx, n_exp, threads):
            c = hist[e]
            if c > 0:
                atomic_add(counts.iterator + e, c, MemScopeKind.GPU)

def make_compile_args(dtype: torch.dtype, hidden: int, num_experts: int, top_k: int, renormalize: bool,
                      tile: RouterTile, stream=None):
    """(jit function, arguments) for cute.compile; placeholder pointers, T dynamic. Used by the
    cache below and by the CPU compile tests (pass cute.runtime.make_fake_stream() there)."""
    name = _TORCH_TO_NAME[dtype]
    gmem = cute.AddressSpace.gmem
    fn = RouterKernel(name, hidden, num_experts, top_k, renormalize, tile)
    args = (make_ptr(Int32, 16, gmem, assumed_align=16), make_ptr(Int32, 16, gmem, assumed_align=16),
            make_ptr(Float32, 16, gmem, assumed_align=4), make_ptr(Int32, 16, gmem, assumed_align=4),
            make_ptr(Int32, 16, gmem, assumed_align=4), Int32(1), stream)
    return fn, args


_compiled: dict = {}  # (dtype, H, E, K, renormalize, tile) -> compiled function; never keyed on T
_streams: dict = {}  # torch stream handle -> CUstream (building one costs ~8 us)


def _current_stream():
    handle = torch.cuda.current_stream().cuda_stream
    stream = _streams.get(handle)
    if stream is None:
        stream = _streams[handle] = cuda.CUstream(handle)
    return stream


def compiled_router(dtype: torch.dtype, hidden: int, num_experts: int, top_k: int, renormalize: bool,
                    tile: RouterTile):
    key = (dtype, hidden, num_experts, top_k, bool(renormalize), tile)
    fn = _compiled.get(key)
    if fn is None:
        jit_fn, args = make_compile_args(dtype, hidden, num_experts, top_k, renormalize, tile, _current_stream())
        fn = _compiled[key] = cute.compile(jit_fn, *args)
    return fn


def _check(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int) -> None:
    if x.dim() != 2 or gate_weight.dim() != 2 or x.shape[1] != gate_weight.shape[1]:
        raise ValueError(f"expected x [T, H] and gate_weight [E, H], got {tuple(x.shape)} and "
                         f"{tuple(gate_weight.shape)}")
    if x.dtype != gate_weight.dtype:
        raise TypeError(f"x ({x.dtype}) and gate_weight ({gate_weight.dtype}) must share a dtype")
    ok, reason = supports(x.dtype, x.shape[1], gate_weight.shape[0], top_k)
    if not ok:
        raise ValueError(f"router kernel: {reason}")
    if not (x.is_cuda and gate_weight.is_cuda and x.is_contiguous() and gate_weight.is_contiguous()):
        raise ValueError("x and gate_weight must be contiguous CUDA tensors")
    if x.data_ptr() % 16 or gate_weight.data_ptr() % 16:
        raise ValueError("x and gate_weight must be 16-byte aligned (128-bit loads)")


def router_into(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, renormalize: bool,
                topk_weights: torch.Tensor, topk_ids: torch.Tensor, tokens_per_expert: torch.Tensor,
                tile: RouterTile | None = None) -> None:
    """Writes topk_weights [T, K] fp32, topk_ids [T, K] int32, tokens_per_expert [E] int32 (zeroed
    here, then counted). Two launches (memset + kernel) on the current stream; graph-capturable."""
    _check(x, gate_weight, top_k)
    num_tokens, hidden = x.shape
    num_experts = gate_weight.shape[0]
    if topk_weights.shape != (num_tokens, top_k) or topk_weights.dtype != torch.float32:
        raise ValueError(f"topk_weights must be [{num_tokens}, {top_k}] fp32")
    if topk_ids.shape != (num_tokens, top_k) or topk_ids.dtype != torch.int32:
        raise ValueError(f"topk_ids must be [{num_tokens}, {top_k}] int32")
    if tokens_per_expert.shape != (num_experts,) or tokens_per_expert.dtype != torch.int32:
        raise ValueError(f"tokens_per_expert must be [{num_experts}] int32")
    if not (topk_weights.is_contiguous() and topk_ids.is_contiguous() and tokens_per_expert.is_contiguous()):
        raise ValueError("outputs must be contiguous")
    tokens_per_expert.zero_()
    if num_tokens == 0:
        return
    tile = tile or choose_tile(num_experts, num_tokens)
    fn = compiled_router(x.dtype, hidden, num_experts, top_k, renormalize, tile)
    gmem = cute.AddressSpace.gmem
    fn(make_ptr(Int32, x.data_ptr(), gmem, assumed_align=16),
       make_ptr(Int32, gate_weight.data_ptr(), gmem, assumed_align=16),
       make_ptr(Float32, topk_weights.data_ptr(), gmem, assumed_align=4),
       make_ptr(Int32, topk_ids.data_ptr(), gmem, assumed_align=4),
       make_ptr(Int32, tokens_per_expert.data_ptr(), gmem, assumed_align=4),
       Int32(num_tokens), _current_stream())


def router(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, renormalize: bool
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as light_moe.ops.reference.router: (topk_weights fp32 [T, K], topk_ids int32 [T, K],
    tokens_per_expert int32 [E])."""
    num_tokens = x.shape[0]
    topk_weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=x.device)
    topk_ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=x.device)
    tokens_per_expert = torch.empty(gate_weight.shape[0], dtype=torch.int32, device=x.device)
    router_into(x, gate_weight, top_k, renormalize, topk_weights, topk_ids, tokens_per_expert)
    return topk_weights, topk_ids, tokens_per_expert
