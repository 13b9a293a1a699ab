"""--fuse-combine-norm on the CPU reference ops: a MoE layer on one process hands the next norm a PendingCombine
(its rows not yet combined; the shared expert's output as the addend) and the norm runs combine_rms_norm. The
reference op is combine (+ addend) then the same rms_norm, so every family's forward must give bit-identical
hidden states, logits and greedy tokens with and without it; and the deferred path must really be taken. The
CuTe kernel (kernels/rms_norm.py combine prologue) is checked on the GPU in
tests/kernels/test_fused_norm_rope_gpu.py and tests/test_cute_engine_gpu.py."""
import pytest
import torch

from light_moe import LightMoEEngine, SamplingParams
from light_moe.layers.norm import RMSNorm
from light_moe.ops.backend import MoEOps, PendingCombine, ReferenceOps
from light_moe.ops.select import select_backend
from tests.tiny_models import make_tiny_checkpoint

PROMPTS = [[1, 5, 9, 2, 7, 3], [4, 4, 8, 15, 16, 23, 42, 11, 3]]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "olmoe"])
def test_same_logits_and_tokens_with_the_combine_in_the_norm(family, tmp_path):
    path = make_tiny_checkpoint(family, tmp_path)
    common = dict(dtype="float32", device="cpu", show_progress=False, kv_cache_memory_bytes=16 << 20,
                  enable_prefix_caching=False)
    plain = LightMoEEngine(path, fuse_combine_norm=False, **common)
    fused = LightMoEEngine(path, **common)  # the engine's default
    assert fused.ops.fuse_combine_norm and not plain.ops.fuse_combine_norm
    calls = []
    real = fused.ops.combine_rms_norm

    def counted(pending, residual, weight, eps):
        calls.append(pending.extra is not None)
        return real(pending, residual, weight, eps)

    fused.ops.combine_rms_norm = counted
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=True)
    for prompt in PROMPTS:
        a = plain.generate_outputs([prompt], params)[0]
        b = fused.generate_outputs([prompt], params)[0]
        assert a.token_ids == b.token_ids
        assert a.logprobs == b.logprobs  # bit-identical: the same ops in the same order
    moe_layers = len(fused.model.moe_blocks())
    assert len(calls) >= moe_layers * 8 * len(PROMPTS)  # every MoE layer's output, every forward
    has_shared = fused.model.moe_blocks()[0].shared_expert is not None
    assert all(extra == has_shared for extra in calls)


def test_experts_defer_the_combine_only_when_asked():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=gen)
    w13, w2 = torch.randn(4, 2 * 8, 16, generator=gen), torch.randn(4, 16, 8, generator=gen)
    ops = MoEOps()
    weights, ids, _, _ = ops.route(x, torch.randn(4, 16, generator=gen), 2, True)
    combined = ops.experts(x, weights, ids, w13, w2)
    pending = ops.experts(x, weights, ids, w13, w2, defer_combine=True)
    assert isinstance(pending, PendingCombine) and pending.extra is None and pending.y.shape == (10, 16)
    assert torch.equal(ops.combine(pending.y, pending.reverse_index, pending.topk_weights), combined)
    residual, weight = torch.randn(5, 16, generator=gen), torch.rand(16, generator=gen)
    extra = torch.randn(5, 16, generator=gen)
    h, s = ops.combine_rms_norm(pending._replace(extra=extra), residual.clone(), weight, 1e-6)
    want_h, want_s = ops.rms_norm(combined + extra, weight, 1e-6, residual.clone())
    assert torch.equal(h, want_h) and torch.equal(s, want_s)


def test_a_pending_combine_needs_the_residual_and_the_option_reaches_every_backend():
    pending = PendingCombine(torch.zeros(2, 8), torch.arange(2, dtype=torch.int32), torch.ones(2, 1))
    norm = RMSNorm(8, 1e-6, ops=ReferenceOps())
    with pytest.raises(ValueError, match="residual"):
        norm(pending)
    h, s = norm(pending, torch.ones(2, 8))
    assert torch.equal(s, torch.ones(2, 8)) and h.shape == (2, 8)
    ops, _ = select_backend("reference", torch.device("cpu"), fuse_combine_norm=True)
    assert ops.fuse_combine_norm and not select_backend("auto", torch.device("cpu"))[0].fuse_combine_norm
