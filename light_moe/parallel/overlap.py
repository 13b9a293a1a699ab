"""Two-batch overlap of the expert exchange with expert compute (issue 7 item 4).

Shape legend: T tokens on this rank, K top-k, H hidden, R rows received for this rank's experts.

With overlap on, an MoE layer splits this rank's T tokens into two micro-batches A = [0, T/2) and
B = [T/2, T) (after routing the whole batch, so the router math is unchanged) and interleaves:

    counts A, counts B        (async; the only host sync of the layer: split sizes)
    rows A, rows B            (async, in flight together)
    shared expert(x)          (Qwen2-MoE: computed while both exchanges run)
    wait rows A -> experts(A) -> combine-send A (async)     B's rows still in flight
    wait rows B -> experts(B) -> combine-send B (async)     A's results travel back meanwhile
    wait A, B -> weighted sum per token in slot order -> [T, H]

Every rank issues the same collectives in the same order (an idle rank sends two empty
micro-batches), so overlap cannot deadlock where the plain path does not. On GPU, async_op=True
puts NCCL's collectives on its own stream and work.wait() only makes the compute stream wait, so
the exchange of one micro-batch runs while the other computes; on gloo the collectives run on
gloo's threads. The results are per token the same sums as without overlap (the expert GEMMs see
other row batches, so float rounding may differ in the last bits; tests compare greedy tokens).
The saving is measured by `light-moe bench ep` (overlap on vs off), not assumed.

Fixed-capacity steps (dispatcher.capacity > 0, decode-sized batches) skip the micro-batches: the
layer runs the dispatcher's one sync-free exchange each way (parallel/dispatch.py).

Not overlapped yet: attention of one micro-batch with the other's exchange (that needs the
whole model forward split into micro-batches, SGLang-style), and the counts exchange itself.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from light_moe.parallel.dispatch import AllToAllDispatcher, Routed, _Exchange


class TwoBatchOverlap:
    """The MoE layer's routed part (and optionally its shared expert) with two micro-batches."""

    def __init__(self, dispatcher: AllToAllDispatcher):
        self.dispatcher = dispatcher

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                experts: Callable[[Routed], torch.Tensor],
                shared: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """Returns (routed output [T, H], shared expert output [T, H] or None)."""
        d = self.dispatcher
        if d.capacity > 0:  # fixed-capacity step (small batch): one sync-free exchange, no micro-batches
            routed = d.dispatch(x, topk_weights, topk_ids)
            shared_out = shared(x) if shared is not None else None
            return d.combine(experts(routed), routed), shared_out
        d.exchanges["variable"] += 1
        num_tokens = x.shape[0]
        half = (num_tokens + 1) // 2
        bounds = [(0, half), (half, num_tokens)]
        routes = [d.route(topk_ids[a:b]) for a, b in bounds]
        counts = [d.exchange_counts(route, async_op=True) for route in routes]
        exchanges, in_flight = [], []
        for (a, b), route, (recv_counts, work) in zip(bounds, routes, counts):
            work.wait()
            send_splits, recv_splits = route.send_counts.tolist(), recv_counts.tolist()  # host sync
            exchanges.append(_Exchange(route.order, send_splits, recv_splits, topk_weights[a:b]))
            in_flight.append(d.send_rows(x[a:b], route, send_splits, recv_splits, async_op=True))
        shared_out = shared(x) if shared is not None else None
        returning = []
        for ex, (rows, ids, works) in zip(exchanges, in_flight):
            for work in works:
                work.wait()
            y = experts(d.routed(rows, ids, ex))  # [R, H]
            returning.append(d.send_back(y, ex, async_op=True))
        parts = []
        for ex, (back, work) in zip(exchanges, returning):
            work.wait()
            parts.append(d.finish(back, ex))
        return torch.cat(parts), shared_out
