"""What the W4A16 grouped GEMM (w4a16_gemm.py) takes and how its shared memory divides: the config and layer
checks, the bytes of a pipeline stage and the stage count (host side only).

Shape legend: E experts, N weight rows (n_out), K reduction (k_dim), g group size; a stage holds
k_tiles_per_stage k-tiles of 64: tile_w x 64 int4 weights, tile_t x 64 bf16 token rows, the group meta words.
"""
from __future__ import annotations

from typing import NamedTuple

from light_moe.kernels.gemm_host import SMEM_CAPACITY, VEC, WG, epilogue_tokens
from light_moe.kernels.tile_config import (
    DIRECT_CTAS_PER_SM,
    MAX_TILE_T_SPLIT4,
    W4A16_TILE_TABLE,
    TileConfig,
    choose_w4a16_tile,
    direct_splits,
)
from light_moe.kernels.w4a16_layout import ATOM_M, GROUP_SIZES, TILE_K, check_prepared

MAX_STAGES = 24  # int4 stages are small: 64x8 decode = 3.3 KB/stage, 24 stages = 79 KB in flight per SM
MAX_TILE_T_W256 = 128  # tile_w = 256: two m64 atoms per consumer warpgroup (A, temporaries, accumulator x 2)


def reduce_bytes(config: TileConfig) -> int:
    """fp32 partial sums (tile_w x tile_t each) of K warpgroups 1..k_split-1 under split K."""
    return (config.k_split - 1) * config.tile_w * config.tile_t * 4


def stage_bytes(config: TileConfig, group_size: int) -> int:
    """Shared memory of one pipeline stage: int4 weights and bf16 token rows of its k-tiles, the group meta."""
    weights = config.tile_w * TILE_K // 2
    meta = config.tile_w * max(1, TILE_K // group_size) * 4
    return (weights + config.tile_t * TILE_K * 2) * config.k_tiles_per_stage + meta


def num_stages(config: TileConfig, gated: bool, num_experts: int, group_size: int) -> int:
    """Pipeline stages: config.stages when set, else as many as fit beside the fixed parts (at most MAX_STAGES)."""
    out_cols = config.tile_w // 2 if gated else config.tile_w
    epi = epilogue_tokens(config, gated) * (out_cols + VEC) * 2
    fixed = 4 * 1024 + 8 * (num_experts + 1) + epi + reduce_bytes(config)
    fit = (SMEM_CAPACITY - fixed) // stage_bytes(config, group_size)
    return min(config.stages, fit) if config.stages else min(MAX_STAGES, fit)


# ---- the direct decode kernel (w4a16_direct.py): its shared-memory pieces ----
SMEM_PER_SM = 233472  # sm_90: 228 KB per SM, of which 1 KB is reserved per resident CTA
DIRECT_MAX_RING = 8
TOKENS = 8  # routed rows per unit: mma.sync's N
ATOM_BYTES = ATOM_M * TILE_K // 2  # int4 of one atom's k-tile: 2 KB
TOKEN_BYTES = TOKENS * TILE_K * 2  # bf16 token rows of a k-tile: 1 KB
META_BYTES = ATOM_M * 4  # one group's meta words of an atom
SLOT_BYTES = ATOM_BYTES + TOKEN_BYTES + META_BYTES  # one ring slot of a warp
PART_BYTES_PER_WARP = ATOM_M * TOKENS * 4  # a warp's fp32 partial sums of a unit
CTAS_PER_SM = DIRECT_CTAS_PER_SM  # a second CTA streams while the first one reduces and stores a unit


def direct_ring(config: TileConfig, num_experts: int) -> int:
    """Ring slots per warp of the direct kernel: config.stages when set, else as many as fit (at most
    DIRECT_MAX_RING) beside the double-buffered partial sums, with CTAS_PER_SM CTAs per SM."""
    budget = SMEM_PER_SM // CTAS_PER_SM - 1024
    fixed = 2 * config.direct_warps * PART_BYTES_PER_WARP + 8 * (num_experts + 1) + 256  # + alignment
    fit = (budget - fixed) // (config.direct_warps * SLOT_BYTES)
    return min(config.stages, fit) if config.stages else min(DIRECT_MAX_RING, fit)


# ---- the next projection's L2 prefetch from the direct up kernel's tail (w4a16_direct.py, prefetch_next) ----
PREFETCH_FRACTION = 1 / 3  # of each of the next kernel's in-order k-tile streams (its heads), by default
PREFETCH_MAX_BYTES = 24 << 20  # at most this much int4 in all: about what HBM moves in the up kernel's last unit
PREFETCH_PIECE = 16 << 10  # bytes per prefetch instruction (a thread's share)


class NextPrefetch(NamedTuple):
    """What the direct up kernel's CTAs that run one unit fewer than the busiest prefetch into L2 when they are
    done: the heads of the next (down) projection's k-tile streams for every active expert. Static (compile key)."""
    n_atoms: int  # the next projection's 64-row atoms (N / 64)
    k_tiles: int  # its k-tiles (K / 64)
    n_out: int  # its weight rows N (meta words per group)
    group_size: int  # its g (64 or 128: one group per k-tile at most)
    run: int  # k-tiles of each of its consumers' in-order streams (direct: K / 64 / warps; wgmma: all of K)
    head: int  # k-tiles prefetched at the head of each stream
    max_blocks: int  # at most this many (expert, k-tile) blocks of n_atoms x 2 KB in all

    @property
    def piece_bytes(self) -> int:
        """The int4 bytes of one prefetch instruction: PREFETCH_PIECE, or one atom's k-tile where 8 atoms do not
        divide the block."""
        return PREFETCH_PIECE if self.n_atoms % 8 == 0 else ATOM_BYTES

    @property
    def pieces(self) -> int:
        """Prefetch instructions per (expert, k-tile) block: its int4 pieces, then its group's meta words."""
        return self.n_atoms * ATOM_BYTES // self.piece_bytes + 1


def next_prefetch(next_n_out: int, next_k_dim: int, group_size: int, next_config: TileConfig,
                  fraction: float = PREFETCH_FRACTION, max_bytes: int = PREFETCH_MAX_BYTES) -> NextPrefetch | None:
    """The prefetch plan for a next projection of N x K int4 weights that will run with next_config (its k-tile
    order: the direct kernel's warps each stream a contiguous K range, the wgmma kernel's stages come in k-tile
    order); None where nothing would be prefetched."""
    k_tiles = next_k_dim // TILE_K
    run = k_tiles // next_config.direct_warps if next_config.direct_warps else k_tiles
    head = min(run, round(run * fraction))
    max_blocks = max_bytes // (next_n_out // ATOM_M * ATOM_BYTES)
    if head < 1 or max_blocks < 1 or group_size not in (TILE_K, 2 * TILE_K):
        return None
    return NextPrefetch(next_n_out // ATOM_M, k_tiles, next_n_out, group_size, run, head, max_blocks)


def down_prefetch(gated: bool, config: TileConfig, next_weights, num_rows: int, num_sms: int, decode_kernel: str,
                  fraction: float = PREFETCH_FRACTION) -> NextPrefetch | None:
    """The L2 prefetch plan of the down projection's prepared weights (w4a16_layout.W4A16Weights or None) for an up
    projection (gated) on the direct tile `config` with whole units: next_prefetch at num_rows routed rows, from the
    tile choose_w4a16_tile gives the down projection there on num_sms SMs with decode_kernel; else None."""
    if next_weights is None or not gated or not config.direct_warps or config.stream_k:
        return None
    check_prepared("next_weights", next_weights, gated=False)
    next_config = choose_w4a16_tile(num_rows, next_weights.num_experts, next_weights.n_out, next_weights.k_dim,
                                    num_sms, next_weights.group_size, False, decode_kernel)
    return next_prefetch(next_weights.n_out, next_weights.k_dim, next_weights.group_size, next_config, fraction)


def supports_direct(*, n_out: int, k_dim: int, num_experts: int, group_size: int,
                    config: TileConfig) -> tuple[bool, str]:
    """(ok, reason): whether the direct decode kernel (w4a16_direct.py) takes this projection and config."""
    if group_size not in (TILE_K, 2 * TILE_K):
        return False, (f"the direct kernel needs g = {TILE_K} or {2 * TILE_K} (one group per k-tile or two), "
                       f"got {group_size}")
    if not direct_splits(k_dim, group_size, config.direct_warps):
        return False, (f"{config.direct_warps} warps must split the {k_dim // TILE_K} k-tiles of K={k_dim} into whole "
                       f"groups of g = {group_size}")
    ring = direct_ring(config, num_experts)
    if config.stages and ring < config.stages:
        return False, f"{config.stages} ring slots per warp of {config} do not fit in shared memory"
    if ring < 2:
        return False, f"{config} leaves fewer than 2 ring slots per warp"
    return True, "ok"


def supports_config(
    *, gated: bool, n_out: int, k_dim: int, num_experts: int, group_size: int, config: TileConfig
) -> tuple[bool, str]:
    """(ok, reason): whether the kernel compiles for this projection shape and tile config."""
    if group_size not in GROUP_SIZES:
        return False, f"group_size must be one of {GROUP_SIZES}, got {group_size}"
    if config.cluster_t != 1:
        return False, f"the W4A16 kernels run without clusters (cluster_t must be 1, got {config.cluster_t})"
    if config.tile_w not in (64, 128) and not (config.tile_w == 256 and config.tile_t <= MAX_TILE_T_W256):
        return False, (f"tile_w must be 64 or 128 for W4A16, or 256 with tile_t <= {MAX_TILE_T_W256} (registers: "
                       f"RS fragments of two atoms per warpgroup), got {config.tile_w} x {config.tile_t}")
    if n_out % config.tile_w:
        return False, f"weight rows {n_out} must be a multiple of tile_w={config.tile_w}"
    if config.k_split > 1 and config.tile_w not in (ATOM_M, 2 * ATOM_M):
        return False, f"split K (k_split={config.k_split}) needs tile_w 64 or 128, got {config.tile_w}"
    if config.k_split == 4 and config.tile_t > MAX_TILE_T_SPLIT4:
        return False, f"k_split=4 supports tile_t <= {MAX_TILE_T_SPLIT4}, got {config.tile_t}"
    if (k_dim // TILE_K) % config.k_split:
        return False, f"k_split={config.k_split} must divide the {k_dim // TILE_K} k-tiles of K={k_dim}"
    if config.k_tiles_per_stage > 1 and (group_size != 2 * TILE_K or (k_dim // TILE_K) % (2 * config.k_split)):
        return False, (f"k_tiles_per_stage=2 needs g = {2 * TILE_K} (one group per stage) and 2 x k_split dividing "
                       f"the {k_dim // TILE_K} k-tiles, got g = {group_size}, k_split = {config.k_split}")
    if config.deferred_scale and (group_size < TILE_K or config.kblock_pipeline):
        return False, (f"deferred_scale needs g >= {TILE_K} (at most one group per k-tile) and no k-block pipeline, "
                       f"got g = {group_size}, kblock_pipeline = {config.kblock_pipeline}")
    if config.tma_tokens and config.k_tiles_per_stage != 1:
        return False, f"TMA token rows need one k-tile per stage, got k_tiles_per_stage={config.k_tiles_per_stage}"
    if gated and n_out % 16:
        return False, f"2I = {n_out} must be a multiple of 16 (gate/up interleave blocks of 8 rows)"
    if k_dim % TILE_K or k_dim % group_size:
        return False, f"reduction size {k_dim} must be a multiple of {TILE_K} and of g={group_size}"
    if not 1 <= num_experts <= 1024:
        return False, f"num_experts must be in [1, 1024], got {num_experts}"
    if num_experts * (k_dim // TILE_K) * (n_out // ATOM_M) * WG >= 2**31:
        return False, "packed weights exceed 2^31 16-byte chunks (32-bit indexing)"
    if config.direct_warps:
        return supports_direct(n_out=n_out, k_dim=k_dim, num_experts=num_experts, group_size=group_size,
                               config=config)
    stages = num_stages(config, gated, num_experts, group_size)
    if config.stages and stages < config.stages:
        return False, f"{config.stages} stages of {config} do not fit in shared memory"
    if config.cp_async_lag > stages - config.k_split - 1:
        # a consumer warpgroup hands a stage back after waiting for its next one (k_split stages on): a
        # producer blocked on that stage must already have signalled it
        return False, f"cp_async_lag={config.cp_async_lag} must be at most the pipeline's stages - k_split - 1"
    if stages < max(4, 2 * config.k_split):
        return False, f"tile config {config} leaves fewer than {max(4, 2 * config.k_split)} pipeline stages"
    return True, "ok"


def supports(num_experts: int, hidden: int, inter: int, group_size: int) -> tuple[bool, str]:
    """Whether w4a16_expert_up / _down take this layer (checked once, at weight-preparation time): the tiles
    choose_w4a16_tile picks for it, from decode (one row) to prefill, all compile."""
    if group_size not in GROUP_SIZES:
        return False, f"group_size must be one of {GROUP_SIZES}, got {group_size}"
    if hidden % TILE_K or inter % TILE_K:
        return False, f"H={hidden} and I={inter} must be multiples of {TILE_K}"
    if hidden % group_size or inter % group_size:
        return False, (f"H={hidden} and I={inter} must be multiples of the group size {group_size} "
                       f"(quantize with a group size that divides both)")
    # routed-row counts that reach every row of the tile table, with few and with all experts active (the
    # decode rows' wave-fill rule looks at the active experts)
    limits = [int(row.max_rows_per_expert) for row in W4A16_TILE_TABLE[:-1]]
    probes = sorted({1, 2, 4, 8, 16, *(lim * num_experts for lim in limits), 4 * limits[-1] * num_experts})
    for gated, n_out, k_dim in ((True, 2 * inter, hidden), (False, hidden, inter)):
        for num_rows in probes:
            config = choose_w4a16_tile(num_rows, num_experts, n_out, k_dim, group_size=group_size, gated=gated)
            ok, reason = supports_config(
                gated=gated, n_out=n_out, k_dim=k_dim, num_experts=num_experts, group_size=group_size, config=config
            )
            if not ok:
                return False, reason
    return True, "ok"
