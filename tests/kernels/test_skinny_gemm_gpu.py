"""GPU tests of the skinny decode GEMM (kernels/skinny_gemm.py) against torch.nn.functional.linear in fp32.

Every case has fresh random inputs and a NaN-poisoned output inside a larger NaN buffer (a row or column the kernel
should write and does not, or one it writes and should not, fails), and x is a view of a buffer whose rows past M
hold NaN (the TMA must not read them). Shapes: Mixtral's q/k/v (6144 x 4096) and o (4096 x 4096) at every
M = 1..16, with and without bias; gpt-oss-like odd shapes (N = 2880 / 5120, K = 2880 / 7168); forced tiles and
K-splits; bitwise repeatability (the cluster reduction sums in rank order); two kernels back to back where the
second reads the first's output (programmatic dependent launch); CUDA-graph replay on new inputs and weights;
CuteOps.dense_linear against F.linear.

Shape legend: M token rows, N out features, K in features.
Run on the H100: pytest -m gpu tests/kernels/test_skinny_gemm_gpu.py -v
"""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("cutlass")

from light_moe.kernels import skinny_gemm as sk  # noqa: E402
from tests.kernels.gpu_helpers import rel_l2  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="CuTe kernels need sm_90")]

BF16 = torch.bfloat16
TOL = 1e-2
MIXTRAL = {"qkv": (6144, 4096), "o": (4096, 4096)}
ODD = [(2880, 2880), (2880, 4096), (5120, 2880), (5120, 7168), (2880, 7168)]


def _problem(m, n, k, bias, seed):
    """x [M, K]: rows 0..M-1 of a [17, K] buffer whose other rows are NaN; W [N, K] scaled like a trained layer;
    bias [N] or None; out_buf: a NaN [M + 1, N] buffer whose rows 0..M-1 are the output and row M a guard."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x_buf = torch.full((sk.MAX_M + 1, k), float("nan"), device="cuda", dtype=BF16)
    x = x_buf[:m]
    x.copy_(torch.randn(m, k, device="cuda", generator=gen))
    w = (torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5).to(BF16)
    b = torch.randn(n, device="cuda", generator=gen).to(BF16) if bias else None
    out_buf = torch.full((m + 1, n), float("nan"), device="cuda", dtype=BF16)
    return x, w, b, out_buf


def _reference(x, w, b):
    return F.linear(x.float(), w.float(), None if b is None else b.float())


def _check(out_buf, m, x, w, b, label):
    out = out_buf[:m]
    assert not out.isnan().any(), f"{label}: rows left unwritten"
    assert out_buf[m].isnan().all(), f"{label}: wrote past row M"
    err = rel_l2(out, _reference(x, w, b))
    assert err < TOL, f"{label}: rel L2 {err:.3e}"


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", list(range(1, 17)) + [17, 24, 32, 33, 48, 63, 64])
@pytest.mark.parametrize("shape", sorted(MIXTRAL))
def test_mixtral_projections(shape, m, bias):
    n, k = MIXTRAL[shape]
    x, w, b, out_buf = _problem(m, n, k, bias, seed=100 * m + n + bias)
    y = sk.skinny_linear(x, w, b, out=out_buf[:m])
    assert y.data_ptr() == out_buf.data_ptr()
    torch.cuda.synchronize()
    _check(out_buf, m, x, w, b, f"{shape} M={m} bias={bias}")


@pytest.mark.parametrize("m", [1, 3, 8, 9, 16, 40, 64])
@pytest.mark.parametrize("n,k", ODD)
def test_odd_shapes(n, k, m):
    x, w, b, out_buf = _problem(m, n, k, True, seed=7 * m + n + k)
    sk.skinny_linear(x, w, b, out=out_buf[:m])
    torch.cuda.synchronize()
    _check(out_buf, m, x, w, b, f"N={n} K={k} M={m}")


@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("block_n,splits", [(64, 1), (64, 2), (64, 8), (128, 1), (128, 4), (128, 8)])
def test_forced_tiles_and_splits(block_n, splits, m):
    n, k = MIXTRAL["o"]
    x, w, b, out_buf = _problem(m, n, k, True, seed=block_n + splits + m)
    sk.skinny_linear(x, w, b, out=out_buf[:m], block_n=block_n, splits=splits)
    torch.cuda.synchronize()
    _check(out_buf, m, x, w, b, f"BN={block_n} S={splits} M={m}")


def test_allocating_call_and_leading_dims():
    n, k = MIXTRAL["qkv"]
    x, w, b, _ = _problem(6, n, k, True, seed=3)
    y = sk.skinny_linear(x.view(2, 3, k), w, b)
    assert y.shape == (2, 3, n) and y.dtype == BF16
    assert rel_l2(y.view(6, n), _reference(x, w, b)) < TOL


@pytest.mark.parametrize("m", [1, 16, 64])
def test_repeat_runs_are_bitwise_equal(m):
    """The K-split partials are summed in cluster-rank order, never in arrival order."""
    n, k = MIXTRAL["o"]
    x, w, b, _ = _problem(m, n, k, True, seed=11)
    first = sk.skinny_linear(x, w, b)
    for _ in range(20):
        assert torch.equal(sk.skinny_linear(x, w, b), first)


def _chain(x, w1, b1, w2, out1, out2):
    """Two projections back to back, the second reading the first's output: under programmatic dependent launch
    the second streams its weights early but must read h only once the first has finished."""
    sk.skinny_linear(x, w1, b1, out=out1)
    sk.skinny_linear(out1, w2, None, out=out2)


def _chain_reference(x, w1, b1, w2):
    h = _reference(x, w1, b1).to(BF16)  # the first kernel's bf16 output is the second's input
    return _reference(h, w2, None)


@pytest.mark.parametrize("m", [1, 16, 64])
def test_back_to_back_kernels(m):
    n, k = MIXTRAL["o"]
    x, w1, b1, _ = _problem(m, n, k, True, seed=21)
    w2 = torch.randn_like(w1, dtype=torch.float32).mul_(k ** -0.5).to(BF16)
    out1 = torch.full((m, n), float("nan"), device="cuda", dtype=BF16)
    out2 = torch.full((m, n), float("nan"), device="cuda", dtype=BF16)
    for _ in range(3):
        out1.fill_(float("nan"))
        out2.fill_(float("nan"))
        _chain(x, w1, b1, w2, out1, out2)
        torch.cuda.synchronize()
        assert not out2.isnan().any()
        assert rel_l2(out2, _chain_reference(x, w1, b1, w2)) < TOL


def test_cuda_graph_replay_with_new_inputs_and_weights():
    """Graphs of the chain at M = 1 and M = 16 (two plans' token tiles), captured once; then new x, new weights and
    bias copied into the same buffers, NaN outputs, replays: each graph computes from this replay's data."""
    n, k = MIXTRAL["o"]
    stream = torch.cuda.Stream()
    cases = []
    for m in (1, 16):
        x, w1, b1, _ = _problem(m, n, k, True, seed=31 + m)
        w2 = (torch.randn(n, k, device="cuda") * k ** -0.5).to(BF16)
        out1 = torch.empty(m, n, device="cuda", dtype=BF16)
        out2 = torch.empty(m, n, device="cuda", dtype=BF16)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            _chain(x, w1, b1, w2, out1, out2)  # compile and warm up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            _chain(x, w1, b1, w2, out1, out2)
        cases.append((graph, x, w1, b1, w2, out1, out2))
    gen = torch.Generator(device="cuda").manual_seed(99)
    for _ in range(2):
        for graph, x, w1, b1, w2, out1, out2 in cases:
            x.copy_(torch.randn(x.shape, device="cuda", generator=gen))
            w1.copy_(torch.randn(w1.shape, device="cuda", generator=gen) * k ** -0.5)
            w2.copy_(torch.randn(w2.shape, device="cuda", generator=gen) * k ** -0.5)
            b1.copy_(torch.randn(b1.shape, device="cuda", generator=gen))
            out1.fill_(float("nan"))
            out2.fill_(float("nan"))
            graph.replay()
        torch.cuda.synchronize()
        for _graph, x, w1, b1, w2, out1, out2 in cases:
            assert not out2.isnan().any()
            assert rel_l2(out1, _reference(x, w1, b1)) < TOL
            assert rel_l2(out2, _chain_reference(x, w1, b1, w2)) < TOL


@pytest.mark.parametrize("max_rows", [16, 64])
@pytest.mark.parametrize("m", [1, 16, 17, 64, 65])
def test_cute_ops_dense_linear(m, max_rows):
    """Steps of up to skinny_max_rows rows on the kernel, longer ones on F.linear (bit-equal there); both close to
    fp32."""
    from light_moe.ops.cute_backend import CuteOps

    n, k = MIXTRAL["qkv"]
    gen = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, k, device="cuda", generator=gen).to(BF16)
    w = (torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5).to(BF16)
    b = torch.randn(n, device="cuda", generator=gen).to(BF16)
    y = CuteOps(skinny_gemm=True, skinny_max_rows=max_rows).dense_linear(x, w, b)
    assert y.shape == (m, n) and rel_l2(y, _reference(x, w, b)) < TOL
    if m > max_rows:
        assert torch.equal(y, F.linear(x, w, b))
