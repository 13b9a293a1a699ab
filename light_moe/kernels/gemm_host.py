"""Host side shared by the two grouped GEMMs (grouped_gemm.py: bf16 weights, w4a16_gemm.py: int4 weights):
their common constants, argument checks, output allocation and the launch through a compile cache.

Shape legend: T tokens, E experts, H hidden, I intermediate, M routed rows sorted by expert (rows of expert e
are expert_offsets[e]:expert_offsets[e + 1], on the device), N weight rows (2I up, H down).

Both kernels take the same runtime arguments after their weight views: tokens (x [T, H] or act [M, I]),
gather_index [M], expert_offsets [E + 1], out [M, N'] (N' = I up, H down), the CTA count and the stream. Only
M varies between calls (a dynamic leading dimension), so one compiled function serves every token count.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from cutlass.cute.runtime import from_dlpack

from light_moe.kernels.compile_cache import CompileCache
from light_moe.kernels.launch import current_stream, sm_count
from light_moe.kernels.tile_config import TileConfig

TILE_K = 64  # bf16 elements per k-tile: one 128-byte swizzle row
WG = 128  # threads per warpgroup
VEC = 8  # bf16 per 16-byte access
SMEM_CAPACITY = 232448  # bytes of shared memory per CTA on sm_90
EPI_BYTES = 64 * 136 * 2  # epilogue staging tile (64 tokens x 128 columns): a 4th stage at 128x256 and 256x128


def epilogue_tokens(config: TileConfig, gated: bool) -> int:
    """Tokens per epilogue chunk: the staging tile [chunk, columns + 8] stays within EPI_BYTES."""
    out_cols = config.tile_w // 2 if gated else config.tile_w
    chunk = config.tile_t
    while chunk > 8 and chunk * (out_cols + VEC) * 2 > EPI_BYTES:
        chunk //= 2
    return chunk


def rows_view(t: torch.Tensor, align: int = 16):
    """Leading dim dynamic, the rest static: one compile serves every token count."""
    return from_dlpack(t, assumed_align=align).mark_compact_shape_dynamic(mode=0)


def check_tensor(name: str, t: torch.Tensor, dtype: torch.dtype, dim: int) -> None:
    if t.dtype != dtype or t.dim() != dim or not t.is_contiguous() or not t.is_cuda:
        raise ValueError(f"expected {name} as a contiguous {dim}-D CUDA {dtype} tensor, got {t.dtype} {tuple(t.shape)}")
    if t.data_ptr() % 16:
        raise ValueError(f"{name} must be 16-byte aligned (the kernel assumes it)")


def check_out(out: torch.Tensor, num_rows: int, cols: int) -> None:
    """A caller's out buffer: the kernel stores bf16 rows [num_rows, cols] through 16-byte vectors."""
    check_tensor("out", out, torch.bfloat16, 2)
    if tuple(out.shape) != (num_rows, cols):
        raise ValueError(f"expected out of shape {(num_rows, cols)}, got {tuple(out.shape)}")


def up_out(x: torch.Tensor, gather_index: torch.Tensor, expert_offsets: torch.Tensor, num_experts: int,
           hidden: int, cols: int, out: torch.Tensor | None, weights: str = "w13") -> torch.Tensor:
    """Checks the up projection's inputs (x [T, H] bf16, int32 gather_index [M] and expert_offsets [E + 1])
    and returns its output buffer act [M, cols] (allocated when out is None)."""
    check_tensor("x", x, torch.bfloat16, 2)
    if x.shape[1] != hidden:
        raise ValueError(f"x has hidden size {x.shape[1]}, {weights} expects {hidden}")
    if gather_index.dtype != torch.int32 or expert_offsets.dtype != torch.int32:
        raise ValueError("gather_index and expert_offsets must be int32")
    if expert_offsets.numel() != num_experts + 1:
        raise ValueError(f"expected expert_offsets [{num_experts + 1}], got {tuple(expert_offsets.shape)}")
    num_rows = gather_index.shape[0]
    if out is None:
        out = x.new_empty(num_rows, cols)
    check_out(out, num_rows, cols)
    return out


def down_out(act: torch.Tensor, expert_offsets: torch.Tensor, num_experts: int, inter: int, cols: int,
             out: torch.Tensor | None, weights: str = "w2") -> torch.Tensor:
    """Checks the down projection's inputs (act [M, I] bf16, int32 expert_offsets [E + 1]) and returns its
    output buffer y [M, cols] (allocated when out is None)."""
    check_tensor("act", act, torch.bfloat16, 2)
    if act.shape[1] != inter:
        raise ValueError(f"act has intermediate size {act.shape[1]}, {weights} expects {inter}")
    if expert_offsets.dtype != torch.int32 or expert_offsets.numel() != num_experts + 1:
        raise ValueError(f"expected int32 expert_offsets [{num_experts + 1}], got {expert_offsets.dtype}")
    if out is None:
        out = act.new_empty(act.shape[0], cols)
    check_out(out, act.shape[0], cols)
    return out


def cached_views(cache: dict, key: Hashable, make: Callable[[], object]):
    """The cute views of a weight tensor, built once per (pointer, shape) key: from_dlpack costs microseconds
    per call, and a decode step launches the GEMMs of every layer."""
    views = cache.get(key)
    if views is None:
        views = cache[key] = make()
    return views


def launch(cache: CompileCache, key: Hashable, make_kernel: Callable[[], object], weight_views: tuple,
           tokens: torch.Tensor, gather_index: torch.Tensor, expert_offsets: torch.Tensor,
           out: torch.Tensor, bias_view=None, extra_args: tuple = (), cluster: int = 1) -> torch.Tensor:
    """Runs the kernel compiled for `key` (make_kernel() builds it on a miss) on the current stream, one CTA per
    SM (persistent); the down projection passes expert_offsets as the gather_index it does not read. bias_view:
    the epilogue's bias (expert_epilogue.bias_view), the kernel's last argument; without it the default kernels
    get exactly the arguments they always had. extra_args: appended last (the direct W4A16 kernel's workspace).
    cluster: CTAs per cluster; the grid is the largest multiple of it within the SM count."""
    args = (
        *weight_views,
        rows_view(tokens),
        rows_view(gather_index, 4),
        from_dlpack(expert_offsets, assumed_align=4),
        rows_view(out),
        sm_count(out.device) // cluster * cluster,
        current_stream(),
    )
    if bias_view is not None:
        args = (*args, bias_view)
    args = (*args, *extra_args)
    cache.get(key, lambda: (make_kernel(), args))(*args)
    return out
