"""Tile configuration of the grouped GEMMs, chosen from (T, E, K, H, I): TILE_TABLE for the bf16 kernel
(light_moe/kernels/grouped_gemm.py), W4A16_TILE_TABLE (at the end) for the W4A16 kernel (w4a16_gemm.py).

Shape legend: T tokens, E experts, K top-k, H hidden, I intermediate, M = T * K routed rows.

The kernel computes C^T = W X^T per expert: weight rows are wgmma's M (`tile_w` = 64, 128 or 256 rows;
one consumer warpgroup per 64 rows, two for 128 and 256) and routed token rows are wgmma's N
(`tile_t`, 8..256). The choice is a lookup in a table of named rows on the expected tokens per active
expert (M / min(E, M)), i.e. data, not branches.

Why these rows: while the layer streams weights, tile_t only has to cover the tokens of one expert (2x the
mean absorbs routing imbalance) and small weight tiles balance the SMs when few experts are active; once
compute-bound, 256 weight rows x 128 tokens beats 128 x 256 (weights by TMA, fewer gathered token rows).
The sweeps behind every row and flag (H100 / H200 timings, result files): docs/kernels.md, "Tile tables".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from light_moe.config import W4A16_DECODE_KERNELS
from light_moe.kernels.w4a16_layout import ATOM_M, TILE_K

DIRECT_WARPS = (2, 4, 8)  # warps per CTA of the direct W4A16 decode kernel (two CTAs per SM)
DIRECT_CTAS_PER_SM = 2  # the direct kernel's resident CTAs per SM (w4a16_plan sizes its shared memory for them)
# decode_kernel="direct" takes the direct tile for a projection only when its units (active experts x 64-row atoms)
# fill this many waves of the direct kernel's CTAs: at half a wave (Mixtral's T = 1 down projection, 128 units for
# 264 CTAs) the wgmma split-K tile was faster on the H100 (BENCHMARKS.md, session 19)
DIRECT_MIN_WAVES = 0.9


class TileRow(NamedTuple):
    """A row of TILE_TABLE (bf16 grouped GEMM); the first row whose limit holds the expected tokens wins."""
    max_tokens_per_expert: float
    tile_w: int
    tile_t: int
    fence_mode: str
    cluster_t: int = 1  # TileConfig.cluster_t (two CTAs share the weight tile): no row takes it until measured


TILE_TABLE: tuple[TileRow, ...] = (  # measured: docs/kernels.md, "Tile tables"
    TileRow(8, 64, 8, "consumer"),
    TileRow(16, 128, 32, "consumer"),
    TileRow(32, 128, 64, "consumer"),
    TileRow(64, 128, 128, "consumer"),
    TileRow(384, 256, 64, "consumer"),
    TileRow(float("inf"), 256, 128, "producer"),
)


@dataclass(frozen=True)
class TileConfig:
    tile_w: int  # weight rows per tile (wgmma M): 64, 128 or 256 (two m64 atoms per consumer warpgroup)
    tile_t: int  # routed token rows per tile (wgmma N): multiple of 8, <= 256
    # who fences the cp.async smem writes before wgmma reads them (grouped_gemm.py); "none" is racy and
    # exists only to measure what the fence costs
    fence_mode: str = "consumer"
    # consumer warpgroups that share a tile's k-tiles (split K inside the CTA, partial sums reduced through
    # shared memory): 1, 2 or 4. Only the W4A16 kernel (w4a16_gemm.py, tile_w = 64) implements k_split > 1;
    # the bf16 grouped GEMM refuses it.
    k_split: int = 1
    # pipeline stages of the W4A16 kernel (0: as many as shared memory holds, at most its MAX_STAGES); set
    # only to measure the pipeline depth. The bf16 grouped GEMM refuses anything but 0.
    stages: int = 0
    # k-tiles of 64 per pipeline stage of the W4A16 kernel (1 or 2): 2 halves the per-stage barrier, fence,
    # ring and meta work per weight byte on the issue-bound decode path. The bf16 grouped GEMM refuses 2.
    k_tiles_per_stage: int = 1
    # "producer" fence only: stages a producer thread's cp.async copies may run ahead of its fence and arrival
    # (1: at most two stages of copies in flight per thread). At most stages - k_split - 1 (the kernels check:
    # a larger lag deadlocks, since consumers hand a stage back only after waiting for their next one).
    cp_async_lag: int = 1
    # W4A16 only: scale each k16 block's A registers and issue its wgmma at once, with up to three blocks'
    # wgmma in flight (wait_group(3) before a block's registers are rewritten), instead of scaling all four
    # after wait_group(0): the tensor cores keep queued work while a warpgroup rescales. The bf16 GEMM refuses it.
    kblock_pipeline: bool = False
    # W4A16 only: the int4 atoms of a k-tile (tile_w / 64 x 2 KB, contiguous) come by one cp.async.bulk of an
    # elected producer thread, counted by the full barrier's transaction bytes, instead of one 16-byte cp.async
    # per producer thread and atom. The bf16 GEMM refuses it (its weights already come by TMA).
    bulk_weights: bool = False
    # W4A16 only: the tile's token rows come by one TMA per k-tile (rows past M are zero-filled) instead of 128
    # producer threads' cp.async; nothing then writes shared memory through the generic proxy for wgmma, so
    # no proxy fence either. TMA needs contiguous rows: the down projection reads act [M, I] in place, the up
    # projection gathers x into [M, H] first. One k-tile per stage. The bf16 GEMM refuses it.
    tma_tokens: bool = False
    # W4A16 only: the A registers take the exact q - z and each group's wgmma sum its own fp32 accumulator, added
    # to the total times the group scale once per group (w4a16_dequant.py): one fp32 fma per accumulator value
    # and group instead of one bf16x2 fma per A register and k-tile, a saving where tiles have few token columns
    # (decode). Needs g >= 64 (one group per k-tile at most) and whole-k-tile wgmma (no k-block pipeline).
    deferred_scale: bool = False
    # W4A16 only, applied by the down projection alone: before griddepcontrol.wait, the producer prefetches its
    # first tile's first stages of int4 atoms into L2 (the expert list comes from the router, which finished
    # before the up GEMM, the kernel just before, passed its own wait; the weights are no kernel's output), so
    # the down GEMM's pipeline fill overlaps the up GEMM's tail. A candidate, not in the table (docs/kernels.md).
    l2_prefetch: bool = False
    # W4A16 only: > 0 selects the direct decode kernel (w4a16_direct.py: mma.sync, no producer warpgroup, each of
    # this many warps per CTA streams its own share of K of a 64-row atom into a private cp.async ring); the tile
    # is then 64 rows x 8 routed rows and k_split, the k-block pipeline, bulk int4, TMA tokens and two k-tiles per
    # stage do not apply. `stages` sets the ring depth per warp (0: as deep as shared memory allows).
    direct_warps: int = 0
    # direct kernel, down projection: the first ring slots' int4 is requested before griddepcontrol.wait (the
    # expert list was complete before the up GEMM passed its own wait), streaming while the up GEMM drains
    early_weights: bool = False
    # direct kernel: stream-K, every CTA takes an equal contiguous run of (unit, one group per warp) steps instead of
    # whole units, so the last wave is as full as the first; a unit split between CTAs is summed by the last of them
    # to finish (fp32 partials in a global workspace, in CTA order: deterministic). Opt-in: alone it ties or wins, but
    # in a chain of kernels whole units are faster on the H100 (their uneven finish lets the next kernel start under
    # the tail; docs/kernels.md, "Why stream-K lost")
    stream_k: bool = False
    # bf16 grouped GEMM only: CTAs per cluster along the token tiles (1 or 2). With 2, the two CTAs of a cluster take
    # consecutive token tiles of the same (expert, weight tile) and each TMAs half of the weight tile's rows,
    # multicast into both CTAs' shared memory: the weight tile crosses L2 -> SM once per 2 x tile_t tokens. Opt-in
    # until measured against the table (docs/kernels.md, "Two-CTA clusters").
    cluster_t: int = 1

    def __post_init__(self):
        if self.tile_w not in (64, 128, 256):
            raise ValueError(f"tile_w must be 64, 128 or 256, got {self.tile_w}")
        if self.tile_t % 8 or not 8 <= self.tile_t <= 256:
            raise ValueError(f"tile_t must be a multiple of 8 in [8, 256], got {self.tile_t}")
        if self.fence_mode not in ("consumer", "producer", "none"):
            raise ValueError(f"fence_mode must be 'consumer', 'producer' or 'none', got {self.fence_mode!r}")
        if self.k_split not in (1, 2, 4):
            raise ValueError(f"k_split must be 1, 2 or 4, got {self.k_split}")
        if self.stages < 0:
            raise ValueError(f"stages must be >= 0 (0: as many as fit), got {self.stages}")
        if self.k_tiles_per_stage not in (1, 2):
            raise ValueError(f"k_tiles_per_stage must be 1 or 2, got {self.k_tiles_per_stage}")
        if self.cp_async_lag < 1:
            raise ValueError(f"cp_async_lag must be >= 1, got {self.cp_async_lag}")
        if self.direct_warps not in (0, *DIRECT_WARPS):
            raise ValueError(f"direct_warps must be 0 or one of {DIRECT_WARPS}, got {self.direct_warps}")
        if self.direct_warps and ((self.tile_w, self.tile_t, self.k_split, self.k_tiles_per_stage) != (64, 8, 1, 1)
                                  or self.kblock_pipeline or self.bulk_weights or self.tma_tokens):
            raise ValueError(f"the direct kernel (direct_warps={self.direct_warps}) takes a plain 64 x 8 tile, "
                             f"got {self}")
        if self.cluster_t not in (1, 2):
            raise ValueError(f"cluster_t must be 1 or 2, got {self.cluster_t}")
        if (self.early_weights or self.stream_k) and not self.direct_warps:
            raise ValueError(f"early_weights and stream_k belong to the direct kernel (direct_warps > 0), got {self}")


def expected_tokens_per_expert(num_rows: int, num_experts: int) -> float:
    """M routed rows spread over min(E, M) active experts (uniform routing)."""
    active = max(1, min(num_experts, num_rows))
    return num_rows / active


def choose_tile_config(num_rows: int, num_experts: int, n_out: int) -> TileConfig:
    """Tile config for M = T * K routed rows over E experts, with n_out weight rows per expert.

    Uses only host-known sizes (never the device counts), so the choice is graph-safe.
    """
    per_expert = expected_tokens_per_expert(num_rows, num_experts)
    for row in TILE_TABLE:
        if per_expert <= row.max_tokens_per_expert:
            tile_w = row.tile_w
            while n_out % tile_w and tile_w > 64:
                tile_w //= 2
            # a cluster's CTAs each TMA half of the weight tile: not below 128 rows (GroupedGemmSm90.supports)
            return TileConfig(tile_w, row.tile_t, row.fence_mode, cluster_t=row.cluster_t if tile_w >= 128 else 1)
    raise AssertionError("TILE_TABLE ends with an unbounded row")


# ---- W4A16 grouped GEMM (w4a16_gemm.py) ----------------------------------------------------------
# A split-K decode tile of 128 rows halves to 64 unless its tiles fill the SMs' last wave to at least this
# fraction (tiles / (waves * SMs)): a part-empty last wave cost more than the larger tile saved (T=1
# Mixtral; docs/kernels.md, "Tile tables").
MIN_DECODE_WAVE_FILL = 0.9
MAX_TILE_T_SPLIT4 = 32  # W4A16 k_split = 4: 3 x 64 x tile_t fp32 partials in smem, 104 registers per consumer


class W4A16TileRow(NamedTuple):
    """A row of W4A16_TILE_TABLE; the first row whose limit holds the mean routed rows per active expert wins.
    Each flag was measured to win only where its row sets it (docs/kernels.md, "Tile tables")."""
    max_rows_per_expert: float
    tile_w: int
    tile_t: int  # about twice the mean: the busiest expert gets well above it
    fence_mode: str
    k_split: int = 1  # decode: split K over the consumer warpgroups (more int4 bytes in flight per CTA)
    kblock_pipeline: bool = False  # TileConfig.kblock_pipeline, on 256-row tiles only
    bulk_weights: bool = False  # TileConfig.bulk_weights, on 256-row tiles only
    two_k_tiles_at_g128: bool = False  # TileConfig.k_tiles_per_stage = 2 when the weights have g = 128
    tma_tokens_up: bool = False  # TileConfig.tma_tokens in the up projection (gated)
    deferred_scale_at: tuple[int, ...] = ()  # TileConfig.deferred_scale on tiles of these widths, g >= 64 known


W4A16_TILE_TABLE: tuple[W4A16TileRow, ...] = (
    W4A16TileRow(4, 128, 8, "consumer", k_split=4, deferred_scale_at=(64,)),
    W4A16TileRow(16, 256, 32, "consumer", bulk_weights=True, deferred_scale_at=(256,)),
    W4A16TileRow(32, 256, 64, "consumer", bulk_weights=True, two_k_tiles_at_g128=True),
    W4A16TileRow(float("inf"), 256, 128, "consumer", kblock_pipeline=True, bulk_weights=True, tma_tokens_up=True),
)


def _wave_fill(tiles: int, num_sms: int) -> float:
    return tiles / (-(-tiles // num_sms) * num_sms)



def direct_splits(k_dim: int, group_size: int, warps: int) -> bool:
    """Whether the direct kernel's `warps` split the k-tiles of K into whole groups of g (64 or 128) each."""
    k_tiles = k_dim // TILE_K
    if group_size not in (TILE_K, 2 * TILE_K) or k_tiles % warps:
        return False
    return (k_tiles // warps) % (group_size // TILE_K) == 0


def direct_tile(k_dim: int, group_size: int, gated: bool) -> TileConfig | None:
    """The direct decode kernel's tile (w4a16_direct.py) for a projection of reduction size k_dim: the most warps
    of DIRECT_WARPS that split its k-tiles into whole groups (the down projection also requests its first int4
    before the dependency wait; stream-K stays opt-in: slower in kernel chains, docs/kernels.md); None where none does
    or g is not 64 or 128 (the wgmma tile stays)."""
    for warps in sorted(DIRECT_WARPS, reverse=True):
        if direct_splits(k_dim, group_size, warps):
            return TileConfig(ATOM_M, 8, direct_warps=warps, early_weights=not gated)
    return None


def choose_w4a16_tile(num_rows: int, num_experts: int, n_out: int, k_dim: int, num_sms: int = 132,
                      group_size: int = 0, gated: bool = False, decode_kernel: str = "wgmma") -> TileConfig:
    """Tile from host-known sizes only (graph-safe): M routed rows over E experts, n_out weight rows, reduction
    size k_dim, on num_sms SMs, weights of group_size (0: not known; only g = 128 takes two k-tiles per stage),
    gated: the up projection (TMA token rows where the table says so).
    A 256- or 128-row tile that does not divide n_out halves, down to 64 rows with split K over 2 warpgroups;
    so does a split-K decode tile whose tiles for the (at most min(E, M)) active experts fill the last wave
    below MIN_DECODE_WAVE_FILL; split K falls back to the largest of 4, 2, 1 that divides the k-tiles
    (Qwen2-MoE: 22). decode_kernel="direct": the decode row (the table's first) takes the direct kernel where
    direct_tile has one for the projection and its units fill DIRECT_MIN_WAVES waves (docs/kernels.md)."""
    if decode_kernel not in W4A16_DECODE_KERNELS:
        raise ValueError(f"decode_kernel must be one of {W4A16_DECODE_KERNELS}, got {decode_kernel!r}")
    active = max(1, min(num_experts, num_rows))
    per_expert = num_rows / active
    if (decode_kernel == "direct" and per_expert <= W4A16_TILE_TABLE[0].max_rows_per_expert
            and active * (n_out // ATOM_M) >= DIRECT_MIN_WAVES * DIRECT_CTAS_PER_SM * num_sms):
        direct = direct_tile(k_dim, group_size, gated)
        if direct is not None:
            return direct
    for row in W4A16_TILE_TABLE:
        if per_expert <= row.max_rows_per_expert:
            tile_w, tile_t, k_split = row.tile_w, row.tile_t, row.k_split
            while (tile_w > 64 and k_split > 1 and n_out % tile_w == 0
                   and _wave_fill(n_out // tile_w * active, num_sms) < MIN_DECODE_WAVE_FILL):
                tile_w //= 2
            while n_out % tile_w and tile_w > 64:
                tile_w //= 2
                if tile_w == ATOM_M:  # one atom: split K keeps a second warpgroup busy
                    k_split = max(k_split, 2)
            while k_split > 1 and ((k_dim // TILE_K) % k_split or (k_split == 4 and tile_t > MAX_TILE_T_SPLIT4)):
                k_split //= 2
            # the k-block pipeline, bulk weights, two k-tiles per stage and TMA token rows were measured (and won)
            # only with two atoms per warpgroup
            # (g = 128 divides K, so the k-tiles are even)
            two_atoms = tile_w == 256
            kps = 2 if row.two_k_tiles_at_g128 and two_atoms and group_size == 2 * TILE_K else 1
            # the deferred group scale needs at most one group per k-tile (w4a16_plan.supports_config)
            deferred = tile_w in row.deferred_scale_at and group_size >= TILE_K
            return TileConfig(tile_w, tile_t, row.fence_mode, k_split, k_tiles_per_stage=kps,
                              kblock_pipeline=row.kblock_pipeline and two_atoms,
                              bulk_weights=row.bulk_weights and two_atoms,
                              tma_tokens=row.tma_tokens_up and gated and two_atoms, deferred_scale=deferred)
    raise AssertionError("W4A16_TILE_TABLE ends with an unbounded row")
