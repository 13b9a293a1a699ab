"""GPU tests of the router's last-CTA counts (router.finish_mode "last_cta": E <= 16, T K <= LAST_CTA_MAX_ROWS, more
than one CTA): one launch writes topk_weights / topk_ids, tokens_per_expert and the routing metadata, with no memset.

Fresh random inputs and poisoned outputs (NaN weights, -7 ids / counts / metadata). Ids are compared with the exact
(fp64) and the reference top-k where those are clear, as in test_routing_kernels_gpu.py; counts are exactly the
histogram of the kernel's own ids; the metadata is bit-identical to reference.routing_metadata and to routing.py's
kernel of those ids; every output is bit-identical to the memset path (the atomics and the separate metadata
kernel) on the same inputs. The workspace's ticket is back at 0 after every launch; CUDA-graph replays on new inputs
and launches back to back on one stream (which share the workspace) give the eager results.
"""
import pytest
import torch

pytest.importorskip("cutlass")

from light_moe.config import RouterConfig  # noqa: E402
from light_moe.kernels import router, routing  # noqa: E402
from light_moe.kernels.router_select import selection_for  # noqa: E402
from light_moe.ops import reference  # noqa: E402
from tests.kernels.test_router_select_gpu import _check as _check_variant  # noqa: E402
from tests.kernels.test_router_select_gpu import _problem as _variant_problem  # noqa: E402
from tests.kernels.test_routing_kernels_gpu import _clear_tokens, _rel_l2, _router_problem  # noqa: E402


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _sm90(), reason="CuTe kernels need sm_90")]

H = 4096
LIMIT = "limit"  # T = LAST_CTA_MAX_ROWS // K, the mode's largest T


def _tokens(tokens, top_k: int) -> int:
    return router.LAST_CTA_MAX_ROWS // top_k if tokens == LIMIT else tokens


def _poisoned(tokens: int, experts: int, top_k: int):
    """(topk_weights, topk_ids, tokens_per_expert), (expert_offsets, gather_index, reverse_index), all poisoned."""
    outputs = (torch.full((tokens, top_k), float("nan"), device="cuda"),
               torch.full((tokens, top_k), -7, dtype=torch.int32, device="cuda"),
               torch.full((experts,), -7, dtype=torch.int32, device="cuda"))
    metadata = (torch.full((experts + 1,), -7, dtype=torch.int32, device="cuda"),
                torch.full((tokens * top_k,), -7, dtype=torch.int32, device="cuda"),
                torch.full((tokens * top_k,), -7, dtype=torch.int32, device="cuda"))
    return outputs, metadata


def _ticket(device) -> int:
    return router.finish_workspace(device)[0].item()


def _assert_metadata_of_own_ids(ids: torch.Tensor, experts: int, metadata) -> None:
    """The metadata equals reference.routing_metadata and routing.py's kernel of the kernel's own ids."""
    for got, ref, kernel in zip(metadata, reference.routing_metadata(ids, experts),
                                routing.routing_metadata(ids, experts)):
        assert torch.equal(got, ref.to(torch.int32))
        assert torch.equal(got, kernel)


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("experts", [8, 16])
@pytest.mark.parametrize("tokens", [17, 33, 64, 100, 128, 256, LIMIT])
def test_last_cta_matches_reference(tokens, experts, top_k, monkeypatch):
    tokens = _tokens(tokens, top_k)
    renorm = top_k == 2
    assert router.finish_mode(experts, tokens, top_k, H * 2) == "last_cta"
    gen = torch.Generator(device="cuda").manual_seed(1000 * tokens + 10 * experts + top_k)
    x, w, idle = _router_problem(tokens, experts, top_k, H, torch.bfloat16, gen)
    (weights, ids, counts), metadata = _poisoned(tokens, experts, top_k)
    router.router_into(x, w, top_k, renorm, weights, ids, counts, metadata=metadata)
    torch.cuda.synchronize()
    assert _ticket(x.device) == 0, "the last CTA did not reset the ticket"

    assert torch.isfinite(weights).all(), "unwritten or NaN weights"
    assert ((ids >= 0) & (ids < experts)).all(), "unwritten or out-of-range ids"
    assert torch.equal(counts.long(), torch.bincount(ids.flatten().long(), minlength=experts))
    if top_k < experts:
        assert (counts[idle] == 0).all()
    _assert_metadata_of_own_ids(ids, experts, metadata)

    exact = x.double() @ w.double().t()  # [T, E]
    clear_exact = _clear_tokens(exact, top_k, 1e-3)
    assert tokens < 64 or clear_exact.float().mean() > 0.8
    assert torch.equal(ids[clear_exact].long(), exact.topk(top_k, dim=-1).indices[clear_exact])
    exact_w = torch.softmax(exact, dim=-1).gather(1, ids.long())
    if renorm:
        exact_w = exact_w / exact_w.sum(-1, keepdim=True)
    assert _rel_l2(weights, exact_w) < 1e-4
    ref_w, ref_ids, ref_counts = reference.router(x, w, top_k, renorm)
    clear_ref = _clear_tokens(exact, top_k, 0.05)
    assert torch.equal(ids[clear_ref], ref_ids[clear_ref])
    if clear_ref.any():
        assert _rel_l2(weights[clear_ref], ref_w[clear_ref]) < 1e-2
    if clear_ref.all():
        assert torch.equal(counts, ref_counts)

    # the memset path (atomic counts, then routing.py's kernel) on the same inputs: bit-identical outputs
    monkeypatch.setattr(router, "_launch_mode", lambda *args: ("atomic", None))
    (weights2, ids2, counts2), _ = _poisoned(tokens, experts, top_k)
    router.router_into(x, w, top_k, renorm, weights2, ids2, counts2)
    two_launch = routing.routing_metadata(ids2, experts)
    torch.cuda.synchronize()
    assert torch.equal(weights2, weights) and torch.equal(ids2, ids) and torch.equal(counts2, counts)
    for a, b in zip(two_launch, metadata):
        assert torch.equal(a, b)


def test_last_cta_without_metadata():
    """router_into without metadata in last-CTA mode: the counts alone, no memset; the same outputs as with it."""
    experts, top_k, tokens = 8, 2, 100
    gen = torch.Generator(device="cuda").manual_seed(21)
    x, w, _ = _router_problem(tokens, experts, top_k, H, torch.bfloat16, gen)
    (weights, ids, counts), metadata = _poisoned(tokens, experts, top_k)
    router.router_into(x, w, top_k, True, weights, ids, counts, metadata=metadata)
    (weights2, ids2, counts2), _ = _poisoned(tokens, experts, top_k)
    router.router_into(x, w, top_k, True, weights2, ids2, counts2)
    torch.cuda.synchronize()
    assert _ticket(x.device) == 0
    assert torch.equal(weights2, weights) and torch.equal(ids2, ids) and torch.equal(counts2, counts)
    assert torch.equal(counts.long(), torch.bincount(ids.flatten().long(), minlength=experts))


V3_LIKE = RouterConfig(scoring="sigmoid", n_group=4, topk_group=2, group_score="top2_sum", correction_bias=True,
                       routed_scaling_factor=2.5)
GPT_OSS_LIKE = RouterConfig(scoring="softmax_topk", gate_bias=True)


@pytest.mark.parametrize("spec,top_k,renorm,tokens", [(V3_LIKE, 4, True, 64), (V3_LIKE, 4, True, 256),
                                                      (GPT_OSS_LIKE, 4, False, 100), (GPT_OSS_LIKE, 2, False, 1000)],
                         ids=["v3_T64", "v3_T256", "gptoss_T100", "gptoss_T1000"])
def test_last_cta_with_a_selection_variant(spec, top_k, renorm, tokens):
    """A routing variant (router_select.py) with E = 16 past one CTA: route() returns the metadata from the last CTA;
    the variant's checks of test_router_select_gpu.py hold, and the metadata is that of the kernel's ids."""
    experts = 16
    gen = torch.Generator(device="cuda").manual_seed(31 + tokens)
    x, w, correction, gate_bias = _variant_problem(tokens, spec, experts, H, torch.bfloat16, gen)
    selection = selection_for(spec, gate_bias, correction)
    assert router.finish_mode(experts, tokens, top_k, H * 2) == "last_cta"
    counts = torch.full((experts,), -7, dtype=torch.int32, device="cuda")
    weights, ids, counts, metadata = router.route(
        x, w, top_k, renorm, counts, selection=selection, gate_bias=gate_bias,
        correction_bias=correction if selection.correction_bias else None)
    assert metadata is not None
    torch.cuda.synchronize()
    assert _ticket(x.device) == 0
    _check_variant(weights, ids, counts, x, w, spec, top_k, renorm, correction, gate_bias)
    _assert_metadata_of_own_ids(ids, experts, metadata)


@pytest.mark.parametrize("experts,top_k,tokens", [(8, 2, 64), (16, 4, 256)])
def test_last_cta_replays_in_a_cuda_graph(experts, top_k, tokens):
    """Two router launches (two layers sharing the workspace) captured in one CUDA graph, replayed several times on
    new inputs written into the captured x, outputs poisoned before each replay: every replay equals eager calls
    on those inputs bit for bit, its metadata is that of its ids, and the ticket is back at 0."""
    gen = torch.Generator(device="cuda").manual_seed(41 + experts)
    xs = [_router_problem(tokens, experts, top_k, H, torch.bfloat16, gen)[:2] for _ in range(2)]
    buffers = [_poisoned(tokens, experts, top_k) for _ in xs]

    def step():
        for (x, w), (outputs, metadata) in zip(xs, buffers):
            router.router_into(x, w, top_k, True, *outputs, metadata=metadata)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile and make the workspace outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        step()
    for _ in range(3):
        for (x, _), (outputs, metadata) in zip(xs, buffers):
            x.copy_(_router_problem(tokens, experts, top_k, H, torch.bfloat16, gen)[0])
            for t, poison in zip((*outputs, *metadata), (float("nan"), -7, -7, -7, -7, -7)):
                t.fill_(poison)
        graph.replay()
        torch.cuda.synchronize()
        assert _ticket(xs[0][0].device) == 0
        for (x, w), (outputs, metadata) in zip(xs, buffers):
            eager_outputs, eager_metadata = _poisoned(tokens, experts, top_k)
            router.router_into(x, w, top_k, True, *eager_outputs, metadata=eager_metadata)
            for got, want in zip((*outputs, *metadata), (*eager_outputs, *eager_metadata)):
                assert torch.equal(got, want)
            ids = outputs[1]
            assert torch.equal(outputs[2].long(), torch.bincount(ids.flatten().long(), minlength=experts))
            _assert_metadata_of_own_ids(ids, experts, metadata)


def test_last_cta_launches_back_to_back():
    """Launches of different sizes one after another on one stream, no sync between them (they share the ticket
    and the slots; each waits for its predecessor through the PDL wait): each equals its own synchronised run."""
    gen = torch.Generator(device="cuda").manual_seed(51)
    problems = [(8, 2, 64), (8, 2, 100), (16, 1, 256), (16, 4, 33), (8, 4, 1024), (16, 2, 17)]
    inputs = [_router_problem(t, e, k, H, torch.bfloat16, gen)[:2] for e, k, t in problems]
    alone = []
    for (experts, top_k, tokens), (x, w) in zip(problems, inputs):
        outputs, metadata = _poisoned(tokens, experts, top_k)
        router.router_into(x, w, top_k, True, *outputs, metadata=metadata)
        torch.cuda.synchronize()
        assert _ticket(x.device) == 0
        alone.append((*outputs, *metadata))
    for _ in range(3):
        together = []
        for (experts, top_k, tokens), (x, w) in zip(problems, inputs):
            outputs, metadata = _poisoned(tokens, experts, top_k)
            router.router_into(x, w, top_k, True, *outputs, metadata=metadata)
            together.append((*outputs, *metadata))
        torch.cuda.synchronize()
        assert _ticket(inputs[0][0].device) == 0
        for (experts, _, _), got, want in zip(problems, together, alone):
            for a, b in zip(got, want):
                assert torch.equal(a, b)
            _assert_metadata_of_own_ids(got[1], experts, got[3:])


def test_route_and_cute_ops_past_one_cta():
    """router.route and CuteOps.route hand back the last CTA's metadata past one CTA and None past the mode's limit,
    where the memset path still counts exactly."""
    from light_moe.ops.cute_backend import CuteOps

    experts, top_k = 8, 2
    gen = torch.Generator(device="cuda").manual_seed(61)
    for tokens, fused in ((64, True), (router.LAST_CTA_MAX_ROWS // top_k + 1, False)):
        assert router.metadata_fusable(experts, tokens, top_k, H * 2) == fused
        x, w, _ = _router_problem(tokens, experts, top_k, H, torch.bfloat16, gen)
        counts = torch.full((experts,), -7, dtype=torch.int32, device="cuda")
        for route in (router.route, CuteOps().route):
            weights, ids, counts_out, metadata = route(x, w, top_k, True, counts)
            torch.cuda.synchronize()
            assert counts_out is counts
            assert torch.equal(counts.long(), torch.bincount(ids.flatten().long(), minlength=experts))
            assert (metadata is not None) == fused
            if fused:
                _assert_metadata_of_own_ids(ids, experts, metadata)
            counts.fill_(-7)
