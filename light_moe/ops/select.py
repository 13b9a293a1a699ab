"""Backend selection: `select_backend(requested, device)` -> (MoEOps, reason), by capability.

Its own module, above both backends, so the base class (backend.py) never imports the CuTe backend that
subclasses it (cute_backend.py)."""
from __future__ import annotations

import torch

from light_moe.ops.backend import BACKEND_NAMES, MoEOps, ReferenceOps


def cute_unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"device is {device.type}, the CuTe kernels need a CUDA sm_90 GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return f"GPU is sm_{major}{minor}, the CuTe kernels are built for sm_90a"
    try:
        import cutlass  # noqa: F401
    except ImportError as exc:
        return f"nvidia-cutlass-dsl is not importable ({exc}); install the [cuda] extra"
    try:
        from light_moe.ops import cute_backend  # noqa: F401
    except ImportError as exc:
        return f"light_moe.ops.cute_backend failed to import ({exc})"
    return None


def select_backend(requested: str, device: torch.device, skinny_gemm: bool = True,
                   skinny_max_rows: int = 16, fuse_combine_norm: bool = False, *,
                   fuse_attention_merge: bool = False, w4a16_decode_kernel: str = "direct",
                   w4a16_prefetch_down: bool = False, w4a16_fused_decode: bool = False) -> tuple[MoEOps, str]:
    """Pick the backend: 'cute' on sm_90 when importable, else 'reference'. Returns (ops, reason).
    skinny_gemm: the CuTe backend's dense_linear runs steps of up to skinny_max_rows rows on its skinny GEMM
    (EngineConfig.skinny_gemm, skinny_gemm_max_rows). fuse_combine_norm: MoE layers hand the next norm their
    uncombined rows, the combine fused into it (EngineConfig.fuse_combine_norm; any backend). fuse_attention_merge:
    the CuTe decode attention merges its splits in the attention kernel (EngineConfig.fuse_attention_merge).
    w4a16_decode_kernel: the CuTe W4A16 experts' decode kernel (EngineConfig.w4a16_decode_kernel);
    w4a16_prefetch_down: its up kernel's L2 prefetch of the down weights (EngineConfig.w4a16_prefetch_down);
    w4a16_fused_decode: up and down in one launch at decode (EngineConfig.w4a16_fused_decode)."""
    if requested not in BACKEND_NAMES:
        raise ValueError(f"moe_backend must be one of {BACKEND_NAMES}, got {requested!r}")
    if requested == "reference":
        return ReferenceOps(fuse_combine_norm), "reference backend requested"
    reason = cute_unavailable_reason(torch.device(device))
    if reason is None:
        from light_moe.ops.cute_backend import CuteOps

        reason = "CuTe DSL kernels on sm_90a" + (
            f", skinny GEMM for projections of <= {skinny_max_rows} rows" if skinny_gemm else "")
        return CuteOps(skinny_gemm=skinny_gemm, skinny_max_rows=skinny_max_rows,
                       fuse_combine_norm=fuse_combine_norm, fuse_attention_merge=fuse_attention_merge,
                       w4a16_decode_kernel=w4a16_decode_kernel, w4a16_prefetch_down=w4a16_prefetch_down,
                       w4a16_fused_decode=w4a16_fused_decode), reason
    if requested == "cute":
        raise RuntimeError(f"moe_backend='cute' requested but unavailable: {reason}")
    return ReferenceOps(fuse_combine_norm), f"reference backend ({reason})"
