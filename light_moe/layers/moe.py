"""The MoE block: router -> dispatch -> grouped expert FFN (SwiGLU) -> combine, plus the optional
shared expert of Qwen2-MoE (scaled by sigmoid(x @ shared_expert_gate)) or DeepSeek (ungated; n_shared_experts
of them are one SwiGLU of n_shared_experts x the expert width). The router's variant (DeepSeek's grouped /
sigmoid routing, gpt-oss's gate bias) is the model config's RouterConfig, the experts' variant (gpt-oss's biases
and clamped SwiGLU) its ExpertConfig, both passed to the ops.

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
from light_moe.ops.backend import MoEOps, PendingCombine
from light_moe.parallel.dispatch import LocalDispatcher
from light_moe.quant.scheme import W4A16Config
from light_moe.quant.w4a16 import PACK, QuantizedWeight


class FusedExperts(nn.Module):
    """All experts' weights stacked: w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **kw), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **kw), requires_grad=False)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w13.data, self.w2.data

    def release(self) -> None:
        """Free the canonical copy once a backend holds its own layout (see MoEBlock.prepare)."""
        self.w13.data = self.w13.data.new_empty(0)
        self.w2.data = self.w2.data.new_empty(0)


class ExpertBiases(nn.Module):
    """Per-expert biases of the two expert GEMMs (gpt-oss): b13 [E, 2I] in w13's row order (gate, then up), b2
    [E, H]. Every rank holds all E experts' biases (they are small), so expert parallelism and rebalancing
    move only w13 / w2; MoEBlock.prepare picks the rows of the experts the block holds."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.b13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, **kw), requires_grad=False)
        self.b2 = nn.Parameter(torch.empty(num_experts, hidden_size, **kw), requires_grad=False)

    def of(self, expert_ids: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(b13, b2) rows of `expert_ids` (global ids, in the order a block holds their weights)."""
        if expert_ids == tuple(range(self.b13.shape[0])):
            return self.b13.data, self.b2.data
        index = torch.tensor(expert_ids, dtype=torch.long, device=self.b13.device)
        return self.b13.data.index_select(0, index), self.b2.data.index_select(0, index)


class QuantizedFusedExperts(nn.Module):
    """W4A16 experts in the canonical format (light_moe/quant/w4a16.py), held as buffers:
    w13_qweight int32 [E, 2I, H / 8], w13_scales [E, 2I, H / g], w13_zeros uint8 [E, 2I, H / g]
    (asymmetric only), w13_perm int32 [E, H] (act-order checkpoints only); w2_* likewise for the
    logical [E, H, I]. Only routed experts are quantized; the shared expert stays in the model dtype."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, scheme: W4A16Config,
                 dtype=None, device=None, act_order: bool = False):
        super().__init__()
        self.scheme = scheme
        g = scheme.group_size
        for name, n, k in (("w13", 2 * intermediate_size, hidden_size), ("w2", hidden_size, intermediate_size)):
            if k % g:
                raise ValueError(f"experts.{name}: in_features {k} is not a multiple of group_size {g}")
            self.register_buffer(f"{name}_qweight", torch.empty(num_experts, n, k // PACK, dtype=torch.int32,
                                                                device=device))
            self.register_buffer(f"{name}_scales", torch.empty(num_experts, n, k // g, dtype=dtype, device=device))
            zeros = None if scheme.symmetric else torch.empty(num_experts, n, k // g, dtype=torch.uint8, device=device)
            self.register_buffer(f"{name}_zeros", zeros)
            perm = torch.empty(num_experts, k, dtype=torch.int32, device=device) if act_order else None
            self.register_buffer(f"{name}_perm", perm)

    def weight(self, name: str) -> QuantizedWeight:
        return QuantizedWeight(getattr(self, f"{name}_qweight"), getattr(self, f"{name}_scales"),
                               getattr(self, f"{name}_zeros"), self.scheme.group_size, getattr(self, f"{name}_perm"))

    def weights(self) -> tuple[QuantizedWeight, QuantizedWeight]:
        return self.weight("w13"), self.weight("w2")

    def release(self) -> None:
        """Free the canonical copy once a backend holds its own layout (see MoEBlock.prepare)."""
        for name, buffer in list(self.named_buffers()):
            if buffer is not None:
                setattr(self, name, buffer.new_empty(0))

    def load(self, name: str, weight: QuantizedWeight) -> None:
        """Copy a loaded QuantizedWeight into the buffers of `name` (w13 or w2)."""
        for field in ("qweight", "scales", "zeros", "perm"):
            buffer, value = getattr(self, f"{name}_{field}"), getattr(weight, field)
            if (buffer is None) != (value is None):
                built = "with" if buffer is not None else "without"
                raise ValueError(f"experts.{name}_{field}: the layer was built {built} it but the loaded weight "
                                 f"has {'none' if value is None else 'one'}")
            if buffer is not None:
                if tuple(buffer.shape) != tuple(value.shape):
                    raise ValueError(f"expected experts.{name}_{field} of shape {list(buffer.shape)}, "
                                     f"found {list(value.shape)}")
                buffer.copy_(value)


class MoEBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: MoEOps, dtype=None, device=None):
        super().__init__()
        self.top_k = cfg.top_k
        self.num_experts = cfg.num_experts
        self.renormalize = cfg.norm_topk_prob
        self.ops = ops
        self.router_spec = cfg.router  # config.RouterConfig of the DeepSeek / gpt-oss variants, or None
        gate_bias = cfg.router is not None and cfg.router.gate_bias
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=gate_bias, dtype=dtype, device=device)
        if cfg.router is not None and cfg.router.correction_bias:
            # kept in float32 whatever the model dtype, as DeepSeek-V3 holds it: the choice compares
            # sigmoid scores plus this bias, which bf16 would round
            self.gate.e_score_correction_bias = nn.Parameter(
                torch.zeros(cfg.num_experts, dtype=torch.float32, device=device), requires_grad=False)
        self.experts = FusedExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, dtype, device)
        self.expert_spec = cfg.experts  # config.ExpertConfig of gpt-oss's experts, or None
        self.expert_biases = None
        if cfg.experts is not None and cfg.experts.bias:
            self.expert_biases = ExpertBiases(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, dtype,
                                              device)
        self.local_biases: tuple[torch.Tensor, torch.Tensor] | None = None  # prepare(): the held experts' rows
        self.shared_expert = None
        self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size > 0:
            self.shared_expert = SwiGLUMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, ops, dtype, device)
            if cfg.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False, dtype=dtype, device=device)
        self.prepared: tuple[torch.Tensor, torch.Tensor] | None = None
        self.canonical_released = False  # prepare() freed self.experts: only self.prepared holds the weights
        self.last_tokens_per_expert: torch.Tensor | None = None  # [E] int32, device: load statistics
        self.dispatcher = LocalDispatcher()
        self.overlap = None  # parallel.overlap.TwoBatchOverlap under expert parallelism with overlap on
        self.local_expert_ids: tuple[int, ...] = tuple(range(cfg.num_experts))  # rows of w13 / w2

    def use_quantized_experts(self, scheme: W4A16Config, act_order: bool = False) -> None:
        """Hold the routed experts as W4A16 (called on the meta device, before weights are allocated)."""
        if not isinstance(self.dispatcher, LocalDispatcher):
            raise ValueError("W4A16 experts under expert parallelism are not supported yet")
        w13 = self.experts.w13
        self.experts = QuantizedFusedExperts(w13.shape[0], w13.shape[2], w13.shape[1] // 2, scheme, w13.dtype,
                                             w13.device, act_order)

    def use_dispatcher(self, dispatcher) -> None:
        """Expert parallelism: hold only `dispatcher.local_experts` (global ids, ascending).

        Called on the meta device before weights are allocated, so each rank only ever allocates
        and loads its own experts."""
        if isinstance(self.experts, QuantizedFusedExperts):
            raise ValueError("W4A16 experts under expert parallelism are not supported yet")
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
        """Let the backend repack expert weights once, after loading (no-op for the reference).

        When the backend made its own copy (the CuTe layouts), one process drops the canonical one,
        which would otherwise double the expert memory. Under expert parallelism it is kept:
        rebalancing moves canonical weights between ranks and prepares them again."""
        weights = self.experts.weights()
        spec = {} if self.expert_spec is None else dict(spec=self.expert_spec)
        self.prepared = self.ops.prepare_expert_weights(*weights, **spec)
        if self.expert_biases is not None:
            self.local_biases = self.expert_biases.of(self.local_expert_ids)
        self.canonical_released = isinstance(self.dispatcher, LocalDispatcher) and self.prepared[0] is not weights[0]
        if self.canonical_released:
            self.experts.release()

    @property
    def graph_safe(self) -> bool:
        """Whether this layer may be captured in a CUDA graph (no host sync on its path)."""
        w13, w2 = self.prepared if self.prepared is not None else self.experts.weights()
        variants = {} if self.router_spec is None else dict(spec=self.router_spec)
        if self.expert_spec is not None:
            variants["expert_spec"] = self.expert_spec
        return self.ops.graph_safe(self.gate.weight, self.top_k, w13, w2, **variants)

    def forward(self, x: torch.Tensor, defer_combine: bool = False) -> torch.Tensor | PendingCombine:  # x [T, H]
        """The layer's output [T, H]; with defer_combine (the decoder layer, whose next norm takes it) and the
        ops' fuse_combine_norm, a PendingCombine where the combine can wait for that norm."""
        w13, w2 = self.prepared if self.prepared is not None else self.experts.weights()
        if self.last_tokens_per_expert is None:  # the first forward is eager (profiling or a graph's warm-up)
            self.last_tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        # the router writes the counts into the block's one buffer: a CUDA graph captured here updates it in place,
        # so the statistics read after a replay are that replay's
        topk_weights, topk_ids, _, metadata = self.ops.route(
            x, self.gate.weight, self.top_k, self.renormalize, self.last_tokens_per_expert,
            **self._router_variant())  # [T, K] fp32, int32
        variant = self._expert_variant()
        if self.overlap is not None:  # two micro-batches; the shared expert runs during the exchange
            out, shared = self.overlap.forward(
                x, topk_weights, topk_ids, lambda r: self.ops.experts(r.x, r.topk_weights, r.topk_ids, w13, w2,
                                                                   padded=r.padded, **variant),
                self._shared if self.shared_expert is not None else None)
            return out if shared is None else out + shared
        routed = self.dispatcher.dispatch(x, topk_weights, topk_ids)  # rows for the local experts
        # the router's metadata (if any) describes these rows only when dispatch kept them as they were
        kept = routed.topk_ids is topk_ids and not routed.padded
        # one process: the combine can wait for the next norm, which fuses it into its residual add
        defer = defer_combine and self.ops.fuse_combine_norm and kept and isinstance(self.dispatcher, LocalDispatcher)
        y = self.ops.experts(routed.x, routed.topk_weights, routed.topk_ids, w13, w2, padded=routed.padded,
                             metadata=metadata if kept else None, defer_combine=defer, **variant)
        if isinstance(y, PendingCombine):
            return y if self.shared_expert is None else y._replace(extra=self._shared(x))
        out = self.dispatcher.combine(y, routed)  # [T, H]
        if self.shared_expert is not None:
            out = out + self._shared(x)
        return out

    def _router_variant(self) -> dict:
        """The ops' routing-variant arguments (none for the default softmax top-k)."""
        if self.router_spec is None:
            return {}
        return dict(spec=self.router_spec, correction_bias=getattr(self.gate, "e_score_correction_bias", None),
                    gate_bias=self.gate.bias)

    def _expert_variant(self) -> dict:
        """The ops' expert-variant arguments (none for SiLU * up experts without biases)."""
        if self.expert_spec is None and self.expert_biases is None:
            return {}
        biases = self.local_biases
        if biases is None and self.expert_biases is not None:  # not prepared yet
            biases = self.expert_biases.of(self.local_expert_ids)
        return dict(spec=self.expert_spec, biases=biases)

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared_expert(x)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return shared
