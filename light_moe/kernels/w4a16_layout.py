"""W4A16 expert weights: the canonical format, the kernel's register-fragment layout, a reference.

Shape legend: E experts, N output rows (2I for w13, H for w2), K reduction (H for w13, I for w2),
g group size along K (32, 64 or 128), G = K // g groups, M routed rows, T tokens, I intermediate.

Canonical input (light_moe/quant/w4a16.py): qweight int32 [E, N, K // 8] with value k at bits
4 * (k % 8) (low nibble first), scales bf16 [E, N, G], zeros uint8 [E, N, G] in 0..15 or None
(symmetric, zero point 8); W[n, k] = (q - z) * s.

Kernel layout (`prepare_w4a16_weights`), read by w4a16_gemm.py:
  * qweight [E, K/64, N/64, 128, 4] int32: for every expert, k-tile of 64 and block of 64 weight rows
    (one wgmma m64 atom), thread t of the consumer warpgroup owns 16 contiguous bytes: word kb (k16
    block kb of the k-tile) holds exactly the 8 values of t's wgmma register A fragment of that block,
    so one ld.shared.v4 feeds 4 wgmma k-steps and the producer copies 2 KB contiguous per atom.
    Fragment of thread t = 32 w + 4 g + q (warp w, lane 4 g + q) in an m64 x k16 block: rows
    r = 16 w + g and r + 8, columns 2 q, 2 q + 1, 2 q + 8, 2 q + 9; value v = c + 2 h + 4 j is
    (row r + 8 h, column 2 q + c + 8 j) (CuTe's SM90 64x16 RS A layout, = mma.sync m16n8k16's A).
    Value v sits in nibble (v // 2) + 4 (v % 2): the dequantiser masks nibbles i and i + 4 with one
    lop3 (bits 0-3 and 16-19 after a shift by 4 i) and gets bf16x2 register i = values (2i, 2i + 1).
  * meta [E, G, N] int32: low half the bf16 scale s, high half the bf16 -(128 + z). Dequant of one
    register: t = lop3(q >> 4i, 0x000F000F, 0x43004300) = bf16x2 (128 + q_lo, 128 + q_hi);
    t = fma(t, 1, -(128 + z)) = q - z (exact, small integers); w = fma(t, s, -0) = bf16((q - z) s),
    rounded once, the same bf16 as rounding the fp32 reference dequantisation.
  * gated (w13 [E, 2I, H]): rows interleaved like grouped_gemm.prepare_expert_weights (every 16 rows
    = 8 gate rows + the matching 8 up rows) before packing, so the fused SiLU*up epilogue is shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from light_moe.quant.w4a16 import SYMMETRIC_ZERO, unpack_int4

TILE_K = 64  # k per pipeline stage (4 wgmma k16 steps); a multiple of no group size > 64 needed
ATOM_M = 64  # weight rows per wgmma m64 atom
GROUP_SIZES = (32, 64, 128)
MAGIC = 128.0  # bf16 128 + q is exact for q in 0..15 (7 mantissa bits: step 1 in [128, 256))

# nibble position of fragment value v (see module docstring)
_NIBBLE_OF_VALUE = [(v // 2) + 4 * (v % 2) for v in range(8)]


@dataclass(frozen=True)
class W4A16Weights:
    """Expert weights in the kernel layout (module docstring)."""

    qweight: torch.Tensor  # int32 [E, K/64, N/64, 128, 4]
    meta: torch.Tensor  # int32 [E, G, N]: bf16 scale | bf16 -(128 + zero) << 16
    group_size: int
    gated: bool  # rows gate/up-interleaved by 8 (w13)
    has_zeros: bool

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    @property
    def n_out(self) -> int:
        return self.meta.shape[2]

    @property
    def k_dim(self) -> int:
        return self.qweight.shape[1] * TILE_K

    @property
    def shape(self) -> tuple[int, int, int]:
        """Logical [E, N, K] of the weight, like the float stack it replaces (MoEOps reads E from it)."""
        return (self.num_experts, self.n_out, self.k_dim)



def check_prepared(name: str, prepared: W4A16Weights, gated: bool) -> None:
    """The kernels' argument check of a prepare_w4a16_weights result (gated: w13, else w2)."""
    if not isinstance(prepared, W4A16Weights):
        raise TypeError(f"expected {name} from prepare_w4a16_weights, got {type(prepared).__name__}")
    if prepared.gated != gated:
        raise ValueError(f"{name} was prepared with gated={prepared.gated}, expected gated={gated}")
    for t in (prepared.qweight, prepared.meta):
        if not t.is_cuda or not t.is_contiguous() or t.data_ptr() % 16:
            raise ValueError(f"{name} tensors must be contiguous, 16-byte aligned CUDA tensors")

def dequantize_reference(qweight, scales, zeros, group_size: int) -> torch.Tensor:
    """Canonical W4A16 -> fp32 [E, N, K] = (q - z) * s (z = 8 when zeros is None)."""
    q = unpack_int4(qweight).float()
    s = scales.float().repeat_interleave(group_size, dim=-1)
    z = SYMMETRIC_ZERO if zeros is None else zeros.float().repeat_interleave(group_size, dim=-1)
    return (q - z) * s


def _interleave_gate_up(t: torch.Tensor) -> torch.Tensor:
    """[E, 2I, ...] gate rows 0:I, up rows I:2I -> every 16 rows = 8 gate + the 8 matching up rows."""
    e, two_i = t.shape[:2]
    rest = t.shape[2:]
    return t.view(e, 2, two_i // 16, 8, *rest).transpose(1, 2).reshape(t.shape).contiguous()


def _deinterleave_gate_up(t: torch.Tensor) -> torch.Tensor:
    e, two_i = t.shape[:2]
    rest = t.shape[2:]
    return t.view(e, two_i // 16, 2, 8, *rest).transpose(1, 2).reshape(t.shape).contiguous()


def check_shapes(qweight, scales, zeros, group_size: int, gated: bool) -> tuple[bool, str]:
    if group_size not in GROUP_SIZES:
        return False, f"group_size must be one of {GROUP_SIZES}, got {group_size}"
    if qweight.dtype != torch.int32 or qweight.dim() != 3:
        return False, f"expected qweight int32 [E, N, K // 8], got {qweight.dtype} {list(qweight.shape)}"
    e, n, k8 = qweight.shape
    k = 8 * k8
    if n % ATOM_M or k % TILE_K or k % group_size:
        return False, f"N={n} must be a multiple of {ATOM_M} and K={k} of {TILE_K} and of g={group_size}"
    groups = (e, n, k // group_size)
    if scales.dtype != torch.bfloat16 or tuple(scales.shape) != groups:
        return False, f"expected scales bf16 {list(groups)}, got {scales.dtype} {list(scales.shape)}"
    if zeros is not None and (zeros.dtype != torch.uint8 or tuple(zeros.shape) != groups):
        return False, f"expected zeros uint8 {list(groups)} or None, got {zeros.dtype} {list(zeros.shape)}"
    if gated and n % 16:
        return False, f"gated weights need 2I % 16 == 0, got N={n}"
    return True, "ok"


def prepare_w4a16_weights(qweight, scales, zeros, group_size: int, gated: bool) -> W4A16Weights:
    """Canonical W4A16 (module docstring) -> W4A16Weights in the kernel's register-fragment order.

    Offline (load time), on the tensors' device. gated=True for w13 [E, 2I, H] (gate/up interleave).
    """
    ok, reason = check_shapes(qweight, scales, zeros, group_size, gated)
    if not ok:
        raise ValueError(reason)
    q = unpack_int4(qweight)  # [E, N, K] uint8
    has_zeros = zeros is not None
    if zeros is None:
        zeros = torch.full(scales.shape, SYMMETRIC_ZERO, dtype=torch.uint8, device=scales.device)
    if gated:
        q, scales, zeros = _interleave_gate_up(q), _interleave_gate_up(scales), _interleave_gate_up(zeros)
    e, n, k = q.shape
    # rows: 64 = (w 4, h 2, g 8); columns per k16: (j 2, q 4, c 2)
    q = q.view(e, n // ATOM_M, 4, 2, 8, k // TILE_K, 4, 2, 4, 2)  # e nb w h g kt kb j qq c
    q = q.permute(0, 5, 1, 2, 4, 8, 6, 9, 7, 3)  # e kt nb w g qq kb | c j h -> nibble 4c + 2j + h
    q = q.reshape(e, k // TILE_K, n // ATOM_M, 128, 4, 8).to(torch.int64)
    # nibble index 4c + 2j + h == (v // 2) + 4 (v % 2) for v = c + 2h + 4j
    shifts = 4 * torch.arange(8, device=q.device, dtype=torch.int64)
    words = (q << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()

    s_bits = scales.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    negz = (-(MAGIC + zeros.float())).to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    meta = s_bits | (negz << 16)  # int32 shift wraps: the high half is the raw bf16 bits
    meta = meta.permute(0, 2, 1).contiguous()  # [E, G, N]
    return W4A16Weights(words, meta, group_size, gated, has_zeros)


def unpack_prepared(prepared: W4A16Weights) -> torch.Tensor:
    """Inverse of prepare_w4a16_weights, emulating the kernel's dequantiser: fp32 [E, N, K] in the
    canonical row order. Used by the CPU tests to pin the fragment layout and the magic-number math."""
    words = prepared.qweight.to(torch.int64) & 0xFFFFFFFF  # [E, KT, NB, 128, 4]
    e, kt, nb = words.shape[:3]
    n, k = nb * ATOM_M, kt * TILE_K
    shifts = 4 * torch.arange(8, device=words.device, dtype=torch.int64)
    nib = (words.unsqueeze(-1) >> shifts) & 0xF  # [..., 8] nibble-indexed
    # nibble 4c + 2j + h -> dims (c, j, h)
    nib = nib.view(e, kt, nb, 4, 8, 4, 4, 2, 2, 2)  # e kt nb w g qq kb c j h
    q = nib.permute(0, 2, 3, 9, 4, 1, 6, 8, 5, 7).reshape(e, n, k)  # e nb w h g kt kb j qq c
    meta = prepared.meta.permute(0, 2, 1).to(torch.int64) & 0xFFFFFFFF  # [E, N, G]
    s = (meta & 0xFFFF).to(torch.int32).to(torch.int16).view(torch.bfloat16).float()
    negz = (meta >> 16).to(torch.int32).to(torch.int16).view(torch.bfloat16).float()
    g = prepared.group_size
    s = s.repeat_interleave(g, dim=-1)
    negz = negz.repeat_interleave(g, dim=-1)
    w = ((MAGIC + q.float()) + negz) * s  # the kernel's lop3 / fma / fma, before its bf16 rounding
    w = w.to(torch.bfloat16).float()
    if prepared.gated:
        w = _deinterleave_gate_up(w)
    return w
