"""GPU tests of the decoder-layer kernels (kernels/rms_norm.py, kernels/rope_kv.py) against plain-PyTorch
references of layers/norm.py and layers/rotary.py + the index_copy KV write: fresh random inputs, NaN-poisoned
outputs with guard rows around them, q/k/v as column slices of one fused qkv buffer, and a CUDA-graph replay
on new inputs.

Tolerances: RMSNorm fp32 relative L2 < 1e-5, bf16/fp16 relative L2 < 1e-2, and each case prints whether it was
bit-identical to the reference (run with -s to see it): its fp32 sum of squares runs in another order than torch's
reduction. RoPE must be bit-identical in every dtype (the same ops with the same rounding, first seen on an H100),
and so must the residual sum and the cache copy of v.
"""
import pytest
import torch

pytest.importorskip("cutlass")

from light_moe.bench.timing import graph_replay  # noqa: E402
from light_moe.kernels import rms_norm, rope_kv  # noqa: E402
from light_moe.layers.rotary import RotaryEmbedding  # noqa: E402

pytestmark = pytest.mark.gpu

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
TOKENS = [1, 7, 300]
EPS = 1e-5
POSITIONS = 4096


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """layers/norm.py RMSNorm in residual-stream form -> (out, new residual or None); nothing in place."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    out = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return out, (x if residual is not None else None)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_write_kv_reference(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    """layers/rotary.py (rotate-half, per-op rounding in the activation dtype) + ops/attention.py write_kv
    (index_copy into the caches' [S, g, D] view); returns rotated q [N, h, D]."""
    n, d = q.shape[0], k_cache.shape[-1]
    c = cos[positions].unsqueeze(1).to(q.dtype)  # [N, 1, D]
    s = sin[positions].unsqueeze(1).to(q.dtype)
    q3, k3 = q.reshape(n, -1, d), k.reshape(n, -1, d)
    q_rot = q3 * c + _rotate_half(q3) * s
    k_rot = k3 * c + _rotate_half(k3) * s
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k_rot)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.reshape(n, -1, d))
    return q_rot


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_close(out: torch.Tensor, ref: torch.Tensor, label: str, exact: bool = False) -> str:
    """Asserts the dtype's tolerance (or equality); returns and prints 'bit-exact' or the mismatch count."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not out.isnan().any(), f"{label}: NaN in the output (an element was not written)"
    if exact:
        differ = (out != ref).sum().item()
        assert differ == 0, f"{label}: {differ} of {out.numel()} elements differ from the reference"
    err = _rel_l2(out, ref)
    if out.dtype == FP32:
        assert err < 1e-5, f"{label}: rel L2 {err:.3g}"
        verdict = f"rel L2 {err:.2g}"
    else:
        assert err < 1e-2, f"{label}: rel L2 {err:.3g}"
        diff = (out.view(torch.int16) != ref.view(torch.int16)).sum().item()
        verdict = "bit-exact" if diff == 0 else f"{diff} of {out.numel()} elements differ, rel L2 {err:.2g}"
    print(f"\n{label}: {verdict}")
    return verdict


def _rows_with_guards(n: int, width: int, dtype, fill: float):
    """A contiguous [n, width] view into a NaN/fill buffer with one guard row before and after it."""
    buf = torch.full((n + 2, width), fill, dtype=dtype, device="cuda")
    return buf, buf[1:n + 1]


NORM_CASES = [(BF16, h, n, r) for h in (4096, 2048, 128, 2880, 8192) for n in TOKENS for r in (False, True)]
NORM_CASES += [(FP32, h, n, r) for h in (4096, 128) for n in TOKENS for r in (False, True)]
NORM_CASES += [(FP16, 2048, 7, True), (BF16, 128, 300 * 32, False)]  # the last: per-head norms [N * heads, D]


@pytest.mark.parametrize("dtype,hidden,tokens,residual", NORM_CASES)
def test_rms_norm_matches_reference(dtype, hidden, tokens, residual):
    gen = torch.Generator(device="cuda").manual_seed(17 * tokens + hidden + residual)
    dev = "cuda"
    if tokens == 7:  # x as a column slice of a wider buffer: a row stride > H
        wide = torch.randn(tokens, hidden + 192, generator=gen, device=dev).to(dtype)
        x = wide[:, 64:64 + hidden]
    else:
        x = (torch.randn(tokens, hidden, generator=gen, device=dev) * 2 + 0.3).to(dtype)
    weight = (1 + 0.2 * torch.randn(hidden, generator=gen, device=dev)).to(dtype)
    res_in = torch.randn(tokens, hidden, generator=gen, device=dev).to(dtype) if residual else None
    ref_out, ref_res = rms_norm_reference(x, weight, EPS, res_in)

    out_buf, out = _rows_with_guards(tokens, hidden, dtype, float("nan"))
    res = None
    if residual:
        res_buf, res = _rows_with_guards(tokens, hidden, dtype, 7.0)
        res.copy_(res_in)
    got = rms_norm.rms_norm(x, weight, EPS, residual=res, out=out)
    torch.cuda.synchronize()
    assert got.data_ptr() == out.data_ptr()
    check_close(out, ref_out, f"rms_norm {dtype} H={hidden} N={tokens} residual={residual}")
    assert out_buf[0].isnan().all() and out_buf[-1].isnan().all(), "write outside out"
    if residual:
        assert torch.equal(res, ref_res), "residual := x + residual must match torch's add exactly"
        assert (res_buf[0] == 7).all() and (res_buf[-1] == 7).all(), "write outside residual"


def test_rms_norm_allocates_out():
    x = torch.randn(5, 4096, device="cuda").to(BF16)
    w = torch.randn(4096, device="cuda").to(BF16)
    out = rms_norm.rms_norm(x, w, EPS)
    assert out.shape == (5, 4096) and out.is_contiguous()
    check_close(out, rms_norm_reference(x, w, EPS)[0], "rms_norm allocating")


# (name, dtype, h, g, D, block_size, theta)
ROPE_CASES = [
    ("mixtral", BF16, 32, 8, 128, 16, 1e6),
    ("qwen3", BF16, 32, 4, 128, 32, 1e6),
    ("mha_d64", BF16, 16, 16, 64, 16, 1e4),
    ("mha_d64_bs32", BF16, 16, 16, 64, 32, 1e4),
    ("mixtral", FP32, 32, 8, 128, 16, 1e6),
    ("mha_d64", FP32, 16, 16, 64, 32, 1e4),
    ("mha_d64", FP16, 16, 16, 64, 16, 1e4),
]


class RopeProblem:
    """Fused qkv and q/k/v slices, tables, a cache with random previous contents, distinct slots."""

    def __init__(self, dtype, h, g, d, block_size, theta, tokens, gen, slack_slots=40):
        dev = "cuda"
        self.h, self.g, self.d, self.dtype = h, g, d, dtype
        rotary = RotaryEmbedding(d, POSITIONS, theta, device=dev)
        self.cos, self.sin = rotary.cos, rotary.sin  # [P, D] fp32
        self.qkv = torch.empty(tokens, (h + 2 * g) * d, dtype=dtype, device=dev)  # [N, (h+2g)*D]
        self.q = self.qkv[:, :h * d]
        self.k = self.qkv[:, h * d:(h + g) * d]
        self.v = self.qkv[:, (h + g) * d:]
        num_blocks = -(-(tokens + slack_slots) // block_size) + 2
        self.k_cache = torch.empty(num_blocks, block_size, g, d, dtype=dtype, device=dev)
        self.v_cache = torch.empty_like(self.k_cache)
        self.positions = torch.empty(tokens, dtype=torch.int64, device=dev)
        self.slots = torch.empty(tokens, dtype=torch.int64, device=dev)
        self.refill(gen)

    def refill(self, gen, reserved: int = 0):
        """New inputs in place (the buffers a CUDA graph captured); slots drawn from [reserved, S)."""
        dev, n = "cuda", self.qkv.shape[0]
        self.qkv.copy_(torch.randn(self.qkv.shape, generator=gen, device=dev) * 2)
        self.k_cache.copy_(torch.randn(self.k_cache.shape, generator=gen, device=dev))
        self.v_cache.copy_(torch.randn(self.v_cache.shape, generator=gen, device=dev))
        self.positions.copy_(torch.randint(0, POSITIONS, (n,), generator=gen, device=dev))
        num_slots = self.k_cache.shape[0] * self.k_cache.shape[1]
        self.slots.copy_(reserved + torch.randperm(num_slots - reserved, generator=gen, device=dev)[:n])

    def reference(self, rows=slice(None)):
        """(rotated q, expected k cache, expected v cache) for the current inputs, rows = the real tokens."""
        k_ref, v_ref = self.k_cache.clone(), self.v_cache.clone()
        q_rot = rope_write_kv_reference(self.q[rows], self.k[rows], self.v[rows], self.positions[rows], self.cos,
                                        self.sin, k_ref, v_ref, self.slots[rows])
        return q_rot, k_ref, v_ref

    def poison_written_slots(self, rows=slice(None)):
        slots = self.slots[rows]
        self.k_cache.view(-1, self.g, self.d)[slots] = float("nan")
        self.v_cache.view(-1, self.g, self.d)[slots] = float("nan")

    def check(self, q_out, q_rot, k_ref, v_ref, label, rows=slice(None)):
        slots = self.slots[rows]
        written = torch.zeros(self.k_cache.shape[0] * self.k_cache.shape[1], dtype=torch.bool, device="cuda")
        written[slots] = True
        k_flat, v_flat = self.k_cache.view(-1, self.g, self.d), self.v_cache.view(-1, self.g, self.d)
        k_ref_flat, v_ref_flat = k_ref.view(-1, self.g, self.d), v_ref.view(-1, self.g, self.d)
        assert torch.equal(k_flat[~written], k_ref_flat[~written]), f"{label}: k cache changed outside its slots"
        assert torch.equal(v_flat[~written], v_ref_flat[~written]), f"{label}: v cache changed outside its slots"
        assert torch.equal(v_flat[slots], v_ref_flat[slots]), f"{label}: v cache rows differ from v"
        check_close(q_out[rows], q_rot, f"{label} q", exact=True)
        check_close(k_flat[slots], k_ref_flat[slots], f"{label} k cache", exact=True)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("name,dtype,h,g,d,block_size,theta", ROPE_CASES)
def test_rope_write_kv_matches_reference(name, dtype, h, g, d, block_size, theta, tokens):
    gen = torch.Generator(device="cuda").manual_seed(31 * tokens + h + g + d + block_size)
    prob = RopeProblem(dtype, h, g, d, block_size, theta, tokens, gen)
    q_rot, k_ref, v_ref = prob.reference()
    prob.poison_written_slots()
    q_buf, q_rows = _rows_with_guards(tokens, h * d, dtype, float("nan"))
    q_out = q_rows.view(tokens, h, d)
    got = rope_kv.rope_write_kv(prob.q, prob.k, prob.v, prob.positions, prob.cos, prob.sin, prob.k_cache,
                                prob.v_cache, prob.slots, q_out=q_out)
    torch.cuda.synchronize()
    assert got.data_ptr() == q_out.data_ptr()
    prob.check(q_out, q_rot, k_ref, v_ref, f"rope_write_kv {name} {dtype} N={tokens}")
    assert q_buf[0].isnan().all() and q_buf[-1].isnan().all(), "write outside q_out"


def test_rope_write_kv_allocates_q_out():
    gen = torch.Generator(device="cuda").manual_seed(5)
    prob = RopeProblem(BF16, 32, 8, 128, 16, 1e6, 3, gen)
    q_rot, k_ref, v_ref = prob.reference()
    q_out = rope_kv.rope_write_kv(prob.q, prob.k, prob.v, prob.positions, prob.cos, prob.sin, prob.k_cache,
                                  prob.v_cache, prob.slots)
    assert q_out.shape == (3, 32, 128) and q_out.is_contiguous()
    prob.check(q_out, q_rot, k_ref, v_ref, "rope_write_kv allocating")


def test_cuda_graph_replay_on_new_inputs():
    """add + norm and rope + KV write captured once (Mixtral shapes, 7 tokens padded to 8 whose padding row
    writes a reserved scratch slot 0), then replayed on new activations, positions and slots: the graph must
    read the device-side inputs of the replay, not those of the capture."""
    gen = torch.Generator(device="cuda").manual_seed(2024)
    real, padded, hidden = 7, 8, 4096
    prob = RopeProblem(BF16, 32, 8, 128, 16, 1e6, padded, gen)
    x = torch.empty(padded, hidden, dtype=BF16, device="cuda")
    res = torch.empty_like(x)
    weight = (1 + 0.2 * torch.randn(hidden, generator=gen, device="cuda")).to(BF16)
    out = torch.empty_like(x)
    q_out = torch.empty(padded, 32, 128, dtype=BF16, device="cuda")

    def step():
        rms_norm.rms_norm(x, weight, EPS, residual=res, out=out)
        rope_kv.rope_write_kv(prob.q, prob.k, prob.v, prob.positions, prob.cos, prob.sin, prob.k_cache,
                              prob.v_cache, prob.slots, q_out=q_out)

    def new_inputs():
        x.copy_(torch.randn(x.shape, generator=gen, device="cuda"))
        res.copy_(torch.randn(res.shape, generator=gen, device="cuda"))
        prob.refill(gen, reserved=1)
        prob.slots[real:] = 0  # padding rows of a captured batch all write the scratch slot
        prob.positions[real:] = 0

    new_inputs()
    replay_graph = graph_replay(step)  # compiles and warms up outside the capture

    for replay in range(2):
        new_inputs()
        ref_out, ref_res = rms_norm_reference(x, weight, EPS, res.clone())
        rows = slice(0, real)
        q_rot, k_ref, v_ref = prob.reference(rows)
        prob.poison_written_slots(rows)
        out.fill_(float("nan"))
        q_out.fill_(float("nan"))
        replay_graph()
        torch.cuda.synchronize()
        check_close(out, ref_out, f"graph replay {replay} rms_norm")
        assert torch.equal(res, ref_res)
        # slot 0 (scratch) was written by the padding row: exclude it from the unchanged-contents check
        k_ref.view(-1, 8, 128)[0] = prob.k_cache.view(-1, 8, 128)[0]
        v_ref.view(-1, 8, 128)[0] = prob.v_cache.view(-1, 8, 128)[0]
        prob.check(q_out, q_rot, k_ref, v_ref, f"graph replay {replay} rope_write_kv", rows)


@pytest.mark.parametrize("dtype,hidden,top_k,extra", [(BF16, 4096, 2, False), (BF16, 2048, 6, True),
                                                       (BF16, 2880, 4, False), (FP32, 1024, 8, True)])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_combine_rms_norm_is_combine_then_rms_norm_bit_for_bit(dtype, hidden, top_k, extra, tokens):
    """The combine prologue (ops --fuse-combine-norm) against the two kernels it replaces (kernels/combine.py, then
    the residual add + RMSNorm kernel): out and the residual stream bit-identical, rows scattered by a random
    reverse index; NaN-poisoned out; the result close to the PyTorch reference too."""
    from light_moe.kernels import combine
    from light_moe.ops import reference

    gen = torch.Generator(device="cuda").manual_seed(tokens * 31 + top_k)
    rows = tokens * top_k
    y = torch.randn(rows, hidden, device="cuda", generator=gen).to(dtype)
    reverse = torch.randperm(rows, device="cuda", generator=gen).to(torch.int32)
    weights = torch.rand(tokens, top_k, device="cuda", generator=gen)
    add = torch.randn(tokens, hidden, device="cuda", generator=gen).to(dtype) if extra else None
    residual = torch.randn(tokens, hidden, device="cuda", generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=gen)).to(dtype)

    combined = combine.combine(y, reverse, weights)
    if add is not None:
        combined = combined + add
    res_two = residual.clone()
    out_two = rms_norm.rms_norm(combined, weight, EPS, res_two)

    res_one = residual.clone()
    out_one = torch.full_like(residual, float("nan"))
    got = rms_norm.combine_rms_norm(y, reverse, weights, add, res_one, weight, EPS, out=out_one)
    torch.cuda.synchronize()
    assert got.data_ptr() == out_one.data_ptr()
    assert torch.equal(res_one, res_two) and torch.equal(out_one, out_two)
    want = reference.combine(y.float(), reverse, weights)
    if add is not None:
        want = want + add.float()
    want_out, _ = rms_norm_reference(want.to(dtype), weight, EPS, residual)
    err = ((out_one.float() - want_out.float()).norm() / want_out.float().norm()).item()
    assert err < (1e-5 if dtype == FP32 else 1e-2)
