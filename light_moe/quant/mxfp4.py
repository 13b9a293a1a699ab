"""MXFP4 expert checkpoints (OpenAI's gpt-oss release): read, dequantised to the model dtype at load.

Shape legend: E experts, N output features, K input features, G = K / 32 groups.

The OCP microscaling format as gpt-oss ships it: for a stacked expert tensor `<name>` whose float layout in
transformers is [E, K, N] (gate_up_proj [E, H, 2I], down_proj [E, I, H]), the checkpoint holds
    <name>_blocks  uint8 [E, N, G, 16]: 32 FP4 (e2m1) codes per group, two per byte, the low nibble first;
    <name>_scales  uint8 [E, N, G]: one e8m0 power of two per group, 2 ** (byte - 127).
A code's bit 3 is the sign, bits 0-2 index the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.

Light-MoE dequantises these once at load (models/loader.py) into the float experts every backend runs: every
MXFP4 value is exact in bf16 and float32, so nothing is lost, but the experts take bf16's memory (about 4x the
checkpoint's). A native path, FP4 codes and e8m0 scales decoded in registers by the W4A16 kernel (a 16-entry
lookup in place of its int4 convert), is future work (docs/model_loading.md).

quantize() is the encoder (round to the nearest FP4 value, per-group power-of-two scale from the group's
largest magnitude): tests write MXFP4 checkpoints of tiny models with it.
"""
from __future__ import annotations

import torch

GROUP = 32  # values per e8m0 scale
BLOCK_BYTES = GROUP // 2  # two FP4 codes per byte
SCALE_BIAS = 127
# the FP4 (e2m1) value of each 4-bit code: codes 8-15 are the negatives of 0-7
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_MAX_EXPONENT = 2  # the largest FP4 magnitude is 6 = 1.5 * 2 ** 2
BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"


def checkpoint_shapes(float_shape: tuple[int, int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(blocks, scales) shapes of a stacked expert tensor whose float layout is [E, K, N]; K must be a multiple
    of 32."""
    experts, k, n = float_shape
    if k % GROUP:
        raise ValueError(f"MXFP4 groups {GROUP} input features, but this tensor has {k}")
    return (experts, n, k // GROUP, BLOCK_BYTES), (experts, n, k // GROUP)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks uint8 [E, N, G, 16], scales uint8 [E, N, G] -> the float tensor [E, K, N] in `dtype` (the layout
    transformers gives it: a transposed view of [E, N, K]). One expert at a time, so the float32 temporaries
    are one expert's."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() != 4 or blocks.shape[-1] != BLOCK_BYTES or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks [E, N, G, {BLOCK_BYTES}] and scales [E, N, G] do not match: "
                         f"{list(blocks.shape)} and {list(scales.shape)}")
    experts, n, groups, _ = blocks.shape
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    out = torch.empty(experts, n, groups * GROUP, dtype=dtype, device=blocks.device)
    for e in range(experts):
        codes = torch.stack((blocks[e] & 0x0F, blocks[e] >> 4), dim=-1).long()  # [N, G, 16, 2]: low nibble first
        values = lut[codes].view(n, groups, GROUP)
        factor = torch.exp2(scales[e].float() - SCALE_BIAS).unsqueeze(-1)  # [N, G, 1]
        out[e] = (values * factor).view(n, groups * GROUP).to(dtype)
    return out.transpose(1, 2)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder: a float tensor [E, K, N] (dequantize's layout) -> (blocks uint8 [E, N, G, 16], scales uint8
    [E, N, G]). Each group's scale is 2 ** (floor(log2(max |w|)) - 2), so its largest value lands in [4, 8) and
    rounds to at most 6; values round to the nearest FP4 magnitude (ties to the larger)."""
    experts, k, n = w.shape
    checkpoint_shapes((experts, k, n))
    groups = w.transpose(1, 2).float().reshape(experts, n, k // GROUP, GROUP)  # [E, N, G, 32]
    amax = groups.abs().amax(dim=-1)  # [E, N, G]
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=torch.finfo(torch.float32).tiny))),
                           torch.full_like(amax, -SCALE_BIAS)) - _MAX_EXPONENT
    exponent = exponent.clamp(-SCALE_BIAS, 255 - SCALE_BIAS - 1)  # byte 255 is e8m0's NaN
    scaled = groups / torch.exp2(exponent).unsqueeze(-1)
    magnitudes = torch.tensor(FP4_VALUES[:8])
    midpoints = (magnitudes[1:] + magnitudes[:-1]) / 2
    index = torch.bucketize(scaled.abs().clamp(max=6.0).contiguous(), midpoints, right=True)  # [E, N, G, 32]: 0..7
    codes = (index | (torch.signbit(scaled).long() << 3)).to(torch.uint8)  # -0.0 keeps its code: exact round trip
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [E, N, G, 16]
    return blocks.contiguous(), (exponent + SCALE_BIAS).to(torch.uint8)
