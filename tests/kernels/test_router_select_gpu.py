"""GPU tests of the router's routing variants (kernels/router_select.py) against reference.spec_router: fresh random
inputs, poisoned outputs, the variant models' shapes at T = 1, 16, 256, 4096 (split and fused tiles), CUDA-graph
replay, the single-CTA routing metadata, the CuTe backend's wiring and a tiny DeepSeek-V3 engine under CUDA graphs.

Both sides compute the logits in fp32 from the same inputs (bf16 products are exact in fp32), so they differ only by
the order of the fp32 sums (~1e-6). Ids are compared where the exact (fp64) choice is clear: its top-(K+1) values
pairwise apart, and the kept groups' boundary apart, by more than MARGIN (relative to the token's largest |value|,
at least 1); elsewhere a near-tie may flip. Weights: relative L2 < 1e-5 against fp64 weights of the kernel's own
ids (every token) and against the reference (clear tokens). Counts: exactly the bincount of the kernel's ids.
"""
import logging

import pytest
import torch

pytest.importorskip("cutlass")

from light_moe.config import RouterConfig  # noqa: E402
from light_moe.kernels import router  # noqa: E402
from light_moe.kernels.router_select import selection_for  # noqa: E402
from light_moe.ops import reference  # noqa: E402


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _sm90(), reason="CuTe kernels need sm_90")]

MARGIN = 1e-5
WEIGHT_TOL = 1e-5
TOKENS = [1, 16, 256, 4096]

V2 = RouterConfig(scoring="softmax")
V2_GROUPED = RouterConfig(scoring="softmax", n_group=8, topk_group=3, routed_scaling_factor=16.0)
V3 = RouterConfig(scoring="sigmoid", n_group=8, topk_group=4, group_score="top2_sum", correction_bias=True,
                  routed_scaling_factor=2.5)
GPT_OSS = RouterConfig(scoring="softmax_topk", gate_bias=True)

# name: (spec, E, K, H, renormalize, gate dtype); x is bf16
SHAPES = {
    "deepseek-v2-lite": (V2, 64, 6, 2048, False, torch.bfloat16),
    "deepseek-v2": (V2_GROUPED, 160, 6, 5120, False, torch.bfloat16),  # 20 experts per group: runtime membership
    "deepseek-v3": (V3, 256, 8, 7168, True, torch.bfloat16),
    "deepseek-v3-fp32-gate": (V3, 256, 8, 7168, True, torch.float32),  # x bf16 and gate fp32 -> both fp32
    "gpt-oss-20b": (GPT_OSS, 32, 4, 2880, False, torch.bfloat16),
}


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _problem(tokens, spec, experts, hidden, gate_dtype, gen):
    """x [T, H] bf16 and gate_weight [E, H] with logits ~ N(0, 1); the spec's bias vectors: a correction bias
    (fp32, 0.1 N(0, 1): about the spread of the top sigmoid scores, so it moves choices) and a gate bias (bf16)."""
    x = torch.randn(tokens, hidden, generator=gen, device="cuda").to(torch.bfloat16)
    w = (torch.randn(experts, hidden, generator=gen, device="cuda") / hidden ** 0.5).to(gate_dtype)
    correction = gate_bias = None
    if spec.correction_bias:
        correction = 0.1 * torch.randn(experts, generator=gen, device="cuda")
    if spec.gate_bias:
        gate_bias = (0.5 * torch.randn(experts, generator=gen, device="cuda")).to(torch.bfloat16)
    return x, w, correction, gate_bias


def _exact(x, w, spec, correction=None, gate_bias=None, groups=True):
    """fp64 mirror of reference.spec_router: (scores [T, E], choice [T, E] with dropped groups at -inf, group
    scores [T, G] or None)."""
    logits = x.double() @ w.double().t()
    if gate_bias is not None:
        logits = logits + gate_bias.double()
    if spec.scoring == "softmax_topk":
        return logits, logits, None
    scores = torch.sigmoid(logits) if spec.scoring == "sigmoid" else torch.softmax(logits, dim=-1)
    choice = scores if correction is None else scores + correction.double()
    if spec.n_group == 1 or not groups:
        return scores, choice, None
    tokens, experts = choice.shape
    grouped = choice.view(tokens, spec.n_group, -1)
    group_scores = grouped.topk(2, dim=-1).values.sum(-1) if spec.group_score == "top2_sum" \
        else grouped.max(dim=-1).values  # [T, G]
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(spec.topk_group, dim=-1).indices, True)
    choice = choice.masked_fill(~keep.repeat_interleave(experts // spec.n_group, dim=1), float("-inf"))
    return scores, choice, group_scores


def _apart(values: torch.Tensor, n: int) -> torch.Tensor:
    """[T] bool: the top-n values of each row pairwise apart by more than MARGIN x max(1, largest |value|)."""
    top = values.topk(n, dim=-1).values
    scale = top.abs().amax(dim=-1).clamp_min(1.0)
    return ((top[:, :-1] - top[:, 1:]) > MARGIN * scale[:, None]).all(dim=-1)


def _groups_clear(choice, group_scores, spec) -> torch.Tensor:
    """[T] bool: the kept groups' boundary (the topk_group-th group score vs the next) apart by more than
    MARGIN x max(1, largest |score|); all True without groups."""
    if group_scores is None:
        return torch.ones(choice.shape[0], dtype=torch.bool, device=choice.device)
    top = group_scores.topk(spec.topk_group + 1, dim=-1).values
    scale = top.abs().amax(dim=-1).clamp_min(1.0)
    return (top[:, -2] - top[:, -1]) > MARGIN * scale


def _clear_tokens(choice, group_scores, spec, top_k) -> torch.Tensor:
    return _apart(choice, top_k + 1) & _groups_clear(choice, group_scores, spec)


def _exact_weights(scores, ids, spec, renormalize):
    """fp64 weights of the given ids [T, K]."""
    picked = scores.gather(1, ids.long())
    if spec.scoring == "softmax_topk":
        picked = torch.softmax(picked, dim=-1)
    elif renormalize:
        picked = picked / (picked.sum(dim=-1, keepdim=True) + 1e-20)
    return picked * spec.routed_scaling_factor


def _poisoned(tokens, experts, top_k):
    return (torch.full((tokens, top_k), float("nan"), device="cuda"),
            torch.full((tokens, top_k), -7, dtype=torch.int32, device="cuda"),
            torch.full((experts,), -7, dtype=torch.int32, device="cuda"))


def _run(x, w, top_k, renorm, spec, correction, gate_bias, tile=None):
    x, w = router.common_dtype(x, w)
    selection = selection_for(spec, gate_bias, correction)
    weights, ids, counts = _poisoned(x.shape[0], w.shape[0], top_k)
    router.router_into(x, w, top_k, renorm, weights, ids, counts, tile=tile, selection=selection,
                       gate_bias=gate_bias, correction_bias=correction if selection.correction_bias else None)
    return weights, ids, counts


def _check(weights, ids, counts, x, w, spec, top_k, renorm, correction, gate_bias):
    """The comparison of the module docstring; returns the fraction of clear tokens."""
    experts = w.shape[0]
    ref_w, ref_ids, ref_counts = reference.spec_router(x, w, top_k, renorm, spec, correction, gate_bias)
    torch.cuda.synchronize()
    assert torch.isfinite(weights).all(), "unwritten or NaN weights"
    assert ((ids >= 0) & (ids < experts)).all(), "unwritten or out-of-range ids"
    assert (ids.sort(dim=-1).values[:, 1:] != ids.sort(dim=-1).values[:, :-1]).all(), "an expert chosen twice"
    assert torch.equal(counts.long(), torch.bincount(ids.flatten().long(), minlength=experts))

    scores, choice, group_scores = _exact(x, w, spec, correction, gate_bias)
    clear = _clear_tokens(choice, group_scores, spec, top_k)
    exact_ids = choice.topk(top_k, dim=-1).indices
    assert torch.equal(ids[clear].long(), exact_ids[clear]), "ids differ from the exact choice on a clear token"
    assert torch.equal(ids[clear], ref_ids[clear]), "ids differ from the reference on a clear token"
    # where the kept groups are clear, every chosen expert lies in one of them and its exact choice is within a
    # near-tie of the exact k-th best
    kept = _groups_clear(choice, group_scores, spec)
    if kept.any():
        chosen = choice.gather(1, ids.long())[kept]
        assert torch.isfinite(chosen).all(), "an expert of a dropped group was chosen"
        exact_top = choice.topk(top_k, dim=-1).values[kept]
        assert (exact_top - chosen).abs().max().item() <= 1e-4 * max(1.0, exact_top.abs().max().item())
    rel = _rel_l2(weights, _exact_weights(scores, ids, spec, renorm))
    assert rel < WEIGHT_TOL, f"weights vs fp64 of the kernel's own ids: relative L2 {rel:.2e}"
    if clear.any():
        rel = _rel_l2(weights[clear], ref_w[clear])
        assert rel < WEIGHT_TOL, f"weights vs the reference: relative L2 {rel:.2e}"
    if clear.all():
        assert torch.equal(counts, ref_counts)
    return clear.float().mean().item()


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_selection_matches_spec_router(shape, tokens):
    spec, experts, top_k, hidden, renorm, gate_dtype = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(10000 * list(SHAPES).index(shape) + tokens)
    x, w, correction, gate_bias = _problem(tokens, spec, experts, hidden, gate_dtype, gen)
    weights, ids, counts = _run(x, w, top_k, renorm, spec, correction, gate_bias)
    clear = _check(weights, ids, counts, x, w, spec, top_k, renorm, correction, gate_bias)
    print(f"\n{shape} T={tokens}: {clear:.4f} of the tokens clear by {MARGIN}")
    if tokens >= 256:
        assert clear > 0.9, f"only {clear:.3f} of the tokens are clear: the comparison would be vacuous"


@pytest.mark.parametrize("shape", ["deepseek-v2", "deepseek-v3", "gpt-oss-20b"])
def test_the_variants_change_the_choice(shape):
    """The inputs make every part of the variant matter (so a kernel ignoring one fails the test above): the
    correction bias, the group limit and the gate bias each change the exact top-k of some tokens."""
    spec, experts, top_k, hidden, _, gate_dtype = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(5)
    x, w, correction, gate_bias = _problem(256, spec, experts, hidden, gate_dtype, gen)
    ids = _exact(x, w, spec, correction, gate_bias)[1].topk(top_k, dim=-1).indices
    variants = []
    if spec.n_group > 1:
        variants.append(_exact(x, w, spec, correction, gate_bias, groups=False)[1])
    if correction is not None:
        variants.append(_exact(x, w, spec, None, gate_bias)[1])
    if gate_bias is not None:
        variants.append(_exact(x, w, spec, correction, None)[1])
    for choice in variants:
        changed = (choice.topk(top_k, dim=-1).indices.sort(-1).values != ids.sort(-1).values).any(-1)
        assert changed.float().mean() > 0.05


def test_both_tile_modes_agree():
    """DeepSeek-V3 at T = 256 on the split tile (the default there) and on a fused 16-token tile: identical ids,
    weights equal up to the order of the fp32 sums."""
    spec, experts, top_k, hidden, renorm, gate_dtype = SHAPES["deepseek-v3"]
    gen = torch.Generator(device="cuda").manual_seed(11)
    x, w, correction, gate_bias = _problem(256, spec, experts, hidden, gate_dtype, gen)
    auto = router.choose_tile(experts, 256, hidden * 2)
    fused = router.RouterTile(1, 4, 2, 1, experts // 32, 2)
    assert auto.split and not fused.split
    outs = [_run(x, w, top_k, renorm, spec, correction, gate_bias, tile=t) for t in (auto, fused)]
    for weights, ids, counts in outs:
        _check(weights, ids, counts, x, w, spec, top_k, renorm, correction, gate_bias)
    scores, choice, groups = _exact(x, w, spec, correction, gate_bias)
    clear = _clear_tokens(choice, groups, spec, top_k)
    assert torch.equal(outs[0][1][clear], outs[1][1][clear])
    # the weights where the ids agree: a near-tie token may pick another expert under the other order of the sums
    assert clear.float().mean() > 0.9
    assert _rel_l2(outs[0][0][clear], outs[1][0][clear]) < WEIGHT_TOL


def test_selection_replays_in_a_cuda_graph():
    """router_into with a variant captured in a CUDA graph (no host sync), replayed on new inputs written into the
    captured x: the replay equals an eager call on those inputs bit for bit."""
    spec, experts, top_k, hidden, renorm, gate_dtype = SHAPES["deepseek-v3"]
    gen = torch.Generator(device="cuda").manual_seed(13)
    x, w, correction, gate_bias = _problem(16, spec, experts, hidden, gate_dtype, gen)
    selection = selection_for(spec, gate_bias, correction)
    outputs = _poisoned(16, experts, top_k)
    kwargs = dict(selection=selection, correction_bias=correction)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        router.router_into(x, w, top_k, renorm, *outputs, **kwargs)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        router.router_into(x, w, top_k, renorm, *outputs, **kwargs)
    x.copy_(torch.randn(x.shape, generator=gen, device="cuda").to(x.dtype))
    for t, poison in zip(outputs, (float("nan"), -7, -7)):
        t.fill_(poison)
    graph.replay()
    eager = _poisoned(16, experts, top_k)
    router.router_into(x, w, top_k, renorm, *eager, **kwargs)
    torch.cuda.synchronize()
    for a, b in zip(outputs, eager):
        assert torch.equal(a, b)
    _check(*outputs, x, w, spec, top_k, renorm, correction, gate_bias)


@pytest.mark.parametrize("tokens", [1, 7, 16])
def test_selection_with_routing_metadata_on_one_cta(tokens):
    """A variant with E <= 16 at decode: route() writes the routing metadata in the same launch (one fused CTA);
    it equals reference.routing_metadata of the kernel's ids. E = 16 in 4 groups of 4: runtime group membership."""
    spec = RouterConfig(scoring="sigmoid", n_group=4, topk_group=2, group_score="top2_sum", correction_bias=True,
                        routed_scaling_factor=2.5)
    gen = torch.Generator(device="cuda").manual_seed(17 + tokens)
    x, w, correction, _ = _problem(tokens, spec, 16, 4096, torch.bfloat16, gen)
    counts = torch.full((16,), -7, dtype=torch.int32, device="cuda")
    weights, ids, counts, meta = router.route(x, w, 4, True, counts, selection=selection_for(spec, None, correction),
                                              correction_bias=correction)
    assert meta is not None
    _check(weights, ids, counts, x, w, spec, 4, True, correction, None)
    for got, want in zip(meta, reference.routing_metadata(ids, 16)):
        assert torch.equal(got, want.to(torch.int32))


@pytest.mark.parametrize("shape", ["deepseek-v3", "deepseek-v3-fp32-gate", "gpt-oss-20b"])
def test_cute_backend_routes_variants_on_the_kernel(shape, caplog):
    """CuteOps.route / router with spec=: the kernel's outputs (no fallback logged), the counts in the given buffer."""
    from light_moe.ops.cute_backend import CuteOps

    spec, experts, top_k, hidden, renorm, gate_dtype = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(19)
    x, w, correction, gate_bias = _problem(64, spec, experts, hidden, gate_dtype, gen)
    ops = CuteOps()
    buffer = torch.full((experts,), -7, dtype=torch.int32, device="cuda")
    variant = dict(spec=spec, correction_bias=correction, gate_bias=gate_bias)
    with caplog.at_level(logging.WARNING):
        weights, ids, counts, meta = ops.route(x, w, top_k, renorm, buffer, **variant)
        r_weights, r_ids, r_counts = ops.router(x, w, top_k, renorm, None, **variant)
    assert "routing variant" not in caplog.text and not ops._logged
    assert counts is buffer and meta is None  # E > 16: no single-CTA metadata
    direct = _run(x, w, top_k, renorm, spec, correction, gate_bias)
    for a, b, c in zip((weights, ids, counts), (r_weights, r_ids, r_counts), direct):
        assert torch.equal(a, c) and torch.equal(b, c)
    _check(weights, ids, counts, x, w, spec, top_k, renorm, correction, gate_bias)


def test_deepseek_v3_engine_runs_cuda_graphs(tmp_path):
    """A tiny DeepSeek-V3 on the CuTe backend (experts on the grouped GEMM, I = 64) is graph-safe now: decode and
    prefill replay CUDA graphs, and the tokens agree with the eager engine up to near-ties."""
    from light_moe import LightMoEEngine, SamplingParams
    from tests.test_cute_engine_gpu import PROMPTS, assert_agree
    from tests.tiny_models import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint("deepseek_v3", tmp_path / "v3", moe_intermediate_size=64)
    common = dict(dtype="bfloat16", device="cuda", show_progress=False, kv_cache_memory_bytes=64 << 20,
                  moe_backend="cute", async_scheduling=False)
    eager = LightMoEEngine(checkpoint, enforce_eager=True, **common)
    graphs = LightMoEEngine(checkpoint, **common)
    assert all(block.graph_safe for block in graphs.model.moe_blocks())
    assert graphs.runner.decode_graphs is not None
    params = SamplingParams(max_tokens=24, temperature=0.0)
    out_e = eager.generate_outputs(PROMPTS, params)
    out_g = graphs.generate_outputs(PROMPTS, params)
    assert len(graphs.runner.decode_graphs.graphs) > 0
    assert "router" not in {op for op, _ in graphs.ops._logged}
    for prompt, a, b in zip(PROMPTS, out_e, out_g):
        assert_agree(eager, graphs, prompt, a.token_ids, b.token_ids)
