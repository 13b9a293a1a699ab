"""CPU-only tests of the router's routing variants (kernels/router_select.py): sm_90a compiles of every variant in
both tile modes, the Selection built from config.RouterConfig, the host-side checks of router_into, and whether the
expert-side kernels (routing metadata, bf16 and W4A16 grouped GEMMs) take the variant models' 64-256 experts.
"""
import pytest
import torch

pytest.importorskip("cutlass")

from cutlass.cute.runtime import make_fake_stream  # noqa: E402

from light_moe.config import RouterConfig  # noqa: E402
from light_moe.kernels import grouped_gemm, router, router_select, routing, w4a16_gemm  # noqa: E402
from light_moe.kernels.router_select import Selection, selection_for  # noqa: E402
from light_moe.kernels.tile_config import choose_tile_config, choose_w4a16_tile  # noqa: E402
from tests.kernels.compile_check import compile_sm90a, compile_sm90a_ptx  # noqa: E402

BF16, FP32 = torch.bfloat16, torch.float32

V2 = RouterConfig(scoring="softmax")  # V2-Lite: greedy
V2_GROUPED = RouterConfig(scoring="softmax", n_group=8, topk_group=3, routed_scaling_factor=16.0)  # V2: E=160
V3 = RouterConfig(scoring="sigmoid", n_group=8, topk_group=4, group_score="top2_sum", correction_bias=True,
                  routed_scaling_factor=2.5)
GPT_OSS = RouterConfig(scoring="softmax_topk", gate_bias=True)

# (spec, x/gate dtype, H, E, K, renormalize, gate-bias dtype, correction-bias dtype, T picking the tile)
CASES = {
    "v2lite_bf16_E64_K6_decode_split": (V2, BF16, 2048, 64, 6, False, None, None, 1),
    "v2lite_bf16_E64_K6_prefill_fused": (V2, BF16, 2048, 64, 6, False, None, None, 4096),
    "v2_grouped_bf16_E160_K6_split": (V2_GROUPED, BF16, 5120, 160, 6, False, None, None, 16),  # 20 per group
    "v3_bf16_E256_K8_decode_split": (V3, BF16, 7168, 256, 8, True, None, FP32, 1),
    "v3_bf16_E256_K8_prefill_fused": (V3, BF16, 7168, 256, 8, True, None, FP32, 4096),
    "v3_fp32_E256_K8_split": (V3, FP32, 7168, 256, 8, True, None, FP32, 16),  # fp32 gate: 3xTF32
    "gptoss_bf16_E32_K4_split": (GPT_OSS, BF16, 2880, 32, 4, False, BF16, None, 16),
    "gptoss_bf16_E32_K4_prefill_fused": (GPT_OSS, BF16, 2880, 32, 4, False, BF16, None, 4096),
}


def _bias(dtype, experts):
    return None if dtype is None else torch.zeros(experts, dtype=dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_router_selection_compiles(name, tmp_path):
    spec, dtype, hidden, experts, top_k, renorm, gate_bias, correction, tokens = CASES[name]
    selection = selection_for(spec, _bias(gate_bias, experts), _bias(correction, experts))
    assert router.supports(dtype, hidden, experts, top_k)[0]
    assert router_select.supports(selection, experts, top_k) == (True, "ok")
    tile = router.choose_tile(experts, tokens, hidden * dtype.itemsize)
    assert tile.split == (tokens <= router.SPLIT_MAX_TOKENS)
    jit_fn, args = router.make_compile_args(dtype, hidden, experts, top_k, renorm, tile, make_fake_stream(),
                                            selection=selection)
    cubin, seconds = compile_sm90a(jit_fn, *args, dump_root=str(tmp_path))
    print(f"\nrouter {name} {selection} {tile}: compiled in {seconds:.2f} s -> {cubin.rsplit('/', 1)[-1][:40]}")


def test_router_selection_single_cta_with_metadata_compiles(tmp_path):
    """A variant on one fused CTA (E <= 16, decode) that also writes the routing metadata."""
    selection = Selection("sigmoid", n_group=4, topk_group=2, group_score="top2_sum", scale=2.5,
                          correction_bias="fp32")
    tile = router.choose_tile(16, 1, 4096 * 2)
    assert router.metadata_fusable(16, 1, 4096 * 2, tile)
    jit_fn, args = router.make_compile_args(BF16, 4096, 16, 4, True, tile, make_fake_stream(), single_cta=True,
                                            metadata=True, selection=selection)
    compile_sm90a(jit_fn, *args, dump_root=str(tmp_path))


def test_exact_keys_are_64_bit(tmp_path):
    """The variants rank on 64-bit keys (the full fp32 choice, then the id): the PTX sign-extends the 32-bit image
    and shuffles both halves; the default selection's 24-bit keys stay 32-bit."""
    spec = V3
    selection = selection_for(spec, None, torch.zeros(64))
    tile = router.choose_tile(64, 1, 2048 * 2)
    jit_fn, args = router.make_compile_args(BF16, 2048, 64, 8, True, tile, make_fake_stream(), selection=selection)
    ptx = compile_sm90a_ptx(jit_fn, *args, dump_root=str(tmp_path))
    assert "cvt.s64.s32" in ptx or "shl.b64" in ptx
    assert ptx.count("shfl.sync.bfly") > ptx.count("shfl.sync.idx")


def test_selection_for_specs():
    corr = torch.zeros(256)
    assert selection_for(V3, None, corr) == Selection("sigmoid", 8, 4, "top2_sum", 2.5, None, "fp32")
    assert selection_for(V3, None, None).correction_bias is None  # the reference uses the bias when given
    oss = selection_for(GPT_OSS, torch.zeros(32, dtype=BF16), corr)
    assert oss == Selection("softmax_topk", 1, 1, "max", 1.0, "bf16", None)  # no groups, no correction: reference
    assert selection_for(V2_GROUPED).n_group == 8 and selection_for(V2_GROUPED).scale == 16.0
    with pytest.raises(TypeError, match="gate_bias"):
        selection_for(GPT_OSS, torch.zeros(32, dtype=torch.int32))
    with pytest.raises(ValueError, match="scoring"):
        Selection("relu")
    with pytest.raises(ValueError, match="topk_group"):
        Selection("sigmoid", n_group=4, topk_group=5)
    with pytest.raises(ValueError, match="correction_bias dtype"):
        Selection("sigmoid", correction_bias="fp64")


def test_selection_supports_reasons():
    v3 = selection_for(V3, None, torch.zeros(256))
    assert router_select.supports(v3, 256, 8) == (True, "ok")
    assert "multiple of n_group" in router_select.supports(v3, 100, 8)[1]
    assert "above 16" in router_select.supports(Selection("softmax", 32, 4), 256, 8)[1]
    assert "kept groups" in router_select.supports(Selection("softmax", 8, 1), 32, 8)[1]  # 4 experts kept, K = 8
    assert "2 experts per group" in router_select.supports(Selection("sigmoid", 8, 4, "top2_sum"), 8, 2)[1]
    assert router_select.supports(Selection("softmax_topk"), 32, 4)[0]
    with pytest.raises(ValueError, match="kept groups"):
        router.RouterKernel("bf16", 2048, 32, 8, True, router.choose_tile(32, 1, 4096), selection=Selection(
            "softmax", 8, 1))


def _outputs(tokens, experts, top_k):
    return (torch.empty(tokens, top_k), torch.empty(tokens, top_k, dtype=torch.int32),
            torch.empty(experts, dtype=torch.int32))


def test_router_into_checks_selection_inputs():
    """Host-side validation before any launch (CPU tensors: the checks that come before the CUDA check)."""
    experts, top_k, hidden = 256, 8, 7168
    x, w = torch.zeros(4, hidden, dtype=BF16), torch.zeros(experts, hidden, dtype=BF16)
    v3 = selection_for(V3, None, torch.zeros(experts))
    corr = torch.zeros(experts)
    with pytest.raises(ValueError, match="correction_bias: the selection expects a fp32 vector, got none"):
        router.router_into(x, w, top_k, True, *_outputs(4, experts, top_k), selection=v3)
    with pytest.raises(ValueError, match="gate_bias: the selection has none, got a tensor"):
        router.router_into(x, w, top_k, True, *_outputs(4, experts, top_k), selection=v3, correction_bias=corr,
                           gate_bias=torch.zeros(experts))
    with pytest.raises(ValueError, match="correction_bias: the selection has none"):  # biases without a selection
        router.router_into(x, w, top_k, True, *_outputs(4, experts, top_k), correction_bias=corr)
    with pytest.raises(TypeError, match="correction_bias must be fp32"):
        router.router_into(x, w, top_k, True, *_outputs(4, experts, top_k), selection=v3,
                           correction_bias=corr.to(BF16))
    with pytest.raises(ValueError, match=r"contiguous \[256\] tensor"):
        router.router_into(x, w, top_k, True, *_outputs(4, experts, top_k), selection=v3,
                           correction_bias=torch.zeros(2 * experts)[::2])
    with pytest.raises(ValueError, match=r"contiguous \[256\] tensor"):
        router.router_into(x, w, top_k, True, *_outputs(4, experts, top_k), selection=v3,
                           correction_bias=torch.zeros(128))
    with pytest.raises(ValueError, match="router selection: top_k=8 exceeds the 4 experts"):
        router.router_into(x, w[:64], top_k, True, *_outputs(4, 64, top_k),
                           selection=Selection("softmax", n_group=16, topk_group=1))
    with pytest.raises(ValueError, match="router selection: n_group=32 above 16"):
        router.router_into(x, w, top_k, True, *_outputs(4, experts, top_k),
                           selection=Selection("softmax", n_group=32, topk_group=4))
    # valid selection inputs get as far as the tensor checks: mixed dtypes, then CPU tensors
    with pytest.raises(TypeError, match="must share a dtype"):
        router.router_into(x, w.float(), top_k, True, *_outputs(4, experts, top_k), selection=v3,
                           correction_bias=corr)
    with pytest.raises(ValueError, match="contiguous CUDA tensors"):
        router.router_into(x, w, top_k, True, *_outputs(4, experts, top_k), selection=v3, correction_bias=corr)


def test_common_dtype_promotes_mixed_inputs_to_fp32():
    x, w = torch.randn(3, 64).to(BF16), torch.randn(8, 64)
    xc, wc = router.common_dtype(x, w)
    assert xc.dtype == wc.dtype == FP32 and torch.equal(xc, x.float()) and wc is w
    same = router.common_dtype(x, w.to(BF16))
    assert same[0] is x


# (name, E, K, H, I): the routed experts of the variant models
EXPERT_SHAPES = [("deepseek-v2-lite", 64, 6, 2048, 1408), ("qwen3-30b-a3b", 128, 8, 2048, 768),
                 ("deepseek-v3", 256, 8, 7168, 2048), ("gpt-oss-20b", 32, 4, 2880, 2880)]


@pytest.mark.parametrize("name,experts,top_k,hidden,inter", EXPERT_SHAPES)
def test_expert_kernels_take_many_experts(name, experts, top_k, hidden, inter):
    """The routing metadata and the bf16 grouped GEMM take 64-256 experts with top-8, down to the tile configs the
    launch picks for M = T K rows (T = 1..4096); the W4A16 GEMM too, at g = 128 where it divides H and I, else at
    g = 64 (gpt-oss's H = I = 2880), which refuses g = 128 with the reason."""
    assert routing.supports(experts, top_k) == (True, "ok")
    assert routing.supports(experts, 8) == (True, "ok")
    assert grouped_gemm.supports(BF16, experts, hidden, inter) == (True, "ok")
    for tokens in (1, 16, 256, 4096):
        rows = tokens * top_k
        for gated, n_out, k_dim in ((True, 2 * inter, hidden), (False, hidden, inter)):
            config = choose_tile_config(rows, experts, n_out)
            ok, reason = grouped_gemm.GroupedGemmSm90.supports(gated=gated, n_out=n_out, k_dim=k_dim,
                                                               num_experts=experts, config=config)
            assert ok, (tokens, gated, reason)
    ok, reason = w4a16_gemm.supports(experts, hidden, inter, 128)
    group_size = 128
    if hidden % 128 or inter % 128:
        assert not ok and "group size 128" in reason
        group_size = 64
        ok, reason = w4a16_gemm.supports(experts, hidden, inter, group_size)
    assert ok, reason
    for tokens in (1, 16, 256, 4096):
        for gated, n_out, k_dim in ((True, 2 * inter, hidden), (False, hidden, inter)):
            config = choose_w4a16_tile(tokens * top_k, experts, n_out, k_dim, 132, group_size, gated)
            ok, reason = w4a16_gemm.W4A16GroupedGemmSm90.supports(gated=gated, n_out=n_out, k_dim=k_dim,
                                                                  num_experts=experts, group_size=group_size,
                                                                  config=config)
            assert ok, (tokens, gated, config, reason)


def test_cute_backend_graphs_the_variants_it_routes(caplog):
    """CuteOps.graph_safe: a routing variant the selection step takes no longer keeps a layer out of CUDA graphs
    (the experts in the kernel layout); one it refuses still does. On CPU tensors route() falls back to the
    reference with the reason logged."""
    import logging

    from light_moe.ops.backend import ReferenceOps
    from light_moe.ops.cute_backend import CuteOps

    ops = CuteOps()
    experts, hidden, inter = 256, 128, 64
    w13, w2 = ops.prepare_expert_weights(torch.zeros(experts, 2 * inter, hidden, dtype=BF16),
                                         torch.zeros(experts, hidden, inter, dtype=BF16))
    gate = torch.zeros(experts, hidden, dtype=BF16)
    assert ops.graph_safe(gate, 8, w13, w2)
    assert ops.graph_safe(gate, 8, w13, w2, spec=V3)
    assert ops.graph_safe(gate.float(), 8, w13, w2, spec=V3)  # an fp32 gate: the 3xTF32 GEMM
    assert ops.graph_safe(gate, 8, w13, w2, spec=V2) and ops.graph_safe(gate, 8, w13, w2, spec=GPT_OSS)
    assert not ops.graph_safe(gate, 8, w13, w2, spec=RouterConfig(scoring="sigmoid", n_group=32, topk_group=4))
    assert not ops.graph_safe(gate, 8, torch.zeros(1), w2, spec=V3)  # experts not in the kernel layout

    torch.manual_seed(0)
    x, gate = torch.randn(8, 64), torch.randn(16, 64)
    spec = RouterConfig(scoring="sigmoid", n_group=4, topk_group=2, group_score="top2_sum", correction_bias=True,
                        routed_scaling_factor=2.5)
    bias = torch.randn(16) * 0.1
    with caplog.at_level(logging.WARNING):
        got = ops.route(x, gate, 4, True, spec=spec, correction_bias=bias)
    expected = ReferenceOps().route(x, gate, 4, True, spec=spec, correction_bias=bias)
    for a, b in zip(got[:3], expected[:3]):
        assert torch.equal(a, b)
    assert "not a CUDA device" in caplog.text
