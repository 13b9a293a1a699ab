"""CPU-only tests of the router's last-CTA counts (router.finish_mode "last_cta"): several fused CTAs store their
counts to workspace slots and draw a ticket; the CTA that draws the last one sums the slots into tokens_per_expert,
writes the routing metadata and resets the ticket, so no memset and no routing-metadata launch are needed.

sm_90a compiles with the PTX checked (one acq_rel gpu-scope ticket atomic between CTA barriers, the ticket stored
back, no relaxed global count atomics, no non-coherent loads after the acquire), the mode's limits, and the host
path of router_into / route (no torch fill or zero_ in this mode; the memset where the mode does not apply).
"""
import re

import pytest
import torch

pytest.importorskip("cutlass")

from cutlass.cute.runtime import make_fake_stream  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from light_moe.kernels import router, routing  # noqa: E402
from light_moe.kernels.router_select import Selection  # noqa: E402
from tests.kernels.compile_check import assert_waits_before_loads, compile_sm90a_ptx, ptx_entries  # noqa: E402

BF16 = torch.bfloat16
H = 4096
V3_LIKE = Selection("sigmoid", n_group=4, topk_group=2, group_score="top2_sum", scale=2.5, correction_bias="fp32")
GPT_OSS_LIKE = Selection("softmax_topk", gate_bias="bf16")

# (E, K, T picking the tile, selection, metadata)
CASES = {
    "E8_K2_T64": (8, 2, 64, None, True),
    "E8_K2_T128": (8, 2, 128, None, True),
    "E16_K2_T64": (16, 2, 64, None, True),
    "E16_K2_T128": (16, 2, 128, None, True),
    "E8_K2_T64_counts_only": (8, 2, 64, None, False),
    "E16_K2_T128_v3_like": (16, 2, 128, V3_LIKE, True),
    "E16_K4_T64_gpt_oss_like": (16, 4, 64, GPT_OSS_LIKE, True),
}


def _lines(body: str, prefixes: tuple[str, ...]) -> list[tuple[int, str]]:
    return [(i, line.strip()) for i, line in enumerate(body.splitlines()) if line.strip().startswith(prefixes)]


@pytest.mark.parametrize("name", list(CASES))
def test_last_cta_compiles_with_one_acq_rel_ticket(name, tmp_path):
    experts, top_k, tokens, selection, metadata = CASES[name]
    tile = router.choose_tile(experts, tokens, H * 2)
    assert router.finish_mode(experts, tokens, top_k, H * 2) == "last_cta"
    assert router.metadata_fusable(experts, tokens, top_k, H * 2)
    jit_fn, args = router.make_compile_args(BF16, H, experts, top_k, True, tile, make_fake_stream(),
                                            metadata=metadata, selection=selection, last_cta=True)
    assert jit_fn.last_cta and not jit_fn.single_cta and jit_fn.metadata == metadata
    entries = ptx_entries(compile_sm90a_ptx(jit_fn, *args, dump_root=str(tmp_path)))
    assert len(entries) == 1, list(entries)  # one launch: no top-k kernel, no metadata kernel
    assert_waits_before_loads(entries)
    body = next(iter(entries.values()))
    lines = body.splitlines()

    atomics = _lines(body, ("atom.", "red."))
    global_atomics = [(i, a) for i, a in atomics if not a.startswith(("atom.shared", "red.shared"))]
    # the ticket: acq_rel at gpu scope (PTX's default scope, so no .cta / .sys); no relaxed atomic counts anymore
    assert len(global_atomics) == 1, global_atomics
    at, ticket_atom = global_atomics[0]
    assert re.match(r"atom\.global\.acq_rel\.add\.u32\s+%r\d+, \[(%rd\d+)\], 1;", ticket_atom), ticket_atom
    assert ".sys" not in ticket_atom and ".cta" not in ticket_atom
    # release after a CTA barrier (every thread's ids and slot stores), acquire before the next one
    barriers = [i for i, _ in _lines(body, ("bar.sync",))]
    assert any(i < at for i in barriers) and any(i > at for i in barriers)
    before = max(i for i in barriers if i < at)
    after = min(i for i in barriers if i > at)
    assert not any(line.strip().startswith(("ld.global", "st.global")) for line in lines[before + 1:at])
    # the last CTA stores the ticket back (zero) through the same address register
    address = re.search(r"\[(%rd\d+)\]", ticket_atom).group(1)
    assert any(re.match(rf"st\.global\.u32\s+\[{re.escape(address)}\], %r\d+;", line.strip())
               for line in lines[after:]), "no store back to the ticket"
    # what other CTAs wrote is read with coherent loads (never ld.global.nc, which may serve stale lines)
    assert not any("ld.global.nc" in line for line in lines[at:])
    assert any(line.strip().startswith("ld.global") for line in lines[after:]), "the slots are never read"


def test_last_cta_kernel_refuses_what_it_cannot_count():
    split = router.choose_tile(128, 64, 2048 * 2)
    assert split.split
    with pytest.raises(ValueError, match="split tile"):
        router.RouterKernel("bf16", 2048, 128, 8, True, split, last_cta=True)
    fused_64 = router.RouterTile(1, 1, 8, 1, 4, 2)  # a fused tile of E = 32 (the prefill regime), 256 threads
    with pytest.raises(ValueError, match="E=32 above 16"):
        router.RouterKernel("bf16", H, 32, 2, True, fused_64, last_cta=True)
    narrow = router.RouterTile(1, 1, 8, 1, 1, 2)  # 8 warps: RowPlacer places rows with 512 threads
    with pytest.raises(ValueError, match="256 threads"):
        router.RouterKernel("bf16", H, 8, 2, True, narrow, last_cta=True)
    assert router.finish_mode(8, 64, 2, H * 2, narrow) == "atomic"
    tile = router.choose_tile(8, 64, H * 2)
    with pytest.raises(ValueError, match="exclude each other"):
        router.RouterKernel("bf16", H, 8, 2, True, tile, single_cta=True, last_cta=True)


@pytest.mark.parametrize("experts", [1, 8, 16])
@pytest.mark.parametrize("top_k", [1, 2, 4, 8])
def test_finish_mode_limits(experts, top_k):
    """single_cta up to one tile of tokens, last_cta up to LAST_CTA_MAX_ROWS = T K rows, then the memset path; the
    workspace holds the ticket and every slot the mode can use."""
    if top_k > experts:
        return
    row_bytes = H * 2
    tile = router.choose_tile(experts, 1, row_bytes)
    limit = router.LAST_CTA_MAX_ROWS // top_k
    assert router.LAST_CTA_MAX_ROWS == routing.SINGLE_CTA_MAX_ROWS
    assert router.finish_mode(experts, 0, top_k, row_bytes) == "atomic"
    assert router.finish_mode(experts, tile.tokens, top_k, row_bytes) == "single_cta"
    for tokens in (tile.tokens + 1, 33, 64, 100, 128, 256, limit):
        assert router.finish_mode(experts, tokens, top_k, row_bytes) == "last_cta", tokens
        assert router.metadata_fusable(experts, tokens, top_k, row_bytes)
        ctas = -(-tokens // router.choose_tile(experts, tokens, row_bytes).tokens)
        assert 1 + experts * ctas <= router.FINISH_WORDS
    assert router.finish_mode(experts, limit + 1, top_k, row_bytes) == "atomic"
    assert not router.metadata_fusable(experts, limit + 1, top_k, row_bytes)


def test_finish_mode_keeps_split_tiles_and_large_experts_on_the_memset_path():
    for experts, top_k in ((17, 2), (64, 8), (128, 8), (256, 8)):
        for tokens in (1, 16, 64, 256):
            assert router.choose_tile(experts, tokens, 2048 * 2).split
            assert router.finish_mode(experts, tokens, top_k, 2048 * 2) == "atomic"
            assert not router.metadata_fusable(experts, tokens, top_k, 2048 * 2)
    # E > 16 on a fused tile (T > SPLIT_MAX_TOKENS) keeps the atomics too
    assert not router.choose_tile(32, 2048, 2880 * 2).split
    assert router.finish_mode(32, 2048, 1, 2880 * 2) == "atomic"


class _TorchOps(TorchDispatchMode):
    """Records every aten op that runs while active."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _fills(ops: list[str]) -> list[str]:
    return [op for op in ops if any(word in op for word in ("fill", "zero", "memset"))]


@pytest.fixture
def host_only(monkeypatch):
    """router_into's host path on CPU tensors: the CUDA / alignment check, the stream and the compiled kernel are
    replaced (the kernel by a recorder of its key and its pointers' addresses); everything else runs as on the
    GPU."""
    launches = []
    workspace = torch.zeros(router.FINISH_WORDS, dtype=torch.int32)

    def compiled(*key):
        def launch(*args):
            launches.append((key, args))
        return launch

    monkeypatch.setattr(router, "_check", lambda *args: None)
    monkeypatch.setattr(router, "current_stream", lambda: None)
    monkeypatch.setattr(router, "make_ptr", lambda dtype, address, *args, **kwargs: address)
    monkeypatch.setattr(router, "compiled_router", compiled)
    monkeypatch.setattr(router, "finish_workspace", lambda device: workspace)
    return launches, workspace


@pytest.mark.parametrize("tokens,experts,top_k", [(64, 8, 2), (128, 16, 2), (17, 8, 4), (4096, 8, 1)])
def test_last_cta_launches_no_memset(host_only, tokens, experts, top_k):
    """route() in last-CTA mode: one kernel launch with the workspace's pointer, the metadata asked for, and no
    torch fill / zero_ on the way (the memset path, checked beside it, runs exactly one zero_)."""
    launches, workspace = host_only
    x = torch.zeros(tokens, H, dtype=BF16)
    gate = torch.zeros(experts, H, dtype=BF16)
    with _TorchOps() as seen:
        weights, ids, counts, metadata = router.route(x, gate, top_k, True)
    assert metadata is not None
    assert _fills(seen.ops) == [], seen.ops
    assert len(launches) == 1
    key, args = launches[0]
    single_cta, with_metadata, selection, last_cta = key[6:]
    assert last_cta and not single_cta and with_metadata and selection is None
    # after x, w, weights, ids, counts, logits scratch: the metadata outputs, then the workspace
    assert args[6:9] == tuple(t.data_ptr() for t in metadata)
    assert args[9] == workspace.data_ptr()

    # one row past the mode's limit: the memset path, whose fill the recorder sees
    launches.clear()
    big = torch.zeros(router.LAST_CTA_MAX_ROWS // top_k + 1, H, dtype=BF16)
    with _TorchOps() as seen:
        *_, metadata = router.route(big, gate, top_k, True)
    assert metadata is None
    assert [op for op in _fills(seen.ops)] == ["aten.zero_.default"], seen.ops
    assert launches[0][0][6:] == (False, False, None, False)


def test_router_into_refuses_metadata_past_the_limit(host_only):
    launches, _ = host_only
    experts, top_k = 8, 2
    tokens = router.LAST_CTA_MAX_ROWS // top_k + 1
    x, gate = torch.zeros(tokens, H, dtype=BF16), torch.zeros(experts, H, dtype=BF16)
    outputs = (torch.empty(tokens, top_k), torch.empty(tokens, top_k, dtype=torch.int32),
               torch.empty(experts, dtype=torch.int32))
    metadata = (torch.empty(experts + 1, dtype=torch.int32), torch.empty(tokens * top_k, dtype=torch.int32),
                torch.empty(tokens * top_k, dtype=torch.int32))
    with pytest.raises(ValueError, match="one fused CTA or last-CTA counts"):
        router.router_into(x, gate, top_k, True, *outputs, metadata=metadata)
    assert launches == []
