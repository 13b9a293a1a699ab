"""The MoE block: router -> dispatch -> grouped expert FFN (SwiGLU) -> combine, plus the optional
shared expert of Qwen2-MoE (scaled by sigmoid(x @ shared_expert_gate)).

Shape legend: T tokens, E experts, K top-k, H hidden, I expert intermediate.
The expert math is delegated to an MoEOps backend (light_moe/ops), chosen once by the engine and
passed in explicitly, so the CuTe kernels, W4A16 and expert parallelism plug in here without the
model code knowing.
"""
from __future__ import annotations

import torch
from torch import nn

from light_moe.config import ModelConfig
from light_moe.layers.mlp import SwiGLUMLP
from light_moe.ops.backend import MoEOps
from light_moe.parallel.dispatch import LocalDispatcher


class FusedExperts(nn.Module):
    """All experts' weights stacked: w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **kw), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **kw), requires_grad=False)


class MoEBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: MoEOps, dtype=None, device=None):
        super().__init__()
        self.top_k = cfg.top_k
        self.num_experts = cfg.num_experts
        self.renormalize = cfg.norm_topk_prob
        self.ops = ops
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False, dtype=dtype, device=device)
        self.experts = FusedExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, dtype, device)
        self.shared_expert = None
        self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size > 0:
            self.shared_expert = SwiGLUMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, dtype, device)
            if cfg.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False, dtype=dtype, device=device)
        self.prepared: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_tokens_per_expert: torch.Tensor | None = None  # [E] int32, device: load statistics
        self.dispatcher = LocalDispatcher()
        self.overlap = None  # parallel.overlap.TwoBatchOverlap under expert parallelism with overlap on
        self.local_expert_ids: tuple[int, ...] = tuple(range(cfg.num_experts))  # rows of w13 / w2

    def use_dispatcher(self, dispatcher) -> None:
        """Expert parallelism: hold only `dispatcher.local_experts` (global ids, ascending).

        Called on the meta device before weights are allocated, so each rank only ever allocates
        and loads its own experts."""
        w13 = self.experts.w13
        self.dispatcher = dispatcher
        self.local_expert_ids = tuple(dispatcher.local_experts)
        self.experts = FusedExperts(len(self.local_expert_ids), w13.shape[2], w13.shape[1] // 2, w13.dtype,
                                    w13.device)

    def set_local_experts(self, expert_ids: tuple[int, ...], w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Rebalancing: hold `expert_ids` (global, ascending) with these stacked weights from now on."""
        self.local_expert_ids = tuple(expert_ids)
        experts = FusedExperts(len(expert_ids), w13.shape[2], w13.shape[1] // 2, w13.dtype, torch.device("meta"))
        experts.w13 = nn.Parameter(w13, requires_grad=False)
        experts.w2 = nn.Parameter(w2, requires_grad=False)
        self.experts = experts
        self.prepare()

    def prepare(self) -> None:
        """Let the backend repack expert weights once, after loading (no-op for the reference)."""
        self.prepared = self.ops.prepare_expert_weights(self.experts.w13.data, self.experts.w2.data)

    @property
    def graph_safe(self) -> bool:
        """Whether this layer may be captured in a CUDA graph (no host sync on its path)."""
        w13, w2 = self.prepared if self.prepared is not None else (self.experts.w13, self.experts.w2)
        return self.ops.graph_safe(self.gate.weight, self.top_k, w13, w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, H]
        w13, w2 = self.prepared if self.prepared is not None else (self.experts.w13, self.experts.w2)
        topk_weights, topk_ids, tokens_per_expert = self.ops.router(
            x, self.gate.weight, self.top_k, self.renormalize)  # [T, K] fp32, [T, K] int32, [E]
        self.last_tokens_per_expert = tokens_per_expert
        if self.overlap is not None:  # two micro-batches; the shared expert runs during the exchange
            out, shared = self.overlap.forward(
                x, topk_weights, topk_ids, lambda r: self.ops.experts(r.x, r.topk_weights, r.topk_ids, w13, w2),
                self._shared if self.shared_expert is not None else None)
            return out if shared is None else out + shared
        routed = self.dispatcher.dispatch(x, topk_weights, topk_ids)  # rows for the local experts
        y = self.ops.experts(routed.x, routed.topk_weights, routed.topk_ids, w13, w2)
        out = self.dispatcher.combine(y, routed)  # [T, H]
        if self.shared_expert is not None:
            out = out + self._shared(x)
        return out

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared_expert(x)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return shared
