"""The canonical W4A16 weight format: what every loader produces and every backend consumes.

Shape legend: E experts, N output features, K input features, g group size (32, 64 or 128).
A quantized linear weight W [N, K] (out, in), stacked over E experts, is stored as

  qweight  int32 [E, N, K // 8]   8 unsigned 4-bit values per int32 along K; value k sits at
                                   bits 4 * (k % 8) of word k // 8 (low nibble first)
  scales   [E, N, K // g]          in the model dtype (bfloat16 / float16 / float32)
  zeros    uint8 [E, N, K // g]    values 0..15 (asymmetric), or None: symmetric, zero point 8
  perm     int32 [E, K] or None    act-order only: stored column j holds input channel perm[e, j]

  dequant:  W_stored[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]   (z = 8 when zeros is None)
            W[:, perm[e]] = W_stored  (y = x[:, perm[e]] @ W_stored^T; no perm: W = W_stored)

The product (q - z) * s is formed in float32 and rounded once to the scale dtype; the reference
(ops/reference.py) and any kernel must agree on that. Kernels repack this format into their own
layout in MoEOps.prepare_expert_weights and never change it. Memory per weight element at g=128
with bf16 scales: 0.5 + 2/128 (+ 1/128 zeros) bytes = 0.258x (0.262x) of bf16.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from light_moe.quant.scheme import W4A16Config

PACK = 8  # int4 values per int32
SYMMETRIC_ZERO = 8


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[..., K] integers in 0..15 -> int32 [..., K // 8], value k at bits 4 * (k % 8)."""
    if q.shape[-1] % PACK:
        raise ValueError(f"pack_int4: last dimension {q.shape[-1]} is not a multiple of {PACK}")
    q = q.to(torch.int32).reshape(*q.shape[:-1], q.shape[-1] // PACK, PACK)
    packed = torch.zeros(q.shape[:-1], dtype=torch.int32, device=q.device)
    for i in range(PACK):
        packed |= (q[..., i] & 0xF) << (4 * i)  # int32 shifts wrap: bit 31 is the sign bit, as intended
    return packed


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., K // 8] -> uint8 [..., K] (inverse of pack_int4)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    values = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF  # [..., K // 8, 8]
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * PACK).to(torch.uint8)


@dataclass
class QuantizedWeight:
    """Stacked W4A16 weights of E experts in the canonical format (see the module docstring).

    Quacks like the float stack where MoE code only needs shapes: `shape` is the logical
    [E, N, K] and `dtype` the dtype of the dequantized weight (that of the scales)."""

    qweight: torch.Tensor  # int32 [E, N, K // 8]
    scales: torch.Tensor  # [E, N, K // g]
    zeros: torch.Tensor | None  # uint8 [E, N, K // g] or None (symmetric)
    group_size: int
    perm: torch.Tensor | None = None  # int32 [E, K] (act-order) or None

    def __post_init__(self) -> None:
        e, n, k8 = self.qweight.shape
        k = k8 * PACK
        if self.qweight.dtype != torch.int32:
            raise ValueError(f"qweight must be int32, got {self.qweight.dtype}")
        if k % self.group_size:
            raise ValueError(f"in_features {k} is not a multiple of group_size {self.group_size}")
        groups = (e, n, k // self.group_size)
        if tuple(self.scales.shape) != groups:
            raise ValueError(f"scales of shape {list(self.scales.shape)}, expected {list(groups)}")
        if self.zeros is not None and (tuple(self.zeros.shape) != groups or self.zeros.dtype != torch.uint8):
            raise ValueError(f"zeros must be uint8 {list(groups)}, got {self.zeros.dtype} {list(self.zeros.shape)}")
        if self.perm is not None and tuple(self.perm.shape) != (e, k):
            raise ValueError(f"perm of shape {list(self.perm.shape)}, expected {[e, k]}")

    @property
    def shape(self) -> torch.Size:
        e, n, k8 = self.qweight.shape
        return torch.Size((e, n, k8 * PACK))

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def scheme(self) -> W4A16Config:
        return W4A16Config(group_size=self.group_size, symmetric=self.zeros is None)

    @property
    def nbytes(self) -> int:
        tensors = [self.qweight, self.scales] + [t for t in (self.zeros, self.perm) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def dequantize_expert(self, expert: int) -> torch.Tensor:
        """Float weight of one expert, [N, K] in the scale dtype, columns in input-channel order."""
        q = unpack_int4(self.qweight[expert]).float()  # [N, K]
        s = self.scales[expert].float().repeat_interleave(self.group_size, dim=-1)
        z = SYMMETRIC_ZERO if self.zeros is None else self.zeros[expert].float().repeat_interleave(
            self.group_size, dim=-1)
        stored = ((q - z) * s).to(self.scales.dtype)
        if self.perm is None:
            return stored
        w = torch.empty_like(stored)
        w[:, self.perm[expert].long()] = stored
        return w

    def dequantize(self) -> torch.Tensor:
        """[E, N, K] in the scale dtype."""
        return torch.stack([self.dequantize_expert(e) for e in range(self.shape[0])])

    def to(self, device) -> QuantizedWeight:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(move(self.qweight), move(self.scales), move(self.zeros), self.group_size,
                               move(self.perm))


def dequantize(weight: QuantizedWeight) -> torch.Tensor:
    return weight.dequantize()


def _rtn_one(w: torch.Tensor, scheme: W4A16Config, dtype: torch.dtype):
    """One expert [N, K] -> (q uint8 [N, K], scales [N, K // g] dtype, zeros uint8 or None)."""
    n, k = w.shape
    groups = w.float().reshape(n, k // scheme.group_size, scheme.group_size)  # [N, G, g]
    if scheme.symmetric:
        # GPTQ's symmetric grid: absmax / 7.5, zero 8, codes -8..7 around it
        scales = groups.abs().amax(dim=-1) / 7.5
        scales = torch.where(scales > 0, scales, torch.ones_like(scales)).to(dtype)  # all-zero group
        zeros = torch.full_like(scales, SYMMETRIC_ZERO, dtype=torch.float32)
    else:
        # the range always holds 0 (as GPTQ does), so the zero point is within 0..15 and exact
        lo, hi = groups.amin(dim=-1).clamp(max=0), groups.amax(dim=-1).clamp(min=0)
        scales = (hi - lo) / 15
        scales = torch.where(scales > 0, scales, torch.ones_like(scales)).to(dtype)
        zeros = torch.clamp(torch.round(-lo / scales.float()), 0, 15)
    q = torch.clamp(torch.round(groups / scales.float().unsqueeze(-1)) + zeros.unsqueeze(-1), 0, 15)
    q = q.reshape(n, k).to(torch.uint8)
    return q, scales, None if scheme.symmetric else zeros.to(torch.uint8)


def rtn_quantize(w: torch.Tensor, scheme: W4A16Config, dtype: torch.dtype | None = None) -> QuantizedWeight:
    """Round-to-nearest W4A16 of stacked weights [E, N, K] (computed in float32, one expert at a time).

    Error bound per element: |w - dequant| <= scale / 2 (up to the rounding of the scale itself
    to `dtype`, by default w.dtype)."""
    if w.dim() != 3:
        raise ValueError(f"rtn_quantize expects stacked weights [E, N, K], got shape {list(w.shape)}")
    if w.shape[-1] % scheme.group_size:
        raise ValueError(f"in_features {w.shape[-1]} is not a multiple of group_size {scheme.group_size}")
    dtype = dtype or w.dtype
    qs, scales, zeros = [], [], []
    for expert in w:
        q, s, z = _rtn_one(expert, scheme, dtype)
        qs.append(pack_int4(q))
        scales.append(s)
        zeros.append(z)
    return QuantizedWeight(torch.stack(qs), torch.stack(scales), None if scheme.symmetric else torch.stack(zeros),
                           scheme.group_size)
