"""L2 prefetch of a layer's next weights while latency-bound kernels run (decode).

A decode layer alternates kernels that stream weights from HBM (the projections, the experts) with kernels that
barely touch it (rotary + KV write, attention at small batches, norms, the router): during the latter the memory
system idles. This kernel, launched just before such a stretch, asks the L2 to fetch the weight the next streaming
kernel will read (cp.async.bulk.prefetch.L2, a hint: nothing waits for it, nothing is written), so that kernel
finds part or all of it in L2 (50 MB on an H100). Where it pays: docs/performance.md, "L2 prefetch".

It joins the stream's programmatic-dependent-launch chain like every kernel of ours (launch.await_inputs): it
waits for its predecessor first, so the prefetched lines are not evicted by the predecessor's own streaming and
the kernel after it still sees every earlier write, then issues its prefetches and exits. It reads and writes
no tensor, so results never depend on it.

Work split: up to MAX_RANGES address ranges (a weight and its scales), cut into CHUNK-byte prefetches; each of the
grid's threads issues every (grid threads)-th chunk of each range, so the requests spread over many SMs' TMA
units. Ranges must be 16-byte aligned with sizes a multiple of 16 (cp.async.bulk's rule).
"""
from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass import Int32, Int64

from light_moe.kernels.compile_cache import CompileCache
from light_moe.kernels.gemm_pipeline import prefetch_l2
from light_moe.kernels.launch import await_inputs, current_stream

CHUNK = 32 * 1024  # bytes per prefetch instruction
THREADS = 32  # one warp per CTA: the CTAs only issue instructions
MAX_CTAS = 64  # enough TMA units to keep the requests flowing (34 MB = 1,088 chunks: ~17 per CTA)
MAX_RANGES = 4


class L2PrefetchKernel:
    """Compiled once per number of ranges; addresses, sizes and the grid are runtime values."""

    def __init__(self, num_ranges: int):
        if not 1 <= num_ranges <= MAX_RANGES:
            raise ValueError(f"l2_prefetch: 1..{MAX_RANGES} ranges, got {num_ranges}")
        self.num_ranges = num_ranges

    @cute.jit
    def __call__(self, addrs: tuple, sizes: tuple, n_ctas: Int32, stream: cuda.CUstream):
        self.kernel(addrs, sizes).launch(grid=(n_ctas, 1, 1), block=(THREADS, 1, 1), stream=stream, use_pdl=True)

    @cute.kernel
    def kernel(self, addrs: tuple, sizes: tuple):
        await_inputs()
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        gdim, _, _ = cute.arch.grid_dim()
        first = bidx * THREADS + tidx
        step = gdim * THREADS
        for r in cutlass.range_constexpr(self.num_ranges):
            size = sizes[r]
            n_chunks = Int32((size + (CHUNK - 1)) // CHUNK)
            for c in cutlass.range(first, n_chunks, step):
                offset = Int64(c) * CHUNK
                prefetch_l2(addrs[r] + offset, Int32(cutlass.min(size - offset, Int64(CHUNK))))


_compiled = CompileCache("l2_prefetch")  # number of ranges -> compiled function


def make_compile_args(num_ranges: int, stream=None):
    """(jit function, arguments) for cute.compile; every address and size is a runtime value."""
    args = (tuple(Int64(0) for _ in range(num_ranges)), tuple(Int64(16) for _ in range(num_ranges)), Int32(1),
            stream)
    return L2PrefetchKernel(num_ranges), args


def _ranges(tensors) -> list[tuple[int, int]]:
    """(address, bytes) of each non-empty tensor; every one contiguous on one CUDA device, 16-byte aligned, its size
    a multiple of 16 bytes."""
    ranges = []
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        nbytes = t.numel() * t.element_size()
        if not t.is_cuda or not t.is_contiguous() or t.data_ptr() % 16 or nbytes % 16:
            raise ValueError(f"l2_prefetch: tensors must be contiguous CUDA tensors, 16-byte aligned, a multiple of "
                             f"16 bytes; got {tuple(t.shape)} {t.dtype} at {t.data_ptr() % 16} mod 16")
        ranges.append((t.data_ptr(), nbytes))
    if len(ranges) > MAX_RANGES:
        raise ValueError(f"l2_prefetch: at most {MAX_RANGES} tensors per launch, got {len(ranges)}")
    return ranges


def grid_size(total_bytes: int) -> int:
    """CTAs for `total_bytes`: one chunk per thread up to MAX_CTAS CTAs."""
    return max(1, min(MAX_CTAS, -(-total_bytes // (CHUNK * THREADS))))


def l2_prefetch(tensors) -> None:
    """Ask the L2 to fetch `tensors` (up to MAX_RANGES; None or empty ones skipped) once the stream's previous
    kernel has finished. No host sync (CUDA-graph capturable); the addresses are baked into a captured graph, so
    the tensors must outlive it, as weights do."""
    ranges = _ranges(tensors)
    if not ranges:
        return
    fn = _compiled.get(len(ranges), lambda: make_compile_args(len(ranges), current_stream()))
    fn(tuple(Int64(a) for a, _ in ranges), tuple(Int64(n) for _, n in ranges),
       Int32(grid_size(sum(n for _, n in ranges))), current_stream())


def supports(tensors) -> tuple[bool, str]:
    """Whether l2_prefetch takes these tensors; the reason names what is wrong."""
    try:
        _ranges(tensors)
    except ValueError as exc:
        return False, str(exc)
    return True, "ok"

