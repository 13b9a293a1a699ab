"""Dense SwiGLU MLP: dense layers of Qwen2-MoE and DeepSeek, and the shared expert. Names follow the checkpoints.
The three projections are DenseLinear: their matmuls run on the ops backend (decode rows on the CuTe skinny GEMM)."""
import torch
import torch.nn.functional as F
from torch import nn

from light_moe.layers.linear import DenseLinear


class SwiGLUMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, ops, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.gate_proj = DenseLinear(hidden_size, intermediate_size, False, ops, **kw)
        self.up_proj = DenseLinear(hidden_size, intermediate_size, False, ops, **kw)
        self.down_proj = DenseLinear(intermediate_size, hidden_size, False, ops, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
