"""Tile configuration of the grouped GEMMs, chosen from (T, E, K, H, I): TILE_TABLE for the bf16 kernel
(light_moe/kernels/grouped_gemm.py), W4A16_TILE_TABLE (at the end) for the W4A16 kernel (w4a16_gemm.py).

Shape legend: T tokens, E experts, K top-k, H hidden, I intermediate, M = T * K routed rows.

The kernel computes C^T = W X^T per expert: weight rows are wgmma's M (`tile_w` = 64, 128 or 256 rows;
one consumer warpgroup per 64 rows, two for 128 and 256) and routed token rows are wgmma's N
(`tile_t`, 8..256). The choice is a lookup in TILE_TABLE on the expected tokens per active expert
(M / min(E, M)), i.e. data, not branches. The rows were measured on an H200 with the Mixtral-8x7B
layer (E=8, H=4096, I=14336, top-2), up + down projection, graph replays
(`light_moe.bench.moe_layer.run_tile_sweep`; us are up / down; the sweep then used unscaled gate
weights, i.e. skewed routing, so compare within a row only; on an H100 at T=4096: 256 x 128 producer
2741 / 1433, consumer 3048 / 1545, 128 x 256 consumer 3134 / 1606):

  T=1     (64, 8)    116 / 62   (128, 8) 121 / 63      weight-streaming: 4.0 TB/s of the H200's 4.8
  T=4     (64, 8)    274 / 146  (128, 16) 279 / 171    small tiles: 2 x 64 down tiles for 132 SMs
  T=16    (64, 8)    437 / 224  (128, 16) 439 / 227
  T=64    (128, 32)  442 / 226  (256, 32) 457 / 232  (64, 32) 629 / 312 (producer fence)
  T=256   (128, 128) 479 / 233  (256, 64) 477 / 258  (128, 64) 755 / 369 (producer fence)
  T=1024  (256, 64)  854 / 438  (256, 128) 967 / 515  (128, 128) 1046 / 515
  T=4096  (256, 128) 2659 / 1405 (producer fence: 724 / 685 TFLOP/s) vs consumer fence 2818 / 1681,
          (128, 256) 3282 / 1726
  T=16384 (256, 128) 13295 / 5914 (producer fence) vs 12978 / 6227 (consumer)

Why: while the layer streams weights (up to ~230 tokens per expert on an H100: 700 TFLOP/s over
3 TB/s) tile_t only has to cover the tokens of one expert (2x the mean absorbs routing imbalance) and
small weight tiles balance the SMs when few experts are active. Once compute-bound, 256 weight rows x
128 tokens beats 128 x 256: the weights come by TMA and only 128 token rows per stage go through the
cp.async gather, and 128-row token tiles waste less on each expert's last, partial tile.
"""

from __future__ import annotations

from dataclasses import dataclass

from light_moe.kernels.w4a16_layout import ATOM_M, TILE_K

# (max expected tokens per active expert, tile_w, tile_t, fence_mode); first row that fits wins.
TILE_TABLE: tuple[tuple[float, int, int, str], ...] = (
    (8, 64, 8, "consumer"),
    (16, 128, 32, "consumer"),
    (32, 128, 64, "consumer"),
    (64, 128, 128, "consumer"),
    (384, 256, 64, "consumer"),
    (float("inf"), 256, 128, "producer"),
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


def expected_tokens_per_expert(num_rows: int, num_experts: int) -> float:
    """M routed rows spread over min(E, M) active experts (uniform routing)."""
    active = max(1, min(num_experts, num_rows))
    return num_rows / active


def choose_tile_config(num_rows: int, num_experts: int, n_out: int) -> TileConfig:
    """Tile config for M = T * K routed rows over E experts, with n_out weight rows per expert.

    Uses only host-known sizes (never the device counts), so the choice is graph-safe.
    """
    per_expert = expected_tokens_per_expert(num_rows, num_experts)
    for limit, tile_w, tile_t, fence_mode in TILE_TABLE:
        if per_expert <= limit:
            while n_out % tile_w and tile_w > 64:
                tile_w //= 2
            return TileConfig(tile_w, tile_t, fence_mode)
    raise AssertionError("TILE_TABLE ends with an unbounded row")


# ---- W4A16 grouped GEMM (w4a16_gemm.py) ----------------------------------------------------------
# A split-K decode tile of 128 rows halves to 64 unless its tiles fill the SMs' last wave to at least this
# fraction (tiles / (waves * SMs)): at T=1 Mixtral's 128-row tiles are 448 (up: 3.4 waves of 132, 85%) and
# 64 (down) for 2 experts, which measured 97 us against 83 with 64 rows; from 4 experts on (896 / 128
# tiles: 97%) 128 rows won.
MIN_DECODE_WAVE_FILL = 0.9
MAX_TILE_T_SPLIT4 = 32  # W4A16 k_split = 4: 3 x 64 x tile_t fp32 partials in smem, 104 registers per consumer

# (mean routed rows per active expert, tile_w, tile_t, fence_mode, k_split): first row that fits wins.
# Decode rows from a sweep on one H100 (Mixtral up + down, graph replays, benchmarks/results/
# w4a16_decode_tiles_h100.json): tile_t about twice the mean, because the busiest expert gets well above
# the mean and every extra token tile re-reads that expert's weights; k_split = 4 below 16 columns (int4
# TB/s 2.0 vs 1.7 with 2). T=1: 64x8x4 90 us vs 64x8x2 108; T=32: 64x16x4 350 vs 64x8x2 651. T=16 (4 per
# expert), after the one-add ring (w4a16_experts_h100_ring.json): 64x8x4 308 vs 64x16x4 342: the 2nd token
# tile of the busiest experts costs less than 16 columns everywhere.
# From 16 rows per expert on, 256-row tiles (two m64 atoms per consumer warpgroup: each dequantised
# fragment feeds twice the columns per token byte, half the token re-reads). ptxas fits 256 x 128 (two
# 64 x 128 fp32 accumulators, A and temporaries of two atoms) in the consumers' 224 registers without
# spills, the bf16 kernel's prefill shape. H200, experts up + down, same run (w4a16_experts_h200_256row_
# {mid,prefill}_80d5bce.json): T=64 256x32 274 us vs 128x32 360; T=128 256x64 367 vs 128x64 426; T=256 256x128 549 vs
# 128x64 654 (bf16 711); T=1024 256x128 consumer fence 1301 vs 128x128 1551 (bf16 1337); T=4096 4899 vs
# 128x256 5362 (bf16 4666); T=16384 19710 vs 21559 (bf16 18626). The consumer fence beat the producer
# fence (4978 at T=4096) and a cp.async lag of 2 (4922) at every T. T=32 (8 per expert): 256x32 271 vs
# 64x16x4 324 (w4a16_experts_h200_extra_d242d4f.json), so 256x32 from 4 rows per expert on. The last
# field is TileConfig.kblock_pipeline: at 256 x 128 (eight wgmma per k-tile and warpgroup) issuing each k16
# block as soon as it is scaled was faster in three of three same-run comparisons (H200, T=4096: 4758 vs
# 4956 us, medians of 6 alternating rounds, w4a16_ab_h200_430c339.json; T=1024 1426 vs 1442); at 128 x 256
# and on the small tiles it was slower (2-10%: one wait and commit per block costs more than it hides).
# Decode, split K over 128 rows (each of the 4 K warpgroups takes both atoms: half the per-k-tile barrier,
# fence and ring work per int4 byte), H200 (w4a16_experts_h200_boundary_8bf4511.json): T=4 128x8x4 131 us vs
# 64x8x4 153, T=8 216 vs 222, T=16 246 vs 294 (256x32 269); T=1 97 vs 83, because the down projection then
# has 64 tiles for 132 SMs and the up projection fills its 4th wave to 85%: MIN_DECODE_WAVE_FILL sends
# both back to 64 rows there.
# The last field is TileConfig.bulk_weights (int4 atoms of a k-tile by one cp.async.bulk): faster on every
# 256-row tile (H200, 3 alternating rounds, medians; w4a16_experts_h200_bulk_{prefill_0d12dab,mid_5f0b568}
# .json): 256x128 with the k-block pipeline T=4096 4742 vs 4853 us, T=16384 18906 vs 19396, T=1024 1464 vs
# 1495; 256x32 T=64 292 vs 299; 256x64 T=256 653 vs 677. At decode twice as slow (64x8x4 T=1 158 vs 81 us,
# 128x8x4 T=4 172 vs 132: one elected thread's copy per small k-tile serialises what 128 producer threads'
# cp.async overlap).
# The last field: two k-tiles per stage (TileConfig.k_tiles_per_stage = 2, one g = 128 group per stage) when the
# weights have g = 128: at 256 x 64 (T=128, 32 rows per expert) 346 vs 379 us, T=64 348 vs 360; no gain at
# 256 x 32 (T=64: 270 vs 267) or 256 x 128 (T=1024 1368 vs 1348, T=4096 4721 vs 4717, T=16384 19276 vs 19407)
# (H200, alternating rounds, medians, w4a16_experts_h200_kps2_{mid,prefill}_fb60e03.json).
# The last field: TileConfig.tma_tokens in the up projection (x[gather_index] gathered into [M, H] by one
# index_select, then token rows by one TMA per k-tile instead of 128 producer threads' cp.async gather). At
# 256 x 128 the up projection was faster in three of three runs (H200, session 9, benchmarks/results/
# smem_dequant_h200_session9/: T=4096 -2.2 / -3.3 / -2.8%, T=16384 -0.9 / -1.9 / -1.7%, the index_select
# included); the down projection (act read in place either way) was neutral (+2.7, +1.0, -1.8 / -1.7, +0.6,
# -1.5%), so it keeps the cp.async path.
W4A16_TILE_TABLE: tuple[tuple[float, int, int, str, int, bool, bool, bool, bool], ...] = (
    # rows/expert, tile_w, tile_t, fence, k_split, k-block pipeline, bulk int4, 2 k-tiles per stage at g = 128,
    # TMA token rows in the up projection
    (4, 128, 8, "consumer", 4, False, False, False, False),
    (16, 256, 32, "consumer", 1, False, True, False, False),
    (32, 256, 64, "consumer", 1, False, True, True, False),
    (float("inf"), 256, 128, "consumer", 1, True, True, False, True),
)


def _wave_fill(tiles: int, num_sms: int) -> float:
    return tiles / (-(-tiles // num_sms) * num_sms)


def choose_w4a16_tile(num_rows: int, num_experts: int, n_out: int, k_dim: int, num_sms: int = 132,
                      group_size: int = 0, gated: bool = False) -> TileConfig:
    """Tile from host-known sizes only (graph-safe): M routed rows over E experts, n_out weight rows, reduction
    size k_dim, on num_sms SMs, weights of group_size (0: not known; only g = 128 takes two k-tiles per stage),
    gated: the up projection (TMA token rows where the table says so).
    A 256- or 128-row tile that does not divide n_out halves, down to 64 rows with split K over 2 warpgroups;
    so does a split-K decode tile whose tiles for the (at most min(E, M)) active experts fill the last wave
    below MIN_DECODE_WAVE_FILL; split K falls back to the largest of 4, 2, 1 that divides the k-tiles
    (Qwen2-MoE: 22)."""
    active = max(1, min(num_experts, num_rows))
    per_expert = num_rows / active
    for limit, tile_w, tile_t, fence_mode, k_split, kblock, bulk, kps_g128, tma_up in W4A16_TILE_TABLE:
        if per_expert <= limit:
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
            # (the k-tiles are even: the W4A16 kernel takes K in multiples of 128)
            two_atoms = tile_w == 256
            kps = 2 if kps_g128 and two_atoms and group_size == 2 * TILE_K else 1
            return TileConfig(tile_w, tile_t, fence_mode, k_split, k_tiles_per_stage=kps,
                              kblock_pipeline=kblock and two_atoms, bulk_weights=bulk and two_atoms,
                              tma_tokens=tma_up and gated and two_atoms)
    raise AssertionError("W4A16_TILE_TABLE ends with an unbounded row")
