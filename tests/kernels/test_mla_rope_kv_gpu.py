"""kernels/mla_rope_kv.py on the GPU (H100 / H200) against ops/reference.py mla_rope_write: fresh random inputs,
both rotary layouts, DeepSeek's shapes and the tiny test models', k_pe a strided column slice of the fused
kv_a output as the layer passes it; bf16 / fp16 bit for bit (the kernel rounds as the reference's ops do), fp32
within 1e-6; NaN-poisoned outputs (q_out guard rows, the written cache slots) and untouched slots checked; a CUDA
graph replayed on new inputs."""
import pytest
import torch

from light_moe.ops import reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="CuTe kernels need sm_90")]

# (h, Dn, R, L)
SHAPES = {"v2_lite": (16, 128, 64, 512), "v3": (128, 128, 64, 512), "tiny": (4, 16, 8, 32)}


class Problem:
    def __init__(self, tokens, h, nope, rope, lat, dtype, block_size=16, positions=512, seed=0):
        gen = torch.Generator(device="cuda").manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=gen, device="cuda").to(dtype)

        self.q = randn(tokens, h, nope + rope)
        self.latent = randn(tokens, lat)
        self.kv_a = randn(tokens, lat + rope)  # the fused kv_a output; k_pe is its last R columns
        self.k_pe = self.kv_a[:, lat:]
        inv = 1.0 / (10000 ** (torch.arange(0, rope, 2, device="cuda").float() / rope))
        freqs = torch.outer(torch.arange(positions, device="cuda").float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = (emb.cos() * 0.9).contiguous(), (emb.sin() * 0.9).contiguous()  # a YaRN-like mscale
        self.positions = torch.randint(0, positions, (tokens,), generator=gen, device="cuda")
        blocks = tokens // block_size + 3
        self.cache = randn(blocks, block_size, lat + rope)
        self.slots = torch.randperm(blocks * block_size, generator=gen, device="cuda")[:tokens]

    def reference(self, interleave):
        cache = self.cache.clone()
        q = reference.mla_rope_write(self.q, self.latent, self.k_pe, self.positions, self.cos, self.sin, cache,
                                     self.slots, interleave)
        return q, cache

    def poison(self):
        self.cache.view(-1, self.cache.shape[-1])[self.slots] = float("nan")


def _close(got, want, dtype, what):
    assert not got.isnan().any(), f"{what}: NaN (an element was not written)"
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=what)
    else:
        assert torch.equal(got, want), f"{what}: max diff {(got.float() - want.float()).abs().max().item():.3e}"


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("tokens", [1, 7, 64])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mla_rope_write_matches_reference(dtype, shape, tokens, interleave):
    from light_moe.kernels import mla_rope_kv

    h, nope, rope, lat = SHAPES[shape]
    if not mla_rope_kv.supports(dtype, h, nope, rope, lat)[0]:
        pytest.skip(mla_rope_kv.supports(dtype, h, nope, rope, lat)[1])
    prob = Problem(tokens, h, nope, rope, lat, dtype, seed=tokens + h)
    want_q, want_cache = prob.reference(interleave)
    untouched = torch.ones(prob.cache.shape[0] * prob.cache.shape[1], dtype=torch.bool, device="cuda")
    untouched[prob.slots] = False
    before = prob.cache.view(-1, lat + rope)[untouched].clone()
    prob.poison()
    guard = torch.full((tokens + 2, h, nope + rope), float("nan"), dtype=dtype, device="cuda")
    got_q = mla_rope_kv.mla_rope_write(prob.q, prob.latent, prob.k_pe, prob.positions, prob.cos, prob.sin,
                                       prob.cache, prob.slots, interleave, q_out=guard[1:-1])
    torch.cuda.synchronize()
    label = f"{shape} {dtype} N={tokens} interleave={interleave}"
    _close(got_q, want_q, dtype, f"q {label}")
    _close(prob.cache.view(-1, lat + rope)[prob.slots], want_cache.view(-1, lat + rope)[prob.slots], dtype,
           f"cache {label}")
    assert guard[0].isnan().all() and guard[-1].isnan().all(), "write outside q_out"
    assert torch.equal(prob.cache.view(-1, lat + rope)[untouched], before), "a slot not in slot_mapping was written"


def test_graph_replay_on_new_inputs():
    from light_moe.kernels import mla_rope_kv

    h, nope, rope, lat = SHAPES["v2_lite"]
    prob = Problem(8, h, nope, rope, lat, torch.bfloat16, seed=3)
    q_out = torch.empty_like(prob.q)
    mla_rope_kv.mla_rope_write(prob.q, prob.latent, prob.k_pe, prob.positions, prob.cos, prob.sin, prob.cache,
                               prob.slots, True, q_out=q_out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mla_rope_kv.mla_rope_write(prob.q, prob.latent, prob.k_pe, prob.positions, prob.cos, prob.sin, prob.cache,
                                   prob.slots, True, q_out=q_out)
    for replay in range(3):
        fresh = Problem(8, h, nope, rope, lat, torch.bfloat16, seed=10 + replay)
        for name in ("q", "latent", "kv_a", "positions", "slots"):
            getattr(prob, name).copy_(getattr(fresh, name))
        want_q, want_cache = prob.reference(True)
        prob.poison()
        q_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _close(q_out, want_q, torch.bfloat16, f"graph replay {replay} q")
        _close(prob.cache.view(-1, lat + rope)[prob.slots], want_cache.view(-1, lat + rope)[prob.slots],
               torch.bfloat16, f"graph replay {replay} cache")


def test_wrapper_rejects_bad_layouts():
    from light_moe.kernels import mla_rope_kv

    h, nope, rope, lat = SHAPES["v2_lite"]
    prob = Problem(4, h, nope, rope, lat, torch.bfloat16)
    args = (prob.positions, prob.cos, prob.sin, prob.cache, prob.slots, True)
    with pytest.raises(ValueError, match="latent_cache rows"):
        mla_rope_kv.mla_rope_write(prob.q, prob.latent[:, :256], prob.k_pe, *args)
    with pytest.raises(ValueError, match="int64"):
        mla_rope_kv.mla_rope_write(prob.q, prob.latent, prob.k_pe, prob.positions.int(), *args[1:])
    with pytest.raises(ValueError, match="16-byte"):
        odd = torch.empty(4, lat + 1, dtype=torch.bfloat16, device="cuda")[:, 1:]
        mla_rope_kv.mla_rope_write(prob.q, odd, prob.k_pe, *args)
