"""Epilogue variants of the two grouped GEMMs (grouped_gemm.py: bf16 weights, w4a16_gemm.py: int4 weights): the
per-expert biases and the up projection's activation, as compile-time options (gpt-oss's experts,
config.ExpertConfig).

Shape legend: E experts, I intermediate, H hidden, N weight rows of a projection (2I up, H down), m64 atoms of a
consumer warpgroup (mma_m), tile_t token rows of a tile.

    up:   act = activation(x W13_e^T + b13_e)   SiLU(gate) * up, or the clamped SwiGLU:
          gate = min(gate, limit), up = clamp(up, -limit, limit), act = gate * sigmoid(alpha * gate) * (up + 1)
    down: y = act W2_e^T + b2_e                 (the combine then multiplies y by the routing weight, so each
                                                 token gets sum_k w_k (W2_k a_k + b2_k), as ops/reference.py)

ExpertEpilogue is part of a kernel's compile key beside its TileConfig (which stays about tiling); the default
(SiLU * up, no bias) traces exactly the operations the kernels had before the variants existed, so it compiles
to the same code. Bias and activation run in fp32 on the accumulator, before the one rounding to bf16.

Bias order: the kernels read the biases as the model holds them, b13 [E, 2I] in w13's canonical row order (gate
entries 0:I, up entries I:2I) and b2 [E, H]; they are not repacked like the weights. The biases come with each
call (MoEOps.experts(biases=)), not with prepare_expert_weights, and the epilogue knows the canonical index of
every accumulator row of the interleaved weights (canonical_row), so nothing has to be permuted per call.
Each consumer thread holds 2 rows per m64 atom (r and r + 8: a gate row and its up row when gated), so it
loads 2 * mma_m bias values per tile, at the tile's start, while its main loop runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
import torch
from cutlass import Float32, Int32
from cutlass.cute.runtime import from_dlpack

from light_moe.kernels import gemm_host

ACTIVATIONS = ("silu", "clamped_swiglu")


@dataclass(frozen=True)
class ExpertEpilogue:
    """What the epilogue adds to the GEMM: a per-expert bias of every weight row (bias), and for the gated up
    projection the activation, with alpha and limit baked into the kernel. SiLU takes neither alpha nor limit
    (one compile key per distinct kernel)."""

    activation: str = "silu"  # "silu" | "clamped_swiglu" (the up projection only)
    alpha: float = 1.0
    limit: float | None = None
    bias: bool = False

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation == "silu" and (self.alpha != 1.0 or self.limit is not None):
            raise ValueError(f"SiLU takes no alpha or limit, got alpha={self.alpha}, limit={self.limit}")
        if self.activation == "clamped_swiglu" and (self.limit is None or not self.limit > 0 or not self.alpha > 0):
            raise ValueError(f"the clamped SwiGLU needs limit > 0 and alpha > 0, got limit={self.limit}, "
                             f"alpha={self.alpha}")

    @classmethod
    def of(cls, spec, bias: bool) -> ExpertEpilogue:
        """The up projection's epilogue for a config.ExpertConfig (None: SiLU * up), with a bias or not."""
        if spec is None or spec.activation == "silu":
            return cls(bias=bias)
        return cls(spec.activation, float(spec.alpha), float(spec.limit), bias)


DEFAULT_EPILOGUE = ExpertEpilogue()


def supports(epilogue: ExpertEpilogue, gated: bool) -> tuple[bool, str]:
    if not gated and epilogue.activation != "silu":
        return False, f"the down projection has no activation, got {epilogue.activation!r}"
    return True, "ok"


def canonical_row(row, inter: int, gated: bool):
    """Weight row `row` of a prepared projection -> its row in the canonical order (the bias index). Gated (w13
    prepared by grouped_gemm.prepare_expert_weights / w4a16_layout.prepare_w4a16_weights): every 16 rows are 8
    gate rows then the 8 matching up rows; canonically gate rows are 0:I, up rows I:2I. Plain integer arithmetic,
    traced into the kernels on Int32 rows and checked on the host against both preparations."""
    if not gated:
        return row
    return (row % 16) // 8 * inter + row // 16 * 8 + row % 8


# ------------------------------------------------------------------------------------------------
# Device side, traced inline into both kernels.
# ------------------------------------------------------------------------------------------------


@cute.jit
def load_bias(bias: cute.Tensor, bias_frag: cute.Tensor, t_cc: cute.Tensor, e: Int32, row0: Int32,
              mma_m: cutlass.Constexpr, tile_t: cutlass.Constexpr, inter: cutlass.Constexpr,
              gated: cutlass.Constexpr):
    """bias_frag[2 m + h] = bias[e, canonical row of the tile's row (row0 + local row)] in fp32, for this thread's
    rows of m64 atom m: accumulator value m * tile_t / 2 + 2 h sits in row r + 8 h (h = 1: the up row when
    gated)."""
    for m in cutlass.range_constexpr(mma_m):
        for h in cutlass.range_constexpr(2):
            row = row0 + t_cc[m * (tile_t // 2) + 2 * h][0]
            bias_frag[2 * m + h] = bias[e, canonical_row(row, inter, gated)].to(Float32)


def gated_activation(gate, up, epilogue: ExpertEpilogue):
    """act of one gate value and its up value (fp32 registers), traced inline by gemm_pipeline.stage_out_chunk.
    SiLU keeps the exact expression of the kernels before the variants (same code for the default)."""
    if epilogue.activation == "clamped_swiglu":
        limit = Float32(epilogue.limit)
        gate = cutlass.min(gate, limit)
        up = cutlass.max(cutlass.min(up, limit), -limit)
        return gate / (1.0 + cute.math.exp(gate * (-epilogue.alpha), fastmath=True)) * (up + 1.0)
    return gate / (1.0 + cute.math.exp(-gate, fastmath=True)) * up


# ------------------------------------------------------------------------------------------------
# Host side.
# ------------------------------------------------------------------------------------------------


def check_bias(epilogue: ExpertEpilogue, bias: torch.Tensor | None, num_experts: int, rows: int, name: str) -> None:
    """The bias a wrapper was given agrees with its epilogue and is what the kernel reads: bf16 [E, N]
    contiguous, on the GPU."""
    if epilogue.bias != (bias is not None):
        raise ValueError(f"epilogue {epilogue} {'needs' if epilogue.bias else 'takes no'} {name}")
    if bias is None:
        return
    if (bias.dtype != torch.bfloat16 or tuple(bias.shape) != (num_experts, rows) or not bias.is_contiguous()
            or not bias.is_cuda):
        raise ValueError(f"expected {name} as a contiguous CUDA bf16 tensor [{num_experts}, {rows}], got "
                         f"{bias.dtype} {list(bias.shape)} on {bias.device}")


_bias_views: dict[tuple, object] = {}  # (data_ptr, shape, device) -> cute view: biases live as long as the model


def bias_view(bias: torch.Tensor):
    """The cute view of a bias [E, N] (static shape: E and N are compile-time sizes), built once per tensor."""
    key = (bias.data_ptr(), tuple(bias.shape), bias.device.index)
    return gemm_host.cached_views(_bias_views, key, lambda: from_dlpack(bias))
