"""RMSNorm, computed in float32 like the reference implementations, then cast back (ops/reference.py
rms_norm). With a residual it is the fused "add + norm" of a pre-norm decoder: the backend adds the
sublayer output to the residual stream and normalises the sum in one pass."""
from __future__ import annotations

import torch
from torch import nn

from light_moe.ops import reference
from light_moe.ops.backend import PendingCombine


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None, device=None, ops=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.ops = ops  # an ops backend (ops/backend.py MoEOps) or None for the reference

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with residual: (norm(x + residual), x + residual). x may be a MoE layer's PendingCombine
        (ops.fuse_combine_norm): its combine then runs inside this norm's residual add."""
        if isinstance(x, PendingCombine):
            if residual is None or self.ops is None:
                raise ValueError("a PendingCombine needs the residual stream and an ops backend")
            return self.ops.combine_rms_norm(x, residual, self.weight, self.eps)
        if self.ops is None:
            return reference.rms_norm(x, self.weight, self.eps, residual)
        return self.ops.rms_norm(x, self.weight, self.eps, residual)
