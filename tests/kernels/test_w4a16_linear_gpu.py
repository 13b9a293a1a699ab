"""GPU tests of the one-expert W4A16 linear (kernels/w4a16_linear.py) against the dequantised reference:
fresh random inputs, NaN-poisoned outputs, relative L2 < 1e-2, CUDA-graph capture and replay.

Shape legend: T tokens, N out features, K in features, g group size.
Run on the H100: pytest -m gpu tests/kernels/test_w4a16_linear_gpu.py -v
"""
import pytest
import torch

from tests.kernels.gpu_helpers import rel_l2
from tests.kernels.test_w4a16_gpu import _quantized

pytestmark = pytest.mark.gpu

MIXTRAL = {"qkv": (6144, 4096), "o": (4096, 4096)}  # N, K of Mixtral-8x7B's attention projections
GROUP = 128


def _weights(n_out, k_dim, with_zeros, seed):
    from light_moe.kernels.w4a16_layout import dequantize_reference
    from light_moe.kernels.w4a16_linear import prepare_linear

    gen = torch.Generator(device="cuda").manual_seed(seed)
    canonical = _quantized(1, n_out, k_dim, GROUP, with_zeros, torch.device("cuda"), gen)
    return prepare_linear(*canonical, GROUP), dequantize_reference(*canonical, GROUP)[0], gen  # fp32 [N, K]


@pytest.mark.parametrize("num_tokens", (1, 16, 300))
@pytest.mark.parametrize("shape", sorted(MIXTRAL))
def test_w4a16_linear_matches_reference(shape, num_tokens):
    from light_moe.kernels.w4a16_linear import w4a16_linear

    n_out, k_dim = MIXTRAL[shape]
    prepared, w, gen = _weights(n_out, k_dim, with_zeros=shape == "o", seed=num_tokens + n_out)
    x = torch.randn(num_tokens, k_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    bias = torch.randn(n_out, device="cuda", dtype=torch.bfloat16, generator=gen) if shape == "qkv" else None
    out = torch.full((num_tokens, n_out), float("nan"), device="cuda", dtype=torch.bfloat16)
    y = w4a16_linear(x, prepared, bias, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert not out.isnan().any(), "w4a16_linear left rows unwritten"
    ref = x.float() @ w.t() + (0 if bias is None else bias.float())
    err = rel_l2(out, ref)
    assert err < 1e-2, f"{shape} T={num_tokens}: rel L2 {err:.3e}"


def test_w4a16_linear_cuda_graph_replay():
    """Two graphs: one reads (0, T) from the device's offset table, one captured while the table lacked T (the
    offsets written inside the graph). The table is then replaced by a bigger one; new x, NaN-poisoned outputs,
    replays: both must read this replay's x and still their own (0, T)."""
    from light_moe.kernels import w4a16_linear as lin

    n_out, k_dim = MIXTRAL["qkv"]
    prepared, w, gen = _weights(n_out, k_dim, with_zeros=True, seed=7)
    device = torch.device("cuda", torch.cuda.current_device())
    graphs = []
    stream = torch.cuda.Stream()
    for num_tokens, in_table in ((16, True), (40, False)):
        x = torch.randn(num_tokens, k_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        out = torch.empty(num_tokens, n_out, device="cuda", dtype=torch.bfloat16)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            lin.w4a16_linear(x, prepared, out=out)  # compile and warm up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        if not in_table:  # the first graph reads the table: keep it alive, as the module does with replaced ones
            lin._old_offset_tables.append(lin._offset_tables.pop(device))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            lin.w4a16_linear(x, prepared, out=out)
        assert (device in lin._offset_tables) == in_table
        graphs.append((graph, x, out))
    eager = lin.w4a16_linear(torch.randn(2000, k_dim, device="cuda", dtype=torch.bfloat16, generator=gen), prepared)
    assert eager.shape == (2000, n_out) and lin._offset_tables[device].shape[0] > 2000
    for graph, x, out in graphs:
        x.copy_(torch.randn(x.shape, device="cuda", dtype=torch.bfloat16, generator=gen))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert not out.isnan().any()
        err = rel_l2(out, x.float() @ w.t())
        assert err < 1e-2, f"graph replay T={x.shape[0]}: rel L2 {err:.3e}"


def test_quantized_linear_on_cute_backend():
    """The layer through CuteOps (the kernel) against the same layer through the reference ops, with a bias;
    a shape the kernel refuses (N = 96) falls back to the reference on the same backend."""
    from light_moe.kernels.w4a16_layout import W4A16Weights
    from light_moe.layers.linear import QuantizedLinear
    from light_moe.ops.backend import ReferenceOps
    from light_moe.ops.cute_backend import CuteOps
    from light_moe.quant import W4A16Config, rtn_quantize

    gen = torch.Generator(device="cuda").manual_seed(11)
    for n_out, k_dim, kernel in ((1024, 512, True), (96, 128, False)):
        scheme = W4A16Config(32, symmetric=False)
        w = torch.randn(1, n_out, k_dim, device="cuda", generator=gen, dtype=torch.bfloat16)
        qw = rtn_quantize(w, scheme)
        bias = torch.randn(n_out, device="cuda", generator=gen, dtype=torch.bfloat16)
        x = torch.randn(7, k_dim, device="cuda", generator=gen, dtype=torch.bfloat16)
        ys = []
        for ops in (CuteOps(), ReferenceOps()):
            layer = QuantizedLinear(k_dim, n_out, True, scheme, ops, torch.bfloat16, "cuda")
            layer.load(qw)
            layer.bias.copy_(bias)
            layer.prepare()
            assert isinstance(layer.prepared, W4A16Weights) == (kernel and isinstance(ops, CuteOps))
            ys.append(layer(x))
        ref = x.float() @ qw.dequantize()[0].float().t() + bias.float()
        assert rel_l2(ys[0], ref) < 1e-2 and rel_l2(ys[1], ref) < 1e-2
