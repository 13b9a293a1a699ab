"""GPU tests of the routing-side kernels against light_moe.ops.reference (fresh random inputs,
poisoned outputs, empty experts, T from 1 to 4096+).

Router ids: the reference rounds its logits to bf16 (F.linear in bf16) while the kernel keeps them in
fp32, so ids are compared with the reference only where its top-(K+1) logits are clearly apart, and
with an fp64 top-k where the exact logits are apart by more than the kernel's own error.
"""
import pytest
import torch

pytest.importorskip("cutlass")

from light_moe.kernels import combine, router, routing  # noqa: E402
from light_moe.ops import reference  # noqa: E402

pytestmark = pytest.mark.gpu

TOKENS = [1, 2, 7, 64, 333, 4096]
EXPERTS_TOPK = [(8, 2), (8, 8), (64, 2), (64, 8), (128, 2), (128, 8)]


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _router_problem(tokens, experts, top_k, hidden, dtype, gen):
    """x, gate_weight where roughly half the experts (never fewer than K + 2) can win: the others get
    a logit offset of about -8 through the mean of x, so they stay empty."""
    active = max(top_k + 2, experts // 2)
    dev = "cuda"
    x = torch.randn(tokens, hidden, generator=gen, device=dev) + 1.0  # [T, H], row mean ~1
    w = torch.randn(experts, hidden, generator=gen, device=dev) / hidden ** 0.5  # [E, H]
    idle = torch.randperm(experts, generator=gen, device=dev)[active:]
    w[idle] -= 8.0 / hidden
    return x.to(dtype), w.to(dtype), idle


def _clear_tokens(logits: torch.Tensor, top_k: int, margin: float) -> torch.Tensor:
    """Tokens whose top-(K+1) logits are pairwise apart by more than `margin`: [T] bool."""
    n = min(top_k + 1, logits.shape[1])
    top = logits.topk(n, dim=-1).values
    gaps = top[:, :-1] - top[:, 1:]
    return (gaps > margin).all(dim=-1)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("experts,top_k", EXPERTS_TOPK)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_router_matches_reference(tokens, experts, top_k, dtype):
    if dtype == torch.float32 and (tokens not in (7, 4096) or experts == 128 or top_k == 8):
        pytest.skip("fp32 checked on a subset (compile time)")
    hidden = 1024 if experts > 8 else 4096
    renorm = top_k == 2
    gen = torch.Generator(device="cuda").manual_seed(1000 * tokens + 10 * experts + top_k)
    x, w, idle = _router_problem(tokens, experts, top_k, hidden, dtype, gen)

    weights = torch.full((tokens, top_k), float("nan"), device="cuda")
    ids = torch.full((tokens, top_k), -7, dtype=torch.int32, device="cuda")
    counts = torch.full((experts,), -7, dtype=torch.int32, device="cuda")
    router.router_into(x, w, top_k, renorm, weights, ids, counts)
    ref_w, ref_ids, ref_counts = reference.router(x, w, top_k, renorm)
    torch.cuda.synchronize()

    assert torch.isfinite(weights).all(), "unwritten or NaN weights"
    assert ((ids >= 0) & (ids < experts)).all(), "unwritten or out-of-range ids"
    # counts are exactly the histogram of the kernel's own ids, and idle experts stay empty
    assert torch.equal(counts.long(), torch.bincount(ids.flatten().long(), minlength=experts))
    if top_k < experts:
        assert (counts[idle] == 0).all()

    exact = (x.double() @ w.double().t())  # [T, E]
    own_margin = 1e-3 if dtype == torch.bfloat16 else 1e-4
    clear_exact = _clear_tokens(exact, top_k, own_margin)
    assert tokens < 64 or clear_exact.float().mean() > 0.8
    exact_ids = exact.topk(top_k, dim=-1).indices
    assert torch.equal(ids[clear_exact].long(), exact_ids[clear_exact])
    probs = torch.softmax(exact, dim=-1)
    exact_w = probs.gather(1, ids.long())
    if renorm:
        exact_w = exact_w / exact_w.sum(-1, keepdim=True)
    assert _rel_l2(weights, exact_w) < (1e-4 if dtype == torch.bfloat16 else 1e-5)

    ref_margin = 0.05 if dtype == torch.bfloat16 else 1e-4
    clear_ref = _clear_tokens(exact, top_k, ref_margin)
    assert torch.equal(ids[clear_ref], ref_ids[clear_ref])
    if clear_ref.any():
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        assert _rel_l2(weights[clear_ref], ref_w[clear_ref]) < tol
    if clear_ref.all():
        assert torch.equal(counts, ref_counts)


def test_router_fp16_and_odd_experts():
    """Split mode with a tail of H chunks (H=2880) and E not a multiple of 8; both tile modes."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    for dtype, tokens, experts, top_k, hidden in ((torch.float16, 333, 60, 4, 2048), (torch.bfloat16, 77, 20, 3, 2880)):
        x, w, _ = _router_problem(tokens, experts, top_k, hidden, dtype, gen)
        exact = x.double() @ w.double().t()
        clear = _clear_tokens(exact, top_k, 1e-3)
        assert clear.float().mean() > 0.8
        auto = router.choose_tile(experts, tokens, hidden * x.element_size())
        fused = router.RouterTile(1, 1, 8, 1, -(-experts // 8), 2)
        assert auto.split and not fused.split
        for tile in (auto, fused):
            weights = torch.full((tokens, top_k), float("nan"), device="cuda")
            ids = torch.full((tokens, top_k), -1, dtype=torch.int32, device="cuda")
            counts = torch.full((experts,), -1, dtype=torch.int32, device="cuda")
            router.router_into(x, w, top_k, False, weights, ids, counts, tile=tile)
            assert torch.equal(ids[clear].long(), exact.topk(top_k, dim=-1).indices[clear])
            assert _rel_l2(weights, torch.softmax(exact, -1).gather(1, ids.long())) < 1e-4
            assert torch.equal(counts.long(), torch.bincount(ids.flatten().long(), minlength=experts))


def _routed_ids(tokens, experts, top_k, gen):
    """Distinct ids per token drawn from a random subset of the experts (the rest stay empty)."""
    active = max(top_k, experts // 2)
    subset = torch.randperm(experts, generator=gen, device="cuda")[:active]
    scores = torch.rand(tokens, active, generator=gen, device="cuda")
    return subset[scores.topk(top_k, dim=-1).indices].to(torch.int32)  # [T, K]


@pytest.mark.parametrize("tokens", [1, 2, 7, 16])
@pytest.mark.parametrize("experts,top_k", [(8, 2), (16, 4), (1, 1)])
def test_router_writes_routing_metadata(tokens, experts, top_k):
    """router_into(..., metadata=...) on one fused CTA (decode): expert_offsets, gather_index and reverse_index
    equal the reference routing metadata of the kernel's own ids, in the same launch; poisoned outputs."""
    gen = torch.Generator(device="cuda").manual_seed(77 * tokens + experts)
    x, w, _ = _router_problem(tokens, experts, top_k, 4096, torch.bfloat16, gen)
    assert router.metadata_fusable(experts, tokens, 4096 * 2)
    weights = torch.full((tokens, top_k), float("nan"), device="cuda")
    ids = torch.full((tokens, top_k), -7, dtype=torch.int32, device="cuda")
    counts = torch.full((experts,), -7, dtype=torch.int32, device="cuda")
    meta = (torch.full((experts + 1,), -7, dtype=torch.int32, device="cuda"),
            torch.full((tokens * top_k,), -7, dtype=torch.int32, device="cuda"),
            torch.full((tokens * top_k,), -7, dtype=torch.int32, device="cuda"))
    router.router_into(x, w, top_k, True, weights, ids, counts, metadata=meta)
    torch.cuda.synchronize()
    assert ((ids >= 0) & (ids < experts)).all()
    ref_offsets, ref_gather, ref_reverse = reference.routing_metadata(ids, experts)
    assert torch.equal(meta[0].cpu(), ref_offsets.int().cpu())
    assert torch.equal(meta[1].cpu(), ref_gather.int().cpu())
    assert torch.equal(meta[2].cpu(), ref_reverse.int().cpu())
    # without metadata the same ids come out (the flag only adds the metadata stage)
    ids2 = torch.full_like(ids, -7)
    router.router_into(x, w, top_k, True, torch.empty_like(weights), ids2, torch.empty_like(counts))
    assert torch.equal(ids2, ids)
    with pytest.raises(ValueError, match="one fused CTA"):
        big = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
        router.router_into(big, w, top_k, True, torch.empty(64, top_k, device="cuda"),
                           torch.empty(64, top_k, dtype=torch.int32, device="cuda"), torch.empty_like(counts),
                           metadata=(meta[0], torch.empty(64 * top_k, dtype=torch.int32, device="cuda"),
                                     torch.empty(64 * top_k, dtype=torch.int32, device="cuda")))


@pytest.mark.parametrize("tokens", TOKENS + [4097, 16384])  # single-CTA up to M = 4096, then two launches
@pytest.mark.parametrize("experts,top_k", EXPERTS_TOPK)
def test_routing_metadata_matches_reference(tokens, experts, top_k):
    gen = torch.Generator(device="cuda").manual_seed(tokens * 7 + experts + top_k)
    topk_ids = _routed_ids(tokens, experts, top_k, gen)
    rows = tokens * top_k
    offsets = torch.full((experts + 1,), -5, dtype=torch.int32, device="cuda")
    gather = torch.full((rows,), -5, dtype=torch.int32, device="cuda")
    reverse = torch.full((rows,), -5, dtype=torch.int32, device="cuda")
    routing.routing_metadata_into(topk_ids, experts, offsets, gather, reverse)
    ref_offsets, ref_gather, ref_reverse = reference.routing_metadata(topk_ids, experts)
    torch.cuda.synchronize()
    assert torch.equal(offsets, ref_offsets)
    assert torch.equal(gather, ref_gather)
    assert torch.equal(reverse, ref_reverse.to(torch.int32))
    if top_k < experts:
        assert (offsets[1:] == offsets[:-1]).any(), "case should contain empty experts"


def test_routing_metadata_mode_boundary():
    """Single-CTA limit and one past it, all rows on one expert, and a 1-D id vector."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    half = routing.SINGLE_CTA_MAX_ROWS // 2
    for tokens, experts, top_k in ((half, 16, 2), (half + 1, 16, 2), (5000, 256, 8)):
        topk_ids = _routed_ids(tokens, experts, top_k, gen)
        got = routing.routing_metadata(topk_ids, experts)
        for a, b in zip(got, reference.routing_metadata(topk_ids, experts)):
            assert torch.equal(a, b.to(torch.int32))
    same = torch.full((3000, 1), 5, dtype=torch.int32, device="cuda")
    for a, b in zip(routing.routing_metadata(same, 8), reference.routing_metadata(same, 8)):
        assert torch.equal(a, b.to(torch.int32))
    flat = torch.randint(0, 8, (999,), dtype=torch.int32, device="cuda", generator=gen)
    for a, b in zip(routing.routing_metadata(flat, 8), reference.routing_metadata(flat, 8)):
        assert torch.equal(a, b.to(torch.int32))


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("top_k,hidden,dtype", [(2, 4096, torch.bfloat16), (8, 2048, torch.bfloat16),
                                                (2, 1024, torch.float32)], ids=["bf16_K2", "bf16_K8", "fp32_K2"])
def test_combine_matches_reference(tokens, top_k, hidden, dtype):
    gen = torch.Generator(device="cuda").manual_seed(tokens + top_k)
    rows = tokens * top_k
    y = torch.randn(rows, hidden, generator=gen, device="cuda").to(dtype)  # [M, H] sorted rows
    reverse = torch.randperm(rows, generator=gen, device="cuda").to(torch.int32)  # [M]
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen, device="cuda"), dim=-1)  # [T, K]
    out = torch.full((tokens, hidden), float("nan"), dtype=dtype, device="cuda")
    combine.combine_into(y, reverse, weights, out)
    ref = reference.combine(y, reverse, weights)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), "unwritten outputs"
    assert _rel_l2(out, ref) < (1e-2 if dtype != torch.float32 else 1e-5)


def test_combine_reads_a_padded_buffer():
    """The fixed-capacity expert exchange hands combine a [N * C, H] buffer with more rows than T * K:
    only the rows reverse_index names are read (the rest is NaN here)."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    tokens, top_k, hidden, buffer_rows = 7, 2, 4096, 64
    y = torch.full((buffer_rows, hidden), float("nan"), dtype=torch.bfloat16, device="cuda")
    reverse = torch.randperm(buffer_rows, generator=gen, device="cuda")[: tokens * top_k].to(torch.int32)
    y[reverse.long()] = torch.randn(tokens * top_k, hidden, generator=gen, device="cuda").bfloat16()
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen, device="cuda"), dim=-1)
    out = torch.full((tokens, hidden), float("nan"), dtype=torch.bfloat16, device="cuda")
    combine.combine_into(y, reverse, weights, out)
    ref = reference.combine(y, reverse, weights)
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    assert _rel_l2(out, ref) < 1e-2


@pytest.mark.parametrize("experts,top_k", [(8, 2), (64, 8)])  # fused and split router
def test_routing_chain_is_graph_capturable(experts, top_k):
    """router -> routing_metadata -> combine captured in one CUDA graph, replayed on new inputs."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    tokens, hidden = 64, 4096
    x, w, _ = _router_problem(tokens, experts, top_k, hidden, torch.bfloat16, gen)
    y = torch.randn(tokens * top_k, hidden, generator=gen, device="cuda").to(torch.bfloat16)

    def chain():
        weights, ids, counts = router.router(x, w, top_k, True)
        offsets, gather, reverse = routing.routing_metadata(ids, experts)
        return weights, ids, counts, offsets, gather, reverse, combine.combine(y, reverse, weights)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain()  # compile + warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain()
    x.copy_(_router_problem(tokens, experts, top_k, hidden, torch.bfloat16, gen)[0])
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, chain()):
        assert torch.equal(got, want)
