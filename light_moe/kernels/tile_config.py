"""Tile configuration of the grouped GEMM (light_moe/kernels/grouped_gemm.py), chosen from (T, E, K, H, I).

Shape legend: T tokens, E experts, K top-k, H hidden, I intermediate, M = T * K routed rows.

The kernel computes C^T = W X^T per expert: weight rows are wgmma's M (`tile_w`, 64 or 128 rows, one
consumer warpgroup per 64) and routed token rows are wgmma's N (`tile_t`, 8..256). The choice is a
table lookup on the expected tokens per active expert, not a chain of branches:

* tile_t: the smallest table entry >= 2x the expected tokens per active expert. The factor 2 absorbs
  routing imbalance (a second token tile of the same weight tile re-reads that weight tile, from L2
  at best); while the layer streams weights (<= ~230 tokens per expert on an H100: 700 TFLOP/s over
  3 TB/s) a wider N costs nothing but shared memory, so erring large is cheap.
* tile_w: 64 for decode (<= 8 tokens per expert): more, smaller tiles keep all SMs busy when only a
  few experts are active (T=1 top-2 on Mixtral: the down-projection has 2 x 64 tiles of 64 rows for
  132 SMs, but only 2 x 32 of 128 rows). Otherwise 128 (two consumer warpgroups): every token row a
  tile gathers is re-read once per weight tile (from L2), so taller weight tiles halve that traffic,
  and 128 x 256 is the shape of CUTLASS's fastest Hopper GEMM for the compute-bound prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

# (max expected tokens per active expert, tile_w, tile_t); first row that fits wins.
TILE_TABLE: tuple[tuple[float, int, int], ...] = (
    (4, 64, 8),
    (8, 64, 16),
    (16, 128, 32),
    (32, 128, 64),
    (64, 128, 128),
    (float("inf"), 128, 256),
)


@dataclass(frozen=True)
class TileConfig:
    tile_w: int  # weight rows per tile (wgmma M): 64, 128 or 256 (two m64 atoms per consumer warpgroup)
    tile_t: int  # routed token rows per tile (wgmma N): multiple of 8, <= 256

    def __post_init__(self):
        if self.tile_w not in (64, 128, 256):
            raise ValueError(f"tile_w must be 64, 128 or 256, got {self.tile_w}")
        if self.tile_t % 8 or not 8 <= self.tile_t <= 256:
            raise ValueError(f"tile_t must be a multiple of 8 in [8, 256], got {self.tile_t}")


def expected_tokens_per_expert(num_rows: int, num_experts: int) -> float:
    """M routed rows spread over min(E, M) active experts (uniform routing)."""
    active = max(1, min(num_experts, num_rows))
    return num_rows / active


def choose_tile_config(num_rows: int, num_experts: int, n_out: int) -> TileConfig:
    """Tile config for M = T * K routed rows over E experts, with n_out weight rows per expert.

    Uses only host-known sizes (never the device counts), so the choice is graph-safe.
    """
    per_expert = expected_tokens_per_expert(num_rows, num_experts)
    for limit, tile_w, tile_t in TILE_TABLE:
        if per_expert <= limit:
            if n_out % tile_w:
                tile_w = 64
            return TileConfig(tile_w, tile_t)
    raise AssertionError("TILE_TABLE ends with an unbounded row")
