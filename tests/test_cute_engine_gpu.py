"""The whole engine on the CuTe backend (H100/H200, bf16) against the reference backend, and CUDA-graph
decode against eager decode. Tokens must agree; a divergence is accepted only where it is a near-tie:
the reference's margin between the two tokens is within the measured logit difference of the two
paths at that position (bf16 rounding in a different order can flip only such a choice). CuTe against the
reference runs with the reference's expert choices forced on the CuTe engine (assert_agree_with_forced_routing):
a tiny random model routes with near-ties inside bf16 rounding, and one flipped expert choice at an earlier
token moves later logits far beyond that noise.
"""
import pytest
import torch

from light_moe import LightMoEEngine, SamplingParams
from tests.test_fidelity import engine_prefill_logits
from tests.tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.gpu

PROMPTS = [[7, 3, 99], list(range(20, 31)), list(range(100, 157)), list(range(200, 240))]


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def checkpoint(request, tmp_path_factory):
    # kernel-friendly sizes: H and I multiples of 64, head_dim 64 (the attention and rotary kernels take 64 / 128)
    extra = dict(hidden_size=256, intermediate_size=128)
    if request.param == "qwen3_moe":
        extra.update(hidden_size=128, moe_intermediate_size=128, head_dim=64)
    return make_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param), **extra)


def assert_agree(engine_a, engine_b, prompt, tokens_a, tokens_b):
    for i, (a, b) in enumerate(zip(tokens_a, tokens_b)):
        if a != b:
            ids = prompt + tokens_a[:i]
            la = engine_prefill_logits(engine_a, ids)[-1].float()
            lb = engine_prefill_logits(engine_b, ids)[-1].float()
            noise = (la - lb).abs().max().item()
            margin = abs((lb[b] - lb[a]).item())
            assert margin <= 2 * noise, f"token {i}: {a} vs {b}, margin {margin:.4f}, path difference {noise:.4f}"
            return
    assert len(tokens_a) == len(tokens_b)


# router logits of the CuTe path within this fraction of their largest magnitude of the reference's, at every
# layer of every forward (bf16 paths differ by a few 1e-2 at most; a wrong kernel by O(1))
ROUTER_LOGIT_TOL = 0.1


class RouteTrace:
    """Wraps engine.ops.route (eager engines only: a CUDA graph replays without Python). Keeps, per call, the
    router logits (fp32, from the router input and the gate weight) and the sorted top-k expert ids; with
    `forced` (another trace's calls, in the same order) the engine then uses those ids instead of its own,
    weighted by its own router probabilities, so both engines route alike and stay in lockstep. Softmax routers:
    Mixtral's and DeepSeek-V2's ungrouped one (softmax, then the top-k) and gpt-oss's (gate bias, softmax over the
    top-k logits)."""

    def __init__(self, engine, forced: list | None = None):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.own_ids: list[torch.Tensor] = []
        route = engine.ops.route

        def traced(x, gate_weight, top_k, renormalize, counts_out=None, **variant):
            weights, ids, counts, metadata = route(x, gate_weight, top_k, renormalize, counts_out, **variant)
            spec = variant.get("spec")
            # the near-tie check ranks by logits: only routers whose choice is monotone in them
            if spec is not None and (spec.scoring == "sigmoid" or spec.n_group > 1 or spec.correction_bias):
                raise NotImplementedError(f"forced routing for the {spec} router")
            logits = x.float() @ gate_weight.float().t()
            if variant.get("gate_bias") is not None:  # gpt-oss: logits + bias, softmax over the top-k
                logits = logits + variant["gate_bias"].float()
            self.own_ids.append(ids.detach().to("cpu", torch.int64).sort(-1).values)
            if forced is None:
                self.calls.append((logits.cpu(), self.own_ids[-1]))
                return weights, ids, counts, metadata
            fids = forced[len(self.calls)][1].to(ids.device)
            self.calls.append((logits.cpu(), forced[len(self.calls)][1]))
            if spec is not None and spec.scoring == "softmax_topk":  # the softmax of the chosen logits
                probs = torch.softmax(logits.gather(1, fids), -1)
            else:  # Mixtral, DeepSeek-V2: the softmax over every expert, gathered (ops/reference.py spec_router)
                probs = torch.softmax(logits, -1).gather(1, fids)
                if renormalize:
                    probs = probs / (probs.sum(-1, keepdim=True) + (0.0 if spec is None else 1e-20))
            if spec is not None:
                probs = probs * spec.routed_scaling_factor
            counts = torch.bincount(fids.flatten(), minlength=gate_weight.shape[0]).to(counts.dtype)
            if counts_out is not None:
                counts = counts_out.copy_(counts)
            return probs.to(weights.dtype), fids.to(ids.dtype).contiguous(), counts, None

        engine.ops.route = traced


def assert_agree_with_forced_routing(ref, cute, prompt, max_tokens):
    """One prompt alone: the reference engine's greedy run, routing recorded; then the CuTe engine's, routed
    with the reference's expert choices (a routing near-tie flipped by bf16 rounding would otherwise move a
    tiny random model's logits by more than 1: BENCHMARKS.md "Whole model at the bound"). Every forward's router
    logits (which see attention, norms and GEMMs of all earlier steps) agree within ROUTER_LOGIT_TOL; where the
    CuTe router's own choice differs, the reference's k-th / (k+1)-th gap lies within the two paths' logit
    difference (a near-tie); the tokens agree up to a near-tie (assert_agree)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    ref_trace = RouteTrace(ref)
    ta = ref.generate_outputs([prompt], params)[0].token_ids
    del ref.ops.route  # back to the class's method
    cute_trace = RouteTrace(cute, forced=ref_trace.calls)
    tb = cute.generate_outputs([prompt], params)[0].token_ids
    del cute.ops.route
    # the forced run's KV (another routing than the engine's own) must not serve a later prompt from the prefix
    # cache: the gpt-oss graph-vs-eager check tripped on exactly that (scripts/diagnose_graph_divergence.py)
    assert ref.reset_prefix_cache() and cute.reset_prefix_cache()
    first = next((i for i, (a, b) in enumerate(zip(ta, tb)) if a != b), len(ta))
    # forward f produces token f: forwards 0..first saw the same tokens
    check_forced_routes(ref_trace, cute_trace, len(ref.model.moe_blocks()), first)
    assert_agree(ref, cute, prompt, ta, tb)


def check_forced_routes(ref_trace: RouteTrace, cute_trace: RouteTrace, layers: int, last_forward: int) -> None:
    """Forwards 0..last_forward of a forced run: every router call's logits within ROUTER_LOGIT_TOL of the
    reference's; where the CuTe router's own choice differs, the reference's k-th / (k+1)-th gap lies within the
    two paths' logit difference (a near-tie)."""
    for n, ((ga, ia), (gb, _), own) in enumerate(zip(ref_trace.calls, cute_trace.calls, cute_trace.own_ids)):
        if n // layers > last_forward:
            break
        diff = (ga - gb).abs().max().item()
        scale = ga.abs().max().item()
        where = f"forward {n // layers} layer {n % layers}"
        assert diff <= ROUTER_LOGIT_TOL * scale, f"{where}: router logits differ by {diff:.4f} (scale {scale:.4f})"
        for row in (own != ia).any(-1).nonzero().flatten().tolist():
            top = ga[row].sort(descending=True).values
            k = ia.shape[1]
            row_diff = (ga[row] - gb[row]).abs().max().item()
            assert top[k - 1] - top[k] <= 2 * row_diff + 1e-6, f"{where} row {row}: a routing flip without a near-tie"


def prefill_logits_with_forced_routing(ref, cute, prompt) -> tuple[torch.Tensor, torch.Tensor]:
    """Every position's logits of one prompt's prefill (eager forwards, tests/test_fidelity.engine_prefill_logits)
    on the reference engine and on the CuTe engine routed with the reference's expert choices, router logits
    checked (check_forced_routes): the two paths' logit difference without the routing near-ties of a tiny
    random model (one flipped expert of one position moves its logits, and later positions', by O(1)).
    -> (reference, CuTe) float32 [N, V]."""
    ref_trace = RouteTrace(ref)
    want = engine_prefill_logits(ref, prompt).float()
    del ref.ops.route
    cute_trace = RouteTrace(cute, forced=ref_trace.calls)
    got = engine_prefill_logits(cute, prompt).float()
    del cute.ops.route
    check_forced_routes(ref_trace, cute_trace, len(ref.model.moe_blocks()), 0)
    return want, got


@pytest.mark.skipif(not _sm90(), reason="CuTe kernels need sm_90")
def test_cute_backend_matches_reference(checkpoint):
    common = dict(dtype="bfloat16", device="cuda", show_progress=False, kv_cache_memory_bytes=64 << 20,
                  enforce_eager=True, async_scheduling=False)
    ref = LightMoEEngine(checkpoint, moe_backend="reference", **common)
    cute = LightMoEEngine(checkpoint, moe_backend="cute", **common)
    assert cute.ops.name == "cute"
    for prompt in PROMPTS:
        assert_agree_with_forced_routing(ref, cute, prompt, 32)


@pytest.mark.skipif(not _sm90(), reason="CuTe kernels need sm_90")
def test_skinny_gemm_engine_matches_reference(checkpoint, monkeypatch):
    """--skinny-gemm: the attention projections' decode rows on kernels/skinny_gemm.py; eager, the tokens as the
    reference's under forced routing; then CUDA-graph decode against eager. The kernel must actually run."""
    from light_moe.kernels import skinny_gemm

    calls = []
    real = skinny_gemm.skinny_linear

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(skinny_gemm, "skinny_linear", counted)
    common = dict(dtype="bfloat16", device="cuda", show_progress=False, kv_cache_memory_bytes=64 << 20,
                  async_scheduling=False)
    ref = LightMoEEngine(checkpoint, moe_backend="reference", enforce_eager=True, **common)
    eager = LightMoEEngine(checkpoint, moe_backend="cute", skinny_gemm=True, enforce_eager=True, **common)
    assert eager.ops.skinny_gemm
    for prompt in PROMPTS:
        assert_agree_with_forced_routing(ref, eager, prompt, 16)
    assert calls and max(calls) <= skinny_gemm.MAX_M  # decode rows only
    graphs = LightMoEEngine(checkpoint, moe_backend="cute", skinny_gemm=True, **common)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    out_e = eager.generate_outputs(PROMPTS, params)
    out_g = graphs.generate_outputs(PROMPTS, params)
    assert graphs.runner.decode_graphs is not None and len(graphs.runner.decode_graphs.graphs) > 0
    for prompt, a, b in zip(PROMPTS, out_e, out_g):
        assert_agree(eager, graphs, prompt, a.token_ids, b.token_ids)


@pytest.mark.skipif(not _sm90(), reason="CuTe kernels need sm_90")
def test_fuse_combine_norm_changes_no_token(checkpoint, monkeypatch):
    """--fuse-combine-norm: each MoE layer's combine runs inside the next norm (kernels/rms_norm.py's combine
    prologue, bit-identical to the two kernels it replaces), so eager and CUDA-graph engines with it give the tokens
    of the same engines without it; the fused kernel really ran."""
    from light_moe.kernels import rms_norm

    calls = []
    real = rms_norm.combine_rms_norm

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(rms_norm, "combine_rms_norm", counted)
    common = dict(dtype="bfloat16", device="cuda", show_progress=False, kv_cache_memory_bytes=64 << 20,
                  async_scheduling=False, moe_backend="cute")
    params = SamplingParams(max_tokens=24, temperature=0.0)
    for eager in (True, False):
        plain = LightMoEEngine(checkpoint, enforce_eager=eager, fuse_combine_norm=False, **common)
        fused = LightMoEEngine(checkpoint, enforce_eager=eager, **common)  # on by default
        before = len(calls)
        out_p = plain.generate_outputs(PROMPTS, params)
        assert len(calls) == before  # off when asked
        out_f = fused.generate_outputs(PROMPTS, params)
        assert len(calls) > before  # eager forwards, or the captures of the graphs
        assert "combine + RMSNorm" not in {op for op, _ in fused.ops._logged}
        for prompt, a, b in zip(PROMPTS, out_p, out_f):
            assert_agree(plain, fused, prompt, a.token_ids, b.token_ids)


@pytest.mark.skipif(not _sm90(), reason="CuTe kernels need sm_90")
def test_fuse_attention_merge_changes_no_token(checkpoint, monkeypatch):
    """--fuse-attention-merge: decode attention's splits merged by the last split CTA, the combine kernel's code on
    the same partials, so eager and CUDA-graph engines with it give exactly the tokens of the same engines without
    it; a prompt of 200 tokens makes the decode steps split (and the merge in the kernel really ran)."""
    from light_moe.kernels import decode_attention

    keys = []
    real = decode_attention._compiled_fn

    def recorded(key):
        keys.append(key)
        return real(key)

    monkeypatch.setattr(decode_attention, "_compiled_fn", recorded)
    common = dict(dtype="bfloat16", device="cuda", show_progress=False, kv_cache_memory_bytes=64 << 20,
                  async_scheduling=False, moe_backend="cute")
    params = SamplingParams(max_tokens=24, temperature=0.0)
    prompts = PROMPTS + [[(13 * i) % 250 + 3 for i in range(200)]]
    for eager in (True, False):
        plain = LightMoEEngine(checkpoint, enforce_eager=eager, fuse_attention_merge=False, **common)
        fused = LightMoEEngine(checkpoint, enforce_eager=eager, **common)  # on by default
        out_p = plain.generate_outputs(prompts, params)
        assert not any(key[-1] for key in keys)  # off when asked
        out_f = fused.generate_outputs(prompts, params)
        assert any(key[-1] for key in keys)  # split steps merged in the kernel (eager, or the graphs' captures)
        assert not fused.ops._merge_counters[torch.device("cuda", torch.cuda.current_device())].any()
        for a, b in zip(out_p, out_f):
            assert a.token_ids == b.token_ids
        keys.clear()


@pytest.mark.skipif(not _sm90(), reason="CuTe kernels need sm_90")
def test_cuda_graph_decode_matches_eager(checkpoint):
    params = SamplingParams(max_tokens=40, temperature=0.0)
    common = dict(dtype="bfloat16", device="cuda", show_progress=False, kv_cache_memory_bytes=64 << 20,
                  moe_backend="cute")
    sync = dict(async_scheduling=False)
    eager = LightMoEEngine(checkpoint, enforce_eager=True, **sync, **common)
    graphs = LightMoEEngine(checkpoint, **sync, **common)
    assert graphs.runner.decode_graphs is not None and eager.runner.decode_graphs is None
    out_e = eager.generate_outputs(PROMPTS, params)
    out_g = graphs.generate_outputs(PROMPTS, params)
    assert len(graphs.runner.decode_graphs.graphs) > 0  # decode really replayed graphs
    for prompt, a, b in zip(PROMPTS, out_e, out_g):
        assert_agree(eager, graphs, prompt, a.token_ids, b.token_ids)
    # batch sizes that need padding (3 -> bucket 4) and a second run reusing captured graphs
    again = graphs.generate_outputs(PROMPTS[:3], params)
    for prompt, a, b in zip(PROMPTS, out_e, again):
        assert_agree(eager, graphs, prompt, a.token_ids, b.token_ids)
    # async output processing / async scheduling: the graphs' tokens, one step later (async scheduling: the
    # decode graphs' input ids filled on the device from the last step's sampled tokens). bf16: a wasted row
    # of an ended request changes the next batch's shape, so near-ties are allowed as above
    graphs.shutdown()
    for flags in (dict(async_output_processing=True, **sync), dict(async_scheduling=True)):  # both name the key
        lagged = LightMoEEngine(checkpoint, **flags, **common)
        out_a = lagged.generate_outputs(PROMPTS, params)
        assert len(lagged.runner.decode_graphs.graphs) > 0
        for prompt, a, b in zip(PROMPTS, out_e, out_a):
            assert_agree(eager, lagged, prompt, a.token_ids, b.token_ids)
        if flags["async_scheduling"]:
            assert lagged.stats["steps_ahead"] > lagged.stats["steps"] // 2
        lagged.shutdown()


@pytest.mark.skipif(not _sm90(), reason="CuTe kernels need sm_90")
def test_w4a16_cute_backend_matches_the_dequantising_reference(checkpoint):
    """Same RTN-quantized experts on both sides: the W4A16 kernel against the reference that
    dequantises per expert (eager, the reference's routing forced); then CUDA-graph decode on the CuTe side
    against eager."""
    from light_moe.kernels.w4a16_layout import W4A16Weights

    common = dict(dtype="bfloat16", device="cuda", show_progress=False, kv_cache_memory_bytes=64 << 20,
                  quantization="w4a16", async_scheduling=False)
    ref = LightMoEEngine(checkpoint, moe_backend="reference", enforce_eager=True, **common)
    eager = LightMoEEngine(checkpoint, moe_backend="cute", enforce_eager=True, **common)
    assert all(isinstance(b.prepared[0], W4A16Weights) for b in eager.model.moe_blocks())
    for prompt in PROMPTS:
        assert_agree_with_forced_routing(ref, eager, prompt, 24)
    graphs = LightMoEEngine(checkpoint, moe_backend="cute", **common)
    assert graphs.runner.decode_graphs is not None
    params = SamplingParams(max_tokens=24, temperature=0.0)
    out_e = eager.generate_outputs(PROMPTS, params)
    out_g = graphs.generate_outputs(PROMPTS, params)
    assert len(graphs.runner.decode_graphs.graphs) > 0
    for prompt, a, b in zip(PROMPTS, out_e, out_g):
        assert_agree(eager, graphs, prompt, a.token_ids, b.token_ids)


@pytest.mark.skipif(not _sm90(), reason="CuTe kernels need sm_90")
def test_w4a16_direct_decode_kernel_matches_the_dequantising_reference(checkpoint, monkeypatch):
    """w4a16_decode_kernel="direct": decode steps' experts on kernels/w4a16_direct.py (it must really run: a
    compiled direct config), against the dequantising reference with its routing forced (eager), then CUDA-graph
    decode against eager. The tiny checkpoints' projections have far fewer units than a wave of CTAs, so the
    wave rule (DIRECT_MIN_WAVES) is off here: the engine path through the kernel is what is tested."""
    from light_moe.kernels import tile_config, w4a16_gemm
    from light_moe.kernels.tile_config import direct_tile

    monkeypatch.setattr(tile_config, "DIRECT_MIN_WAVES", 0.0)

    common = dict(dtype="bfloat16", device="cuda", show_progress=False, kv_cache_memory_bytes=64 << 20,
                  quantization="w4a16", async_scheduling=False, w4a16_decode_kernel="direct")
    ref = LightMoEEngine(checkpoint, moe_backend="reference", enforce_eager=True, **common)
    eager = LightMoEEngine(checkpoint, moe_backend="cute", enforce_eager=True, **common)
    assert eager.ops.w4a16_decode_kernel == "direct"
    w13, w2 = eager.model.moe_blocks()[0].prepared[:2]
    if direct_tile(w13.k_dim, w13.group_size, True) is None and direct_tile(w2.k_dim, w2.group_size, False) is None:
        pytest.skip(f"neither projection's K ({w13.k_dim}, {w2.k_dim}) splits into whole groups of "
                    f"{w13.group_size} over 2+ warps")
    for prompt in PROMPTS:
        assert_agree_with_forced_routing(ref, eager, prompt, 24)
    assert any(key[5].direct_warps for key in w4a16_gemm._compiled.keys()), "no decode step took the direct kernel"
    graphs = LightMoEEngine(checkpoint, moe_backend="cute", **common)
    params = SamplingParams(max_tokens=24, temperature=0.0)
    out_e = eager.generate_outputs(PROMPTS, params)
    out_g = graphs.generate_outputs(PROMPTS, params)
    for prompt, a, b in zip(PROMPTS, out_e, out_g):
        assert_agree(eager, graphs, prompt, a.token_ids, b.token_ids)


@pytest.mark.skipif(not _sm90(), reason="CuTe kernels need sm_90")
def test_piecewise_prefill_graphs_match_eager(checkpoint):
    """Prefill and mixed steps replayed from piecewise graphs (executor/prefill_graphs.py: pieces split at the
    eager attention) against the eager engine: whole prompts in one step, prompts chunked over several steps
    (a small token budget), and decodes sharing steps with prefill chunks; a second round reuses the graphs
    with other token counts in the same buckets."""
    params = SamplingParams(max_tokens=24, temperature=0.0)
    # no prefix cache: a second round would otherwise reuse KV one engine computed in the first under another
    # batch (and the eager engine its own, the graph engine fresh ones), a path difference that is not the
    # graphs'; both engines chunk alike (one budget), so what differs is the graphs alone
    common = dict(dtype="bfloat16", device="cuda", show_progress=False, kv_cache_memory_bytes=64 << 20,
                  moe_backend="cute", async_scheduling=False, enable_prefix_caching=False)
    for budget in (2048, 48):  # 48: the 57-token prompt is chunked, other requests decode beside it
        eager = LightMoEEngine(checkpoint, enforce_eager=True, max_num_batched_tokens=budget, **common)
        graphs = LightMoEEngine(checkpoint, max_num_batched_tokens=budget, **common)
        assert graphs.runner.prefill_graphs is not None and eager.runner.prefill_graphs is None
        out_e = eager.generate_outputs(PROMPTS, params)
        out_g = graphs.generate_outputs(PROMPTS, params)
        assert graphs.runner.prefill_graphs.captured, "no prefill step was replayed from graphs"
        fallbacks = {op for op, _ in graphs.ops._logged}
        assert not fallbacks & {"decode attention", "prefill attention", "rotary + KV write", "RMSNorm"}, fallbacks
        for prompt, a, b in zip(PROMPTS, out_e, out_g):
            assert_agree(eager, graphs, prompt, a.token_ids, b.token_ids)
        shorter = [p[: max(1, len(p) - 5)] for p in PROMPTS]
        for prompt, a, b in zip(shorter, eager.generate_outputs(shorter, params),
                                graphs.generate_outputs(shorter, params)):
            assert_agree(eager, graphs, prompt, a.token_ids, b.token_ids)
        graphs.shutdown()
        eager.shutdown()


@pytest.mark.skipif(not _sm90(), reason="CuTe kernels need sm_90")
def test_warmup_graphs_capture_at_start(checkpoint):
    """warmup_graphs: every prefill token bucket and every decode batch bucket (at the context bucket of a full
    token budget) captured before the first request; generating afterwards captures no prefill bucket again and
    gives the tokens of an engine that captures on first use."""
    params = SamplingParams(max_tokens=24, temperature=0.0)
    common = dict(dtype="bfloat16", device="cuda", show_progress=False, kv_cache_memory_bytes=64 << 20,
                  moe_backend="cute", async_scheduling=False, max_num_batched_tokens=256)
    warm = LightMoEEngine(checkpoint, warmup_graphs=True, **common)
    prefill, decode = warm.runner.prefill_graphs, warm.runner.decode_graphs
    assert sorted(prefill.captured) == list(prefill.buckets)
    assert {(b, 16, None) for b in decode.batch_buckets} <= set(decode.graphs)  # 256 tokens = 16 blocks
    captured = dict(prefill.captured)
    cold = LightMoEEngine(checkpoint, **common)
    out_w = warm.generate_outputs(PROMPTS, params)
    out_c = cold.generate_outputs(PROMPTS, params)
    assert all(prefill.captured[t] is captured[t] for t in captured)  # replayed, not captured again
    for prompt, a, b in zip(PROMPTS, out_c, out_w):
        assert_agree(cold, warm, prompt, a.token_ids, b.token_ids)


@pytest.mark.skipif(not _sm90(), reason="CuTe kernels need sm_90")
def test_w4a16_prefetch_down_changes_no_token(checkpoint, monkeypatch):
    """w4a16_prefetch_down (the direct up kernel's L2 prefetch of the down weights) is a hint: the same tokens as
    without it, CUDA-graph decode, and the prefetching kernel really ran (the wave rule is off as above)."""
    from light_moe.kernels import tile_config, w4a16_gemm

    monkeypatch.setattr(tile_config, "DIRECT_MIN_WAVES", 0.0)
    common = dict(dtype="bfloat16", device="cuda", show_progress=False, kv_cache_memory_bytes=64 << 20,
                  quantization="w4a16", moe_backend="cute", w4a16_decode_kernel="direct")
    plain = LightMoEEngine(checkpoint, **common)
    w13 = plain.model.moe_blocks()[0].prepared[0]
    if tile_config.direct_tile(w13.k_dim, w13.group_size, True) is None:
        pytest.skip(f"the up projection's K ({w13.k_dim}) does not split into whole groups of {w13.group_size}")
    prefetching = LightMoEEngine(checkpoint, w4a16_prefetch_down=True, **common)
    assert prefetching.ops.w4a16_prefetch_down
    params = SamplingParams(max_tokens=24, temperature=0.0)
    for prompt, a, b in zip(PROMPTS, plain.generate_outputs(PROMPTS, params),
                            prefetching.generate_outputs(PROMPTS, params)):
        assert a.token_ids == b.token_ids, prompt
    assert any(len(key) > 6 and type(key[-1]).__name__ == "NextPrefetch" for key in w4a16_gemm._compiled.keys()), \
        "no decode step took the prefetching up kernel"


@pytest.mark.skipif(not _sm90(), reason="CuTe kernels need sm_90")
def test_w4a16_fused_decode_changes_no_token(checkpoint, monkeypatch):
    """w4a16_fused_decode (up and down in one launch at decode): with the wave rule off both engines run the direct
    kernel's units, so the tokens are the same as with two launches; CUDA-graph decode; the fused kernel really ran."""
    from light_moe.kernels import tile_config, w4a16_fused

    monkeypatch.setattr(tile_config, "DIRECT_MIN_WAVES", 0.0)
    common = dict(dtype="bfloat16", device="cuda", show_progress=False, kv_cache_memory_bytes=64 << 20,
                  quantization="w4a16", moe_backend="cute", w4a16_decode_kernel="direct")
    plain = LightMoEEngine(checkpoint, **common)
    w13, w2 = plain.model.moe_blocks()[0].prepared[:2]
    config = w4a16_fused.fused_config(2, w13, w2)
    if config is None:
        pytest.skip(f"no fused tile for H {w13.k_dim}, I {w2.k_dim}, g {w13.group_size}")
    # two launches sum in the same order only where each projection's own direct tile has the fused tile's warps
    same_order = all(getattr(tile_config.direct_tile(w.k_dim, w.group_size, gated), "direct_warps", 0)
                     == config.direct_warps for w, gated in ((w13, True), (w2, False)))
    fused = LightMoEEngine(checkpoint, w4a16_fused_decode=True, **common)
    assert fused.ops.w4a16_fused_decode
    params = SamplingParams(max_tokens=24, temperature=0.0)
    for prompt, a, b in zip(PROMPTS, plain.generate_outputs(PROMPTS, params), fused.generate_outputs(PROMPTS, params)):
        if same_order:
            assert a.token_ids == b.token_ids, prompt
        else:
            assert_agree(plain, fused, prompt, a.token_ids, b.token_ids)
    assert len(w4a16_fused._compiled) > 0, "no decode step took the fused kernel"
