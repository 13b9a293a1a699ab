"""Fused MoE router: gate GEMM + softmax + top-k + optional renormalisation + per-expert counts.

Shape legend: T tokens, E experts, K top-k, H hidden.
x [T, H] and gate_weight [E, H] (bf16, fp16 or fp32, the same dtype) ->
topk_weights [T, K] fp32, topk_ids [T, K] int32, tokens_per_expert [E] int32.
Semantics: light_moe.ops.reference.router (ties go to the lower expert id).

Two launches in either mode (graph-capturable, no host sync):
  fused  memset(tokens_per_expert) + one kernel; a CTA owns TM tokens and all E experts. With one CTA
         (T <= TM: decode) it stores the counts itself, no memset: one launch.
  split  (E > 16 and T <= SPLIT_MAX_TOKENS) a GEMM kernel on a (token tiles, expert groups,
         H slices) grid writes fp32 partial logits [HS, T, E], then a top-k kernel sums them.
         One CTA streaming a large gate_weight alone is latency-bound (timings: docs/kernels.md, Router).
Pieces:
  1. Gate GEMM on the tensor cores with warp-level mma.sync, fed straight from global memory.
     The reduction dimension H may be permuted freely as long as x and gate_weight use the same
     permutation, so each lane loads 16 contiguous bytes of a row (one 128-bit load) and uses the
     four 32-bit words as the A / B fragments of two mma k-steps. No shared-memory staging or
     ldmatrix is needed; every x byte is read by exactly one lane. bf16/fp16 use m16n8k16 with
     fp32 accumulation; fp32 uses m16n8k8 tf32 three times (big*big + big*small + small*big),
     which keeps fp32 accuracy (~1e-6 relative).
  2. Warps split the CTA tile into MW token groups x NG expert groups x KS slices of H; partial
     sums meet in shared memory (and across CTAs in the split scratch), always summed in a fixed
     order: deterministic.
  3. One warp per token: softmax statistics over the E fp32 logits by warp reductions; top-k by
     K rounds of a warp arg-max on int32 keys (order-preserving image of the logit with 255 - id
     in its low 8 bits: one shuffle + one integer max per step, lower id first on ties); the
     winner's exact logit gives its weight.
     With a Selection (router_select.py: DeepSeek-V2 / V3, gpt-oss) TokenSelect replaces this step's softmax
     top-k; the GEMM and the counts are the same.
  4. Counts: shared-memory histogram per CTA, then one global atomic per non-empty expert (one CTA:
     plain stores of every expert's count, which also clears the buffer).

Logits stay fp32; the reference rounds F.linear's bf16 output to bf16 first, so near-ties may pick
a different expert and weights differ by ~bf16 rounding of the logits (a few 1e-3 relative).
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

from light_moe.kernels.compile_cache import CompileCache
from light_moe.kernels.launch import await_inputs, current_stream
from light_moe.kernels.router_select import Selection, TokenSelect, take_best
from light_moe.kernels.router_select import supports as selection_supports
from light_moe.kernels.routing import scan_expert_counts

_TORCH_TO_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
MAX_EXPERTS = 256
MAX_TOP_K = 8
SM_COUNT = 132  # H100 SXM; only sizes the split grid, any Hopper part works
# Up to this many tokens, problems with E > 16 split the gate GEMM over CTAs (expert groups x
# slices of H) and run the top-k in a second launch: one CTA streaming all of a large gate_weight
# is latency-bound (docs/kernels.md, Router).
SPLIT_MAX_TOKENS = 1024
TOPK_TOKENS_PER_CTA = 8  # second launch of the split mode: one token per warp


@dataclass(frozen=True)
class RouterTile:
    """Static work split. A CTA computes TM = 16 * MW * MT tokens x EC = 8 * NG * NTW experts over
    1 / HS of H; the grid is (ceil(T / TM), EG, HS). EG = HS = 1 fuses the top-k into the GEMM
    kernel; otherwise the CTAs write fp32 partial logits and a second kernel does the top-k."""

    mw: int  # warps along tokens
    ng: int  # warps along experts
    ks: int  # warps along H (partial sums reduced in shared memory)
    mt: int  # 16-token mma tiles per warp
    ntw: int  # 8-expert mma tiles per warp
    unroll: int  # 64-byte chunks of each row loaded per loop step and lane group
    eg: int = 1  # CTA expert groups (grid y)
    hs: int = 1  # CTA slices of H (grid z)

    @property
    def warps(self) -> int:
        return self.mw * self.ng * self.ks

    @property
    def tokens(self) -> int:
        return 16 * self.mw * self.mt

    @property
    def split(self) -> bool:
        return self.eg > 1 or self.hs > 1


def choose_tile(num_experts: int, num_tokens: int, row_bytes: int = 8192) -> RouterTile:
    """Tile from a small table on (E, T, bytes per row). Host-known sizes only (graph-safe).

    For E <= 16 one 512-thread CTA per 16 tokens with H split over 16 warps won at every T (64- and
    128-token CTAs leave SMs idle and serialise long H loops); for larger E the split grid wins up to
    T = SPLIT_MAX_TOKENS. The sweep: docs/kernels.md, Router, "Tile choice".
    """
    n_tiles = -(-num_experts // 8)
    n_chunks = row_bytes // 64
    if n_tiles <= 2:
        return RouterTile(1, 1, 16, 1, n_tiles, 2)
    if num_tokens <= SPLIT_MAX_TOKENS:
        ntw = min(4, n_tiles)
        eg = -(-n_tiles // ntw)
        ks, unroll = 8, 2
        token_tiles = -(-num_tokens // 16)
        hs = 1
        for d in range(2, n_chunks + 1):  # most H slices that keep one full loop step per warp
            if n_chunks % d == 0 and n_chunks // d >= ks * unroll and token_tiles * eg * d <= 2 * SM_COUNT:
                hs = d
        return RouterTile(1, 1, ks, 1, ntw, unroll, eg, hs)
    if n_tiles <= 8:
        return RouterTile(1, 1, 8, 1, n_tiles, 2)
    if n_tiles <= 16:  # 64 tokens per CTA re-read gate_weight 4x less (faster at E=128, T=16384; docs/kernels.md)
        ntw = -(-n_tiles // 2)
        return RouterTile(4, 2, 1, 1, ntw, 2) if num_tokens > 8192 else RouterTile(1, 2, 4, 1, ntw, 2)
    return RouterTile(1, 4, 2, 1, -(-n_tiles // 4), 2)


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


@dsl_user_op
def selection_key(value, expert, *, loc=None, ip=None):
    """Order-preserving int32 image of an fp32 logit with 255 - expert in the low 8 bits: one integer
    max per shuffle step selects the top value, lower id first among values equal in the upper 24
    bits (within ~2^-15 relative, far below the bf16 rounding of any gate input)."""
    bits = Int32(llvm.bitcast(T.i32(), Float32(value).ir_value(loc=loc, ip=ip), loc=loc, ip=ip))
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip magnitude bits
    return (ordered & -256) | (255 - expert)


_KEY_REMOVED = -(2 ** 31)


def _key_expert(key):
    return 255 - (key & 0xFF)


class RouterKernel:
    """Compiled once per (dtype, H, E, K, renormalize, tile, single_cta, metadata, selection)."""

    def __init__(self, dtype_name: str, hidden: int, num_experts: int, top_k: int,
                 renormalize: bool, tile: RouterTile, single_cta: bool = False, metadata: bool = False,
                 selection: Selection | None = None):
        self.dtype_name = dtype_name
        self.words = hidden * (4 if dtype_name == "fp32" else 2) // 4  # 32-bit words per row
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        if 8 * tile.ng * tile.ntw * tile.eg < num_experts:  # a CTA row would never see the last experts
            raise ValueError(f"router tile covers {8 * tile.ng * tile.ntw * tile.eg} experts (8 x ng x ntw x eg), "
                             f"E={num_experts}")
        self.tile = tile
        # the launch has one CTA (fused tile, T <= tile.tokens): it owns every count, so it stores them and
        # the memset launch goes
        self.single_cta = single_cta and not tile.split
        # the single CTA also writes routing.py's expert_offsets, gather_index and reverse_index (decode: the
        # routing-metadata launch goes); only with one fused CTA, which holds every count
        if metadata and not self.single_cta:
            raise ValueError("routing metadata from the router needs one fused CTA (single_cta, no split tile)")
        self.metadata = metadata
        # a routing variant (router_select.py) replaces the softmax top-k of the top-k stage; None: softmax top-k
        self.selection = selection
        if selection is not None:
            ok, reason = selection_supports(selection, num_experts, top_k)
            if not ok:
                raise ValueError(f"router selection {selection}: {reason}")
            self.selector = TokenSelect(selection, num_experts, top_k, renormalize)
        self.e_pad = 8 * tile.ng * tile.ntw
        self.threads = 32 * tile.warps

    @cute.jit
    def __call__(self, x_ptr: cute.Pointer, w_ptr: cute.Pointer, weights_ptr: cute.Pointer,
                 ids_ptr: cute.Pointer, counts_ptr: cute.Pointer, logits_ptr: cute.Pointer, offsets_ptr: cute.Pointer,
                 gather_ptr: cute.Pointer, reverse_ptr: cute.Pointer, gate_bias_ptr: cute.Pointer,
                 correction_ptr: cute.Pointer, n_tokens: Int32, stream: cuda.CUstream):
        """logits_ptr: fp32 scratch [HS, T, E] for the split mode (unused when fused). offsets / gather /
        reverse: int32 [E + 1], [T K], [T K] routing metadata (written only by a metadata kernel). gate_bias /
        correction: the selection's bias vectors [E] (read only where the selection has them)."""
        words, n_exp, k, tile = self.words, self.num_experts, self.top_k, self.tile
        x = cute.make_tensor(x_ptr, cute.make_layout((n_tokens, words), stride=(words, 1)))
        w = cute.make_tensor(w_ptr, cute.make_layout((n_exp, words), stride=(words, 1)))
        weights = cute.make_tensor(weights_ptr, cute.make_layout((n_tokens, k), stride=(k, 1)))
        ids = cute.make_tensor(ids_ptr, cute.make_layout((n_tokens, k), stride=(k, 1)))
        counts = cute.make_tensor(counts_ptr, cute.make_layout((n_exp,)))
        # (expert, token, H slice), the same index order as the shared-memory partial sums
        logits = cute.make_tensor(logits_ptr, cute.make_layout((n_exp, n_tokens, tile.hs),
                                                               stride=(1, n_exp, n_exp * n_tokens)))
        offsets = cute.make_tensor(offsets_ptr, cute.make_layout((n_exp + 1,)))
        gather = cute.make_tensor(gather_ptr, cute.make_layout((n_tokens * k,)))
        reverse = cute.make_tensor(reverse_ptr, cute.make_layout((n_tokens * k,)))
        gate_bias = cute.make_tensor(gate_bias_ptr, cute.make_layout((n_exp,)))
        correction = cute.make_tensor(correction_ptr, cute.make_layout((n_exp,)))
        self.kernel(x, w, weights, ids, counts, logits, offsets, gather, reverse, gate_bias, correction,
                    n_tokens).launch(
            grid=(cute.ceil_div(n_tokens, tile.tokens), tile.eg, tile.hs),
            block=(self.threads, 1, 1), stream=stream, use_pdl=True)
        if cutlass.const_expr(tile.split):
            self.topk_kernel(logits, weights, ids, counts, gate_bias, correction, n_tokens).launch(
                grid=(cute.ceil_div(n_tokens, TOPK_TOKENS_PER_CTA), 1, 1), block=(256, 1, 1), stream=stream,
                use_pdl=True)

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
               counts: cute.Tensor, logits: cute.Tensor, offsets: cute.Tensor, gather: cute.Tensor,
               reverse: cute.Tensor, gate_bias: cute.Tensor, correction: cute.Tensor, n_tokens: Int32):
        await_inputs()  # x: the previous layer's output
        tile = self.tile
        n_exp, e_pad, threads = self.num_experts, self.e_pad, self.threads
        mw_n, ng_n, ks_n, mt_n, ntw, unroll = tile.mw, tile.ng, tile.ks, tile.mt, tile.ntw, tile.unroll
        tm = tile.tokens
        tidx, _, _ = cute.arch.thread_idx()
        bidx, e_group, h_slice = cute.arch.block_idx()
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
            expert = e_group * e_pad + (w_n * ntw + nt) * 8 + group
            expert = expert if expert < n_exp else n_exp - 1
            w_rows.append(cute.zipped_divide(w[expert, None], (4,)))

        acc = cute.make_rmem_tensor((4, mt_n * ntw), Float32)
        acc.fill(0.0)
        n_chunks = self.words // 16 // tile.hs  # 64-byte chunks of this CTA's slice of each row
        first = h_slice * n_chunks
        n_steps = n_chunks // (ks_n * unroll)

        xa = cute.make_rmem_tensor((4, unroll * 2 * mt_n), Int32)
        wb = cute.make_rmem_tensor((4, unroll * ntw), Int32)
        for step in range(n_steps):
            for u in cutlass.range_constexpr(unroll):
                self.load_chunk(copy128, x_rows, w_rows, first + (step * ks_n + w_k) * unroll + u, quad, xa, wb, u)
            for u in cutlass.range_constexpr(unroll):
                self.mma_chunk(acc, xa, wb, u)
        if cutlass.const_expr(n_steps * ks_n * unroll < n_chunks):
            for chunk in range(n_steps * ks_n * unroll + w_k, n_chunks, ks_n):
                self.load_chunk(copy128, x_rows, w_rows, first + chunk, quad, xa, wb, 0)
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

        if cutlass.const_expr(tile.split):
            # partial logits of this CTA's (tokens, experts, H slice) -> global scratch
            for i in range(tidx, tm * e_pad, threads):
                local = i // e_pad
                e_local = i % e_pad
                token = bidx * tm + local
                e = e_group * e_pad + e_local
                if token < n_tokens and e < n_exp:
                    v = partial[e_local, local, 0]
                    for kk in cutlass.range_constexpr(1, ks_n):
                        v = v + partial[e_local, local, kk]
                    logits[e, token, h_slice] = v
            if bidx == 0 and e_group == 0 and h_slice == 0:  # the top-k launch runs after this grid
                for e in range(tidx, n_exp, threads):
                    counts[e] = Int32(0)
        else:
            self.topk_tokens(partial, ks_n, bidx * tm, tm, n_tokens, weights, ids, hist, gate_bias, correction)
            cute.arch.sync_threads()
            for e in range(tidx, n_exp, threads):
                c = hist[e]
                if cutlass.const_expr(self.single_cta):
                    counts[e] = c
                elif c > 0:
                    atomic_add(counts.iterator + e, c, MemScopeKind.GPU)
            if cutlass.const_expr(self.metadata):
                base = smem.allocate_tensor(Int32, cute.make_layout((n_exp,)), byte_alignment=16)
                self.write_metadata(ids, hist, base, offsets, gather, reverse, n_tokens)

    @cute.jit
    def write_metadata(self, ids: cute.Tensor, hist: cute.Tensor, base: cute.Tensor, offsets: cute.Tensor,
                       gather: cute.Tensor, reverse: cute.Tensor, n_tokens: Int32):
        """routing.py's metadata from the single CTA, after its top-k (ids in global memory, visible to the CTA
        after the barrier) and histogram: warp 0 scans the counts into expert_offsets; assignment a = t K + k
        of expert e sorts to offsets[e] + #{a' < a : ids[a'] == e} (at most T K - 1 < 16 K compares), which
        keeps rows stable by expert, then by a, as the reference does."""
        n_exp, k = self.num_experts, self.top_k
        tidx, _, _ = cute.arch.thread_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        lane = cute.arch.lane_idx()
        if warp == 0:
            scan_expert_counts(hist, n_exp, lane, base, hist, False, offsets, True)
        cute.arch.sync_threads()
        for a in range(tidx, n_tokens * k, self.threads):
            e = ids[a // k, a % k]
            if e < n_exp:  # only NaN logits pick a padding column (no row of any expert)
                rank = Int32(0)
                for b in range(a):
                    if ids[b // k, b % k] == e:
                        rank += 1
                pos = base[e] + rank
                reverse[a] = pos
                gather[pos] = a // k

    @cute.kernel
    def topk_kernel(self, logits: cute.Tensor, weights: cute.Tensor, ids: cute.Tensor, counts: cute.Tensor,
                    gate_bias: cute.Tensor, correction: cute.Tensor, n_tokens: Int32):
        """Split mode, second launch: sum the H-slice partial logits, then softmax + top-k + counts."""
        await_inputs()
        n_exp = self.num_experts
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        hist = cutlass.utils.SmemAllocator().allocate_tensor(Int32, cute.make_layout((n_exp,)), byte_alignment=16)
        for e in range(tidx, n_exp, 256):
            hist[e] = Int32(0)
        cute.arch.sync_threads()
        first = bidx * TOPK_TOKENS_PER_CTA
        self.topk_tokens(logits, self.tile.hs, first, TOPK_TOKENS_PER_CTA, n_tokens, weights, ids, hist, gate_bias,
                         correction)
        cute.arch.sync_threads()
        for e in range(tidx, n_exp, 256):
            c = hist[e]
            if c > 0:
                atomic_add(counts.iterator + e, c, MemScopeKind.GPU)

    @cute.jit
    def topk_tokens(self, src: cute.Tensor, n_parts: cutlass.Constexpr, first: Int32, n_local: cutlass.Constexpr,
                    n_tokens: Int32, weights: cute.Tensor, ids: cute.Tensor, hist: cute.Tensor,
                    gate_bias: cute.Tensor, correction: cute.Tensor):
        """Softmax + top-k (or the selection's variant) for tokens first + [0, n_local), one warp per token; lane
        owns experts lane + 32 j. Logit of (token, e) = sum over p < n_parts of src[e, row, p] (row = local index
        for shared memory, the token for global scratch), in a fixed order, plus the selection's gate bias."""
        n_exp, k = self.num_experts, self.top_k
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        lane = cute.arch.lane_idx()
        n_warps = 8 if self.tile.split else self.threads // 32
        per_lane = (n_exp + 31) // 32
        vals = cute.make_rmem_tensor((per_lane,), Float32)
        best_p = cute.make_rmem_tensor((k,), Float32)
        best_id = cute.make_rmem_tensor((k,), Int32)
        for local in range(warp, n_local, n_warps):
            token = first + local
            row = local
            if cutlass.const_expr(self.tile.split):
                row = token
            if token < n_tokens:
                row_max = -Float32.inf
                for j in cutlass.range_constexpr(per_lane):
                    e = lane + 32 * j
                    v = -Float32.inf
                    if e < n_exp:
                        v = src[e, row, 0]
                        for part in cutlass.range_constexpr(1, n_parts):
                            v = v + src[e, row, part]
                        if cutlass.const_expr(self.selection is not None and self.selection.gate_bias is not None):
                            v = v + gate_bias[e].to(Float32)
                    vals[j] = v
                    row_max = cute.arch.fmax(row_max, v)
                if cutlass.const_expr(self.selection is not None):
                    self.selector.select(vals, lane, correction, best_p, best_id)  # final weights
                else:
                    self.select_default(vals, row_max, lane, best_p, best_id)
                for kk in cutlass.range_constexpr(k):
                    if lane == kk:
                        weights[token, kk] = best_p[kk]
                        ids[token, kk] = best_id[kk]
                        if best_id[kk] < n_exp:  # only NaN logits pick a padding column
                            atomic_add(hist.iterator + best_id[kk], Int32(1), MemScopeKind.CTA)

    @cute.jit
    def select_default(self, vals: cute.Tensor, row_max: Float32, lane: Int32, best_p: cute.Tensor,
                     best_id: cute.Tensor):
        """The default selection: softmax statistics by warp reductions, K rounds of a warp arg-max on 24-bit
        selection keys; best_p gets the chosen probabilities (renormalised when asked)."""
        k, per_lane = self.top_k, (self.num_experts + 31) // 32
        row_max = cute.arch.warp_reduction_max(row_max)
        denom = Float32(0.0)
        for j in cutlass.range_constexpr(per_lane):
            denom += cute.math.exp(vals[j] - row_max, fastmath=True)
        denom = cute.arch.warp_reduction_sum(denom)
        keys = cute.make_rmem_tensor((per_lane,), Int32)
        for j in cutlass.range_constexpr(per_lane):
            keys[j] = selection_key(vals[j], lane + 32 * j)
        picked = Float32(0.0)
        for kk in cutlass.range_constexpr(k):
            i, v = take_best(keys, vals, lane, _key_expert, _KEY_REMOVED)  # the winner's exact logit
            p = cute.math.exp(v - row_max, fastmath=True)
            best_p[kk] = p
            best_id[kk] = i
            picked += p
        scale = 1.0 / denom
        if cutlass.const_expr(self.renormalize):
            scale = 1.0 / picked
        for kk in cutlass.range_constexpr(k):
            best_p[kk] = best_p[kk] * scale

def _bias_types(selection: Selection | None):
    """CuTe element types of the gate-bias and correction-bias pointers (fp32 placeholders where absent)."""
    if selection is None:
        return Float32, Float32
    return selection.bias_type("gate_bias"), selection.bias_type("correction_bias")


def make_compile_args(dtype: torch.dtype, hidden: int, num_experts: int, top_k: int, renormalize: bool,
                      tile: RouterTile, stream=None, single_cta: bool = False, metadata: bool = False,
                      selection: Selection | None = None):
    """(jit function, arguments) for cute.compile; placeholder pointers, T dynamic. Used by the
    cache below and by the CPU compile tests (pass cute.runtime.make_fake_stream() there)."""
    name = _TORCH_TO_NAME[dtype]
    gmem = cute.AddressSpace.gmem
    fn = RouterKernel(name, hidden, num_experts, top_k, renormalize, tile, single_cta, metadata, selection)
    args = (make_ptr(Int32, 16, gmem, assumed_align=16), make_ptr(Int32, 16, gmem, assumed_align=16),
            make_ptr(Float32, 16, gmem, assumed_align=4), make_ptr(Int32, 16, gmem, assumed_align=4),
            make_ptr(Int32, 16, gmem, assumed_align=4), make_ptr(Float32, 16, gmem, assumed_align=4),
            *(make_ptr(Int32, 16, gmem, assumed_align=4) for _ in range(3)),
            *(make_ptr(t, 16, gmem, assumed_align=t.width // 8) for t in _bias_types(selection)), Int32(1), stream)
    return fn, args


# (dtype, H, E, K, renormalize, tile, single_cta, metadata, selection); never keyed on T
_compiled = CompileCache("router")


def compiled_router(dtype: torch.dtype, hidden: int, num_experts: int, top_k: int, renormalize: bool,
                    tile: RouterTile, single_cta: bool = False, metadata: bool = False,
                    selection: Selection | None = None):
    key = (dtype, hidden, num_experts, top_k, bool(renormalize), tile, single_cta, metadata, selection)
    return _compiled.get(key, lambda: make_compile_args(dtype, hidden, num_experts, top_k, renormalize, tile,
                                                        current_stream(), single_cta, metadata, selection))


def workspace_size(num_tokens: int, num_experts: int, tile: RouterTile) -> int:
    """fp32 elements of partial-logit scratch [HS, T, E] the split mode needs (0 when fused)."""
    return tile.hs * num_tokens * num_experts if tile.split else 0


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


def _check_selection(selection: Selection | None, gate_bias: torch.Tensor | None,
                     correction_bias: torch.Tensor | None, num_experts: int, top_k: int, device) -> None:
    """The bias vectors must be exactly those the selection was built for (router_select.selection_for)."""
    if selection is not None:
        ok, reason = selection_supports(selection, num_experts, top_k)
        if not ok:
            raise ValueError(f"router selection: {reason}")
    for name, bias in (("gate_bias", gate_bias), ("correction_bias", correction_bias)):
        want = None if selection is None else getattr(selection, name)
        if (bias is None) != (want is None):
            raise ValueError(f"{name}: the selection {'expects a ' + want + ' vector' if want else 'has none'}, "
                             f"got {'none' if bias is None else 'a tensor'}")
        if bias is None:
            continue
        if _TORCH_TO_NAME.get(bias.dtype) != want:
            raise TypeError(f"{name} must be {want} as the selection says, got {bias.dtype}")
        if bias.shape != (num_experts,) or not bias.is_contiguous() or bias.device != device:
            raise ValueError(f"{name} must be a contiguous [{num_experts}] tensor on {device}, got "
                             f"{tuple(bias.shape)} on {bias.device}")


def common_dtype(x: torch.Tensor, gate_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x and gate_weight in one dtype for the kernel: both fp32 where they differ (e.g. bf16 activations with an
    fp32 gate). Exact: bf16 / fp16 values are fp32 values, and the variants' reference computes the logits in fp32
    from both; the cost is the fp32 copy (and the 3xTF32 GEMM, which keeps ~1e-6 relative accuracy)."""
    if x.dtype == gate_weight.dtype:
        return x, gate_weight
    return x.float(), gate_weight.float()


def metadata_fusable(num_experts: int, num_tokens: int, row_bytes: int, tile: RouterTile | None = None) -> bool:
    """Whether router_into can also write the routing metadata: one fused CTA covers the T tokens."""
    tile = tile or choose_tile(num_experts, num_tokens, row_bytes)
    return not tile.split and 0 < num_tokens <= tile.tokens


def router_into(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, renormalize: bool,
                topk_weights: torch.Tensor, topk_ids: torch.Tensor, tokens_per_expert: torch.Tensor,
                tile: RouterTile | None = None, workspace: torch.Tensor | None = None,
                metadata: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                selection: Selection | None = None, gate_bias: torch.Tensor | None = None,
                correction_bias: torch.Tensor | None = None) -> None:
    """Writes topk_weights [T, K] fp32, topk_ids [T, K] int32, tokens_per_expert [E] int32 on the current
    stream; graph-capturable. One launch when a single fused CTA covers T, else two: memset + fused kernel, or
    (split tiles, E > 16 and
    T <= SPLIT_MAX_TOKENS) GEMM + top-k kernels with fp32 scratch of workspace_size(...) elements,
    allocated here when `workspace` is None. `tile` overrides choose_tile (benchmarks).
    metadata = (expert_offsets [E + 1], gather_index [T K], reverse_index [T K]) int32: also written, as
    routing.routing_metadata_into would, in the same launch; only where metadata_fusable (decode).
    selection: a routing variant (router_select.selection_for of a config.RouterConfig) with its bias vectors
    gate_bias / correction_bias [E], given exactly where the selection has them; None: softmax top-k."""
    _check_selection(selection, gate_bias, correction_bias, gate_weight.shape[0], top_k, x.device)
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
    if num_tokens == 0:
        tokens_per_expert.zero_()
        if metadata is not None:
            metadata[0].zero_()
        return
    tile = tile or choose_tile(num_experts, num_tokens, hidden * x.element_size())
    need = workspace_size(num_tokens, num_experts, tile)
    single_cta = metadata_fusable(num_experts, num_tokens, hidden * x.element_size(), tile)  # no memset either
    if metadata is not None:
        if not single_cta:
            raise ValueError(f"routing metadata from the router needs one fused CTA: T={num_tokens} tokens with "
                             f"E={num_experts} take {'a split tile' if tile.split else f'{tile.tokens}-token CTAs'}")
        for name, t, n in (("expert_offsets", metadata[0], num_experts + 1), ("gather_index", metadata[1],
                           num_tokens * top_k), ("reverse_index", metadata[2], num_tokens * top_k)):
            if t.shape != (n,) or t.dtype != torch.int32 or not t.is_contiguous() or t.device != x.device:
                raise ValueError(f"{name} must be a contiguous [{n}] int32 tensor on {x.device}, got "
                                 f"{tuple(t.shape)} {t.dtype}")
    fn = compiled_router(x.dtype, hidden, num_experts, top_k, renormalize, tile, single_cta, metadata is not None,
                         selection)
    if need == 0:
        if not single_cta:
            tokens_per_expert.zero_()  # the split mode zeroes it inside its first kernel
        workspace = topk_weights  # placeholder pointer, never read
    elif workspace is None:
        workspace = torch.empty(need, dtype=torch.float32, device=x.device)
    elif workspace.numel() < need or workspace.dtype != torch.float32:
        raise ValueError(f"workspace must hold {need} fp32 elements")
    gmem = cute.AddressSpace.gmem
    fn(make_ptr(Int32, x.data_ptr(), gmem, assumed_align=16),
       make_ptr(Int32, gate_weight.data_ptr(), gmem, assumed_align=16),
       make_ptr(Float32, topk_weights.data_ptr(), gmem, assumed_align=4),
       make_ptr(Int32, topk_ids.data_ptr(), gmem, assumed_align=4),
       make_ptr(Int32, tokens_per_expert.data_ptr(), gmem, assumed_align=4),
       make_ptr(Float32, workspace.data_ptr(), gmem, assumed_align=4),
       *(make_ptr(Int32, t.data_ptr(), gmem, assumed_align=4) for t in (metadata or (topk_ids,) * 3)),
       *(make_ptr(t, (topk_weights if b is None else b).data_ptr(), gmem, assumed_align=t.width // 8)
         for t, b in zip(_bias_types(selection), (gate_bias, correction_bias))),
       Int32(num_tokens), current_stream())


def router(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, renormalize: bool,
           tokens_per_expert: torch.Tensor | None = None,
           **selection) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as light_moe.ops.reference.router (with a selection: reference.spec_router): (topk_weights
    fp32 [T, K], topk_ids int32 [T, K], tokens_per_expert int32 [E]); the counts go into `tokens_per_expert` when
    given (a persistent buffer). selection: router_into's selection, gate_bias, correction_bias."""
    outputs = _outputs(x, gate_weight.shape[0], top_k, tokens_per_expert)
    router_into(x, gate_weight, top_k, renormalize, *outputs, **selection)
    return outputs


def route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, renormalize: bool,
          tokens_per_expert: torch.Tensor | None = None, **selection):
    """router() plus (expert_offsets [E + 1], gather_index [T K], reverse_index [T K]) int32 written by the
    same launch where one fused CTA covers T (metadata_fusable: decode with E <= 16), else None for them."""
    num_tokens, hidden = x.shape
    num_experts = gate_weight.shape[0]
    outputs = _outputs(x, num_experts, top_k, tokens_per_expert)
    tile = choose_tile(num_experts, num_tokens, hidden * x.element_size())
    metadata = None
    if metadata_fusable(num_experts, num_tokens, hidden * x.element_size(), tile):
        metadata = (torch.empty(num_experts + 1, dtype=torch.int32, device=x.device),
                    torch.empty(num_tokens * top_k, dtype=torch.int32, device=x.device),
                    torch.empty(num_tokens * top_k, dtype=torch.int32, device=x.device))
    router_into(x, gate_weight, top_k, renormalize, *outputs, tile=tile, metadata=metadata, **selection)
    return (*outputs, metadata)


def _outputs(x: torch.Tensor, num_experts: int, top_k: int, tokens_per_expert: torch.Tensor | None):
    """topk_weights [T, K] fp32, topk_ids [T, K] int32 and the counts [E] int32 (tokens_per_expert if given)."""
    num_tokens = x.shape[0]
    if tokens_per_expert is None:
        tokens_per_expert = torch.empty(num_experts, dtype=torch.int32, device=x.device)
    return (torch.empty(num_tokens, top_k, dtype=torch.float32, device=x.device),
            torch.empty(num_tokens, top_k, dtype=torch.int32, device=x.device), tokens_per_expert)
