"""`light-moe bench moe-layer`: one MoE layer (router + metadata + up + down + combine) at several T.

Shape legend: T tokens, E experts, K top-k, H hidden, I intermediate, M = T * K routed rows.

Rows per T, all measured in the same run on the same card and inputs (CUDA events, median):
  * ours_layer      the whole layer through `ops` (default: `CuteOps`, i.e. the CuTe router, routing
                    metadata and combine around our grouped GEMM), eager; ours_layer_graph: the same
                    replayed from a CUDA graph (when the ops are graph-safe: what decode runs);
  * ours_experts    only our up + down kernels, replayed from a CUDA graph (what the engine runs);
                    ours_up / ours_down: each projection alone, also graph-replayed;
  * grouped_mm_layer / grouped_mm_experts   the same with torch._grouped_mm for the two GEMMs
                    (gather by index_select, SiLU*up in PyTorch);
  * loop_layer      the per-expert loop of ops/reference.py (transformers-style).
Weight GB/s = bytes of the experts that received a token / time; TFLOP/s = 2 M (3 H I) / time.
Results go to benchmarks/results/moe_layer-<gpu>-<date>.json with GPU name, versions and commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from light_moe.bench.env import environment
from light_moe.bench.timing import graph_replay, round_robin, time_us
from light_moe.ops import reference
from light_moe.ops.backend import MoEOps

TARGETS_US = {1: 260, 4: 975, 16: 975, 64: 975, 256: 1000, 4096: 4000, 16384: 16000}  # DESIGN.md sec. 5
W4A16_TARGETS_US = {1: 90, 64: 320}  # issue 4; and never slower than the bf16 layer


class GroupedGemmOps(MoEOps):
    """Reference router / metadata / combine with this project's CuTe grouped GEMM for the experts."""

    name = "cute-grouped-gemm"

    def prepare_expert_weights(self, w13, w2):
        from light_moe.kernels import grouped_gemm

        return grouped_gemm.prepare_expert_weights(w13, w2)

    def expert_up(self, x, gather_index, expert_offsets, w13, next_weights=None):
        from light_moe.kernels import grouped_gemm

        return grouped_gemm.expert_up(x, gather_index, expert_offsets, w13)

    def expert_down(self, act, expert_offsets, w2):
        from light_moe.kernels import grouped_gemm

        return grouped_gemm.expert_down(act, expert_offsets, w2)


def default_ops() -> MoEOps:
    """The whole CuTe layer (router, metadata, grouped GEMM, combine) where it imports, else the reference
    router / metadata / combine around this project's grouped GEMM."""
    try:
        from light_moe.ops.cute_backend import CuteOps

        return CuteOps()
    except ImportError:
        return GroupedGemmOps()


def _two_launch_routing_ops(ops: MoEOps, x, gate_weight) -> MoEOps | None:
    """The CuTe ops with routing metadata in a launch of its own (fuse_routing_metadata=False), where the default
    fuses it into the router (one fused router CTA: decode, E <= 16); None elsewhere."""
    if not getattr(ops, "fuse_routing_metadata", False):
        return None
    from light_moe.kernels import router as router_kernel

    if not router_kernel.metadata_fusable(gate_weight.shape[0], x.shape[0], x.shape[1] * x.element_size()):
        return None
    return type(ops)(fuse_routing_metadata=False)


def _grouped_mm_experts(x, gather_index, offsets, w13_t, w2_t):
    """torch._grouped_mm baseline: w13_t [E, H, 2I], w2_t [E, I, H] (transposed views, K-major)."""
    ends = offsets[1:]
    rows = x.index_select(0, gather_index)  # [M, H]
    gate_up = torch._grouped_mm(rows, w13_t, offs=ends)  # [M, 2I]
    inter = gate_up.shape[1] // 2
    act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    return torch._grouped_mm(act, w2_t, offs=ends)  # [M, H]


def run_moe_layer_bench(
    tokens: list[int],
    num_experts: int = 8,
    hidden: int = 4096,
    inter: int = 14336,
    top_k: int = 2,
    dtype: torch.dtype = torch.bfloat16,
    out_json: str | None = None,
    ops: MoEOps | None = None,
    seed: int = 0,
    full_layer: bool = True,
    quant: str | None = None,
    rounds: int = 1,
) -> dict:
    """quant="w4a16": also time the layer with the same experts RTN-quantized (group 128, symmetric)
    on the W4A16 kernel, in the same run, against the bf16 rows. rounds > 1: every case is timed once per
    round, in forward order on even rounds and reverse order on odd ones (timing.round_robin), and the median of
    the rounds is reported (with the spread): a power-limited card's clock drifts by ~5% over the seconds a
    case takes, which one pass per case would attribute to whichever case ran then."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    device = torch.device("cuda")
    ops = ops or default_ops()
    gen = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, device=device, dtype=dtype, generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, device=device, dtype=dtype, generator=gen) / inter**0.5
    gate_weight = torch.randn(num_experts, hidden, device=device, dtype=dtype, generator=gen) / hidden**0.5
    w13p, w2p = ops.prepare_expert_weights(w13, w2)
    quantized = None
    if quant is not None:
        if quant != "w4a16":
            raise ValueError(f"quant must be 'w4a16' or None, got {quant!r}")
        from light_moe.quant.scheme import W4A16Config
        from light_moe.quant.w4a16 import rtn_quantize

        q13, q2 = rtn_quantize(w13, W4A16Config(128)), rtn_quantize(w2, W4A16Config(128))
        quantized = (q13, q2, *ops.prepare_expert_weights(q13, q2))
    rows = []
    for num_tokens in tokens:
        x = torch.randn(num_tokens, hidden, device=device, dtype=dtype, generator=gen)
        row = _bench_tokens(ops, x, gate_weight, w13, w2, w13p, w2p, top_k, full_layer, quantized, rounds)
        rows.append(row)
        print(_format_row(row), flush=True)
    env = environment()
    result = {
        "benchmark": "moe_layer",
        "env": env,
        "shape": dict(E=num_experts, H=hidden, I=inter, K=top_k, dtype=str(dtype)),
        "quant": quant,
        "ops": type(ops).__name__,
        "rows": rows,
    }
    if out_json is None:
        name = env["device"].replace(" ", "_")
        out_json = f"benchmarks/results/moe_layer-{name}-{env['date'][:10]}.json"
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(result, indent=1))
    return result


def _rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _same_routing(ops, x, gate_weight, top_k: int, reference_ids: torch.Tensor) -> torch.Tensor:
    """[T] bool: the backend's router picks the reference router's experts for this token."""
    ids = ops.router(x, gate_weight, top_k, True)[1]
    return (ids.sort(dim=-1).values == reference_ids.sort(dim=-1).values).all(dim=-1)


def _routing_flips(x, gate_weight, top_k: int, same: torch.Tensor) -> dict:
    """Tokens the two routers route differently, and the largest gap between their k-th and (k+1)-th gate
    logits (fp32): a gap near bf16 rounding says near-tie, a large one would say a router bug."""
    flipped = ~same
    gap = None
    if flipped.any():
        logits = torch.nn.functional.linear(x[flipped].float(), gate_weight.float())
        top = logits.topk(top_k + 1, dim=-1).values
        gap = (top[:, top_k - 1] - top[:, top_k]).max().item()
    return {"tokens": int(flipped.sum()), "max_logit_gap": gap}


def _bench_tokens(ops, x, gate_weight, w13, w2, w13p, w2p, top_k: int, full_layer: bool, quantized=None,
                  rounds: int = 1) -> dict:
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    w13_t, w2_t = w13.transpose(1, 2), w2.transpose(1, 2)  # [E, H, 2I], [E, I, H]
    expert_bytes = 3 * hidden * inter * x.element_size()
    topk_w, topk_ids, counts = reference.router(x, gate_weight, top_k, True)
    offsets, gather_index, reverse_index = reference.routing_metadata(topk_ids, num_experts)
    active = int((counts > 0).sum())
    flops = 2 * num_tokens * top_k * 3 * hidden * inter
    iters = max(5, min(50, int(2e5 / max(num_tokens, 1))))

    def grouped_mm_layer():
        w, ids, _ = reference.router(x, gate_weight, top_k, True)
        off, gidx, rev = reference.routing_metadata(ids, num_experts)
        return reference.combine(_grouped_mm_experts(x, gidx, off, w13_t, w2_t), rev, w)

    # Error against the reference over the tokens both routers send to the same experts: a token whose k-th
    # and (k+1)-th gate logits nearly tie may flip between the two routers (accumulation order), and its
    # output then differs by O(1) whatever the GEMMs do; those tokens are counted, with their logit gap
    same = _same_routing(ops, x, gate_weight, top_k, topk_ids)
    ours = ops.moe_forward(x, gate_weight, w13p, w2p, top_k, True)
    ref = reference.moe_forward(x, gate_weight, w13, w2, top_k, True)
    rel = _rel_l2(ours[same], ref[same])
    act = ops.expert_up(x, gather_index, offsets, w13p)
    cases = {
        "ours_up": (lambda: ops.expert_up(x, gather_index, offsets, w13p), True),
        "ours_down": (lambda: ops.expert_down(act, offsets, w2p), True),
        "ours_experts": (lambda: ops.expert_down(ops.expert_up(x, gather_index, offsets, w13p), offsets, w2p), True),
        "grouped_mm_experts": (lambda: _grouped_mm_experts(x, gather_index, offsets, w13_t, w2_t), True),
    }
    if full_layer:
        cases["ours_layer"] = (lambda: ops.moe_forward(x, gate_weight, w13p, w2p, top_k, True), False)
        if ops.graph_safe(gate_weight, top_k, w13p, w2p):
            cases["ours_layer_graph"] = (lambda: ops.moe_forward(x, gate_weight, w13p, w2p, top_k, True), True)
        cases["grouped_mm_layer"] = (grouped_mm_layer, False)
        cases["loop_layer"] = (lambda: reference.moe_forward(x, gate_weight, w13, w2, top_k, True), False)
    unfused = _two_launch_routing_ops(ops, x, gate_weight) if full_layer else None
    fused_diff = None
    if unfused is not None and ops.graph_safe(gate_weight, top_k, w13p, w2p):
        # the default saves one launch; the same ids and metadata must give the same output, bit for bit
        fused_diff = (unfused.moe_forward(x, gate_weight, w13p, w2p, top_k, True) - ours).abs().max().item()
        cases["ours_layer_graph_two_launch_routing"] = (
            lambda: unfused.moe_forward(x, gate_weight, w13p, w2p, top_k, True), True)
    row = {
        "tokens": num_tokens,
        "active_experts": active,
        "rel_l2_vs_reference": rel,  # over the tokens routed alike (see routing_flips)
        "routing_flips": _routing_flips(x, gate_weight, top_k, same),
        "target_us": TARGETS_US.get(num_tokens),
    }
    if fused_diff is not None:
        row["fused_routing_max_abs_diff"] = fused_diff  # default vs the two-launch layer: 0 when the metadata is right
    bytes_of = {}
    if quantized is not None:
        q13, q2, q13p, q2p = quantized
        # against the reference on the same quantized experts (it dequantises per expert)
        ours_q = ops.moe_forward(x, gate_weight, q13p, q2p, top_k, True)
        ref_q = reference.moe_forward(x, gate_weight, q13, q2, top_k, True)
        row["w4a16_rel_l2_vs_reference"] = _rel_l2(ours_q[same], ref_q[same])
        row["w4a16_target_us"] = W4A16_TARGETS_US.get(num_tokens)
        cases["w4a16_experts"] = (lambda: ops.expert_down(ops.expert_up(x, gather_index, offsets, q13p), offsets, q2p),
                                  True)
        cases["w4a16_layer_graph"] = (lambda: ops.moe_forward(x, gate_weight, q13p, q2p, top_k, True), True)
        if "ours_layer_graph_two_launch_routing" in cases:
            cases["w4a16_layer_graph_two_launch_routing"] = (
                lambda: unfused.moe_forward(x, gate_weight, q13p, q2p, top_k, True), True)
        int4_bytes = 3 * hidden * inter // 2 + 3 * hidden * inter // q13.group_size * 2  # int4 + bf16 scales
        bytes_of = {"w4a16_experts": int4_bytes, "w4a16_layer_graph": int4_bytes,
                    "w4a16_layer_graph_two_launch_routing": int4_bytes}
    failed: set[str] = set()

    def timed(name: str, fn, in_graph: bool):
        """One timing of the case per call; a case that fails (to capture or to run) is reported once and then
        skipped: a failing baseline must not hide the other rows."""
        run = None

        def once() -> float:
            nonlocal run
            if name in failed:
                return float("nan")
            try:
                run = run or (graph_replay(fn) if in_graph else fn)
                return time_us(run, 3 if name == "loop_layer" else iters)
            except Exception as exc:  # noqa: BLE001
                print(f"T={num_tokens} {name} failed: {exc!r}"[:300], flush=True)
                failed.add(name)
                return float("nan")
        return once

    times = round_robin({name: timed(name, fn, in_graph) for name, (fn, in_graph) in cases.items()}, rounds,
                        lambda once: once())
    ok = {name: t for name, t in times.items() if name not in failed}
    if rounds > 1:
        row["rounds"] = rounds
        row["spread_us"] = {name: (round(t["min"], 1), round(t["max"], 1)) for name, t in ok.items()}
    for name in cases:
        us = ok[name]["median"] if name in ok else float("nan")
        # a single projection moves and multiplies its share of the expert: up 2/3 (W1, W3), down 1/3 (W2)
        share = {"ours_up": 2 / 3, "ours_down": 1 / 3}.get(name, 1.0)
        row[f"{name}_us"] = round(us, 1)
        row[f"{name}_weight_GBps"] = round(share * active * bytes_of.get(name, expert_bytes) / us / 1e3, 1)
        row[f"{name}_TFLOPs"] = round(share * flops / us / 1e6, 1)
    return row


def _format_row(row: dict) -> str:
    parts = [f"T={row['tokens']:>5}"]
    for name in (
        "ours_layer",
        "ours_layer_graph",
        "ours_layer_graph_two_launch_routing",
        "w4a16_layer_graph",
        "w4a16_layer_graph_two_launch_routing",
        "ours_experts",
        "w4a16_experts",
        "ours_up",
        "ours_down",
        "grouped_mm_layer",
        "grouped_mm_experts",
        "loop_layer",
    ):
        if f"{name}_us" not in row:
            continue
        parts.append(
            f"{name} {row[f'{name}_us']:>8.1f}us {row[f'{name}_weight_GBps']:>6.0f}GB/s {row[f'{name}_TFLOPs']:>5.0f}TF"
        )
    parts.append(f"target {row['target_us']} relL2 {row['rel_l2_vs_reference']:.1e} "
                 f"(routing flips {row['routing_flips']['tokens']})")
    return " | ".join(parts)


def main(args) -> None:
    run_moe_layer_bench(args.tokens, args.experts, args.hidden, args.intermediate, args.top_k, out_json=args.output,
                        quant=args.quant, rounds=args.rounds)
