"""A dense W4A16 linear layer on the W4A16 grouped GEMM (w4a16_gemm.py) run with one expert.

Shape legend: T tokens (rows of x), N out features, K in features, g group size.

    w4a16_linear(x [T, K] bf16, w prepared [1, N, K], bias [N] | None) -> y [T, N] bf16

The grouped GEMM's down projection (no gather, no epilogue activation) with E = 1 and expert_offsets
[0, T] is exactly y = x W^T: every row belongs to expert 0. Used for the attention projections
(layers/linear.py QuantizedLinear, through MoEOps.linear).

expert_offsets [0, T] lives on the device without a host-to-device copy and is CUDA-graph safe: one
int32 table per device whose row T is (0, T), written by device ops before any capture and only ever
grown (older tables stay alive, since captured graphs hold their addresses). Row T is a contiguous
8-byte view, so a captured graph reads the same constant (0, T) on every replay; T is fixed for a
captured graph. A T past the table during a capture gets its own small tensor, written inside the
capture (so on every replay too).

The tile comes from LINEAR_TILES (data, not branches): the MoE table (tile_config.W4A16_TILE_TABLE)
assumes up to E experts' tiles fill the SMs, while a single expert has only N / tile_w weight tiles
per token tile, so a dense linear keeps 64-row tiles (split K inside the CTA) further up in T.
"""
from __future__ import annotations

import functools

import torch

from light_moe.kernels.launch import sm_count
from light_moe.kernels.tile_config import TileConfig, choose_w4a16_tile
from light_moe.kernels.w4a16_gemm import W4A16GroupedGemmSm90, w4a16_expert_down
from light_moe.kernels.w4a16_layout import ATOM_M, W4A16Weights, prepare_w4a16_weights

# (max T, tile_w, tile_t, k_split): the first row whose T bound fits and whose config the kernel takes for
# (N, K, g) wins; past the last row the MoE table's choice for one expert. Timed at the Mixtral qkv / o shapes
# against other tiles and cuBLAS bf16 (BENCHMARKS.md "W4A16 attention projections", python -m
# light_moe.bench.w4a16_linear): the 64-row split-K rows win at T = 1, 16, 64; past T = 128 the MoE table's
# 256-row tiles leave most SMs idle for one expert and lose to bf16 (smaller tiles there are untimed).
LINEAR_TILES: tuple[tuple[int, int, int, int], ...] = (
    (8, 64, 8, 4),
    (16, 64, 16, 4),
    (32, 64, 32, 4),
    (64, 64, 64, 2),
    (128, 64, 128, 2),
)
FALLBACK_TILE = TileConfig(ATOM_M, 8)  # taken by every (N, K, g) that supports() accepts


def supports(n_out: int, k_dim: int, group_size: int, scale_dtype: torch.dtype) -> tuple[bool, str]:
    """Whether w4a16_linear takes a [N, K] weight of group size g with scales of scale_dtype, at every T:
    choose_linear_tile falls back to FALLBACK_TILE, which every shape accepted here takes."""
    if scale_dtype != torch.bfloat16:
        return False, f"the W4A16 kernel takes bf16 scales (bf16 activations), got {scale_dtype}"
    return W4A16GroupedGemmSm90.supports(gated=False, n_out=n_out, k_dim=k_dim, num_experts=1,
                                         group_size=group_size, config=FALLBACK_TILE)


@functools.lru_cache(maxsize=4096)  # a pure function of sizes, asked on every eager call
def choose_linear_tile(num_tokens: int, n_out: int, k_dim: int, group_size: int, num_sms: int = 132) -> TileConfig:
    """Tile for T rows from host-known sizes only (graph-safe). Split K falls back to 2, then 1, where the
    kernel refuses it (k-tiles not divisible, k_split = 4 past its tile_t limit); FALLBACK_TILE last."""
    for max_tokens, tile_w, tile_t, k_split in LINEAR_TILES:
        if num_tokens <= max_tokens:
            candidates = [TileConfig(tile_w, tile_t, k_split=s) for s in (4, 2, 1) if s <= k_split]
            break
    else:
        candidates = [choose_w4a16_tile(num_tokens, 1, n_out, k_dim, num_sms, group_size, gated=False)]
    for config in candidates:
        if W4A16GroupedGemmSm90.supports(gated=False, n_out=n_out, k_dim=k_dim, num_experts=1,
                                         group_size=group_size, config=config)[0]:
            return config
    return FALLBACK_TILE


def prepare_linear(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   group_size: int) -> W4A16Weights:
    """Canonical one-expert W4A16 (qweight int32 [1, N, K // 8], scales [1, N, K // g], zeros or None) ->
    the kernel layout (ungated: no gate/up interleave)."""
    if qweight.dim() != 3 or qweight.shape[0] != 1:
        raise ValueError(f"a linear weight is a one-expert stack [1, N, K // 8], got {list(qweight.shape)}")
    return prepare_w4a16_weights(qweight, scales, zeros, group_size, gated=False)


_offset_tables: dict[torch.device, torch.Tensor] = {}  # device -> int32 [R, 2], row t = (0, t); the newest
_old_offset_tables: list[torch.Tensor] = []  # replaced tables, kept alive: captured graphs read them
_MIN_TABLE_ROWS = 256


def one_expert_offsets(num_tokens: int, device: torch.device) -> torch.Tensor:
    """int32 [2] = (0, T) on `device`: a view of the device's table (module docstring)."""
    table = _offset_tables.get(device)
    if table is None or table.shape[0] <= num_tokens:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():  # written by the graph, every replay
            return torch.arange(0, 2 * num_tokens, num_tokens, dtype=torch.int32, device=device)
        rows = max(_MIN_TABLE_ROWS, 2 * num_tokens, 0 if table is None else 2 * table.shape[0])
        new = torch.zeros(rows, 2, dtype=torch.int32, device=device)
        new[:, 1] = torch.arange(rows, dtype=torch.int32, device=device)
        if table is not None:
            _old_offset_tables.append(table)
        table = _offset_tables[device] = new
    return table[num_tokens]


def w4a16_linear(x: torch.Tensor, weight: W4A16Weights, bias: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, config: TileConfig | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] W^T (+ bias) with the one-expert W4A16 GEMM; no host sync, graph-capturable.
    config: the tile (None: choose_linear_tile)."""
    if weight.num_experts != 1 or weight.gated:
        raise ValueError(f"w4a16_linear takes a one-expert ungated weight, got E={weight.num_experts}, "
                         f"gated={weight.gated}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous() or x2.data_ptr() % 16:  # the kernel reads 16-byte aligned rows
        x2 = x2.clone(memory_format=torch.contiguous_format)
    num_tokens = x2.shape[0]
    if out is None:
        out = x2.new_empty(num_tokens, weight.n_out)
    if num_tokens == 0:
        return out.view(*lead, weight.n_out)
    if config is None:
        config = choose_linear_tile(num_tokens, weight.n_out, weight.k_dim, weight.group_size, sm_count(x.device))
    y = w4a16_expert_down(x2, one_expert_offsets(num_tokens, x2.device), weight, out=out, config=config)
    if bias is not None:
        y.add_(bias)
    return y.view(*lead, weight.n_out)
