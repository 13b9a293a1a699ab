"""CPU tests of the direct W4A16 decode kernel (kernels/w4a16_direct.py): sm_90a compiles, its shared-memory
fragment addressing against mma.sync's layouts, its tile choice and its refusals. GPU tests:
tests/kernels/test_w4a16_direct_gpu.py."""

import pytest

cute = pytest.importorskip("cutlass.cute")

from cutlass import Float32, Int32  # noqa: E402
from cutlass.cute.runtime import make_fake_compact_tensor  # noqa: E402

from light_moe.kernels import w4a16_direct as direct  # noqa: E402
from light_moe.kernels import w4a16_plan  # noqa: E402
from light_moe.kernels.tile_config import TileConfig, choose_w4a16_tile, direct_tile  # noqa: E402
from tests.kernels.compile_check import compile_sm90a, compile_sm90a_ptx  # noqa: E402
from tests.kernels.test_w4a16_compile import _args as _gemm_args  # noqa: E402

MIXTRAL = (8, 4096, 14336)

CASES = {
    # name: (gated, E, H, I, g, config)
    "up_mixtral_w8_g128": (True, *MIXTRAL, 128, TileConfig(64, 8, direct_warps=8)),
    "down_mixtral_w8_g128_early": (False, *MIXTRAL, 128, TileConfig(64, 8, direct_warps=8, early_weights=True)),
    "down_mixtral_w8_g128": (False, *MIXTRAL, 128, TileConfig(64, 8, direct_warps=8)),
    "up_mixtral_w4_g64": (True, *MIXTRAL, 64, TileConfig(64, 8, direct_warps=4)),
    "down_mixtral_w2_g64_early_ring2": (False, *MIXTRAL, 64,
                                        TileConfig(64, 8, stages=2, direct_warps=2, early_weights=True)),
    "up_e64_w8_g128": (True, 64, 1024, 1024, 128, TileConfig(64, 8, direct_warps=8)),
    # stream-K: the default direct tiles (direct_tile) and a g = 64 one
    "up_mixtral_w8_g128_stream_k": (True, *MIXTRAL, 128, TileConfig(64, 8, direct_warps=8, stream_k=True)),
    "down_mixtral_w8_g128_early_stream_k": (False, *MIXTRAL, 128,
                                            TileConfig(64, 8, direct_warps=8, early_weights=True, stream_k=True)),
    "down_mixtral_w4_g64_stream_k": (False, *MIXTRAL, 64, TileConfig(64, 8, direct_warps=4, stream_k=True)),
    "down_e64_w4_g128_refused": (False, 64, 1024, 768, 128, TileConfig(64, 8, direct_warps=4)),
}


def _args(gated: bool, num_experts: int, hidden: int, inter: int, group_size: int):
    """The grouped GEMM's arguments, then the stream-K workspace and counters (one CTA pair per SM of 132)."""
    n_out, k_dim, args = _gemm_args(gated, num_experts, hidden, inter, group_size)
    words, count = direct.direct_workspace_sizes(132)
    workspace = make_fake_compact_tensor(Float32, (words,), assumed_align=16)
    counters = make_fake_compact_tensor(Int32, (count,), assumed_align=4)
    return n_out, k_dim, (*args, workspace, counters)


@pytest.mark.parametrize("name", sorted(CASES))
def test_direct_compiles(name, tmp_path):
    gated, num_experts, hidden, inter, group_size, config = CASES[name]
    n_out, k_dim, args = _args(gated, num_experts, hidden, inter, group_size)
    if name == "down_e64_w4_g128_refused":  # 12 k-tiles: 4 warps x 3 are not whole g = 128 groups
        with pytest.raises(ValueError, match="whole groups"):
            direct.make_direct_kernel(gated, n_out, k_dim, num_experts, group_size, config)
        return
    kernel = direct.make_direct_kernel(gated, n_out, k_dim, num_experts, group_size, config)
    cubin, seconds = compile_sm90a(kernel, *args, dump_root=str(tmp_path))
    print(f"{name}: {seconds:.2f} s, ring {kernel.ring}, cubin {cubin}")


def test_direct_ptx_structure(tmp_path):
    """Per k-tile and warp: 16 mma.sync m16n8k16 (4 m16 blocks x 4 k16 steps), 4 int4 copies of 16 bytes by
    cp.async.cg, 2 ldmatrix.x4 of the token fragments; no wgmma, no mbarrier, no local memory. The down projection
    with early weights copies int4 before griddepcontrol.wait."""
    gated, num_experts, hidden, inter, group_size, config = CASES["down_mixtral_w8_g128_early"]
    n_out, k_dim, args = _args(gated, num_experts, hidden, inter, group_size)
    kernel = direct.make_direct_kernel(gated, n_out, k_dim, num_experts, group_size, config)
    ptx = compile_sm90a_ptx(kernel, *args, dump_root=str(tmp_path))
    assert "wgmma" not in ptx and "mbarrier" not in ptx
    assert "ld.local" not in ptx and "st.local" not in ptx
    # the main loop is unrolled over the g = 128 group's two k-tiles: 32 mma, 8 ldmatrix per group in the loop body
    assert ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == 32
    assert ptx.count("ldmatrix.sync.aligned.m8n8.x4.shared.b16") == 4
    wait = ptx.index("griddepcontrol.wait")
    assert "cp.async.cg.shared.global" in ptx[:wait], "early weights: int4 copies before the dependency wait"
    assert "cp.async.ca.shared.global" not in ptx[:wait], "token rows only after the dependency wait"


def test_direct_stream_k_ptx(tmp_path):
    """Stream-K adds one acquire-release count per shared unit, L2 loads of the sharers' partials and nothing in
    the k-tile loop (the same mma.sync and ldmatrix count as without it); still no local memory."""
    gated, num_experts, hidden, inter, group_size, config = CASES["up_mixtral_w8_g128_stream_k"]
    n_out, k_dim, args = _args(gated, num_experts, hidden, inter, group_size)
    kernel = direct.make_direct_kernel(gated, n_out, k_dim, num_experts, group_size, config)
    ptx = compile_sm90a_ptx(kernel, *args, dump_root=str(tmp_path))
    assert "ld.local" not in ptx and "st.local" not in ptx
    assert ptx.count("atom.global.acq_rel.add.u32") == 1  # scope .gpu: the default
    assert "ld.global.cg.f32" in ptx
    assert ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == 32
    plain = CASES["up_mixtral_w8_g128"][-1]
    assert "ld.global.cg.f32" not in compile_sm90a_ptx(
        direct.make_direct_kernel(gated, n_out, k_dim, num_experts, group_size, plain), *args,
        dump_root=str(tmp_path / "plain"))


def test_direct_up_waits_first(tmp_path):
    gated, num_experts, hidden, inter, group_size, config = CASES["up_mixtral_w8_g128"]
    n_out, k_dim, args = _args(gated, num_experts, hidden, inter, group_size)
    kernel = direct.make_direct_kernel(gated, n_out, k_dim, num_experts, group_size, config)
    ptx = compile_sm90a_ptx(kernel, *args, dump_root=str(tmp_path))
    assert ptx.index("griddepcontrol.wait") < ptx.index("cp.async"), "the up projection's experts are its input"


# ---- fragment addressing (plain Python on ints) --------------------------------------------------------------


def _token_slot():
    """Byte offset of each bf16 in a slot's token rows -> (routed row, k), as issue_tokens places the 16-byte chunks."""
    where = {}
    for tok in range(direct.TOKENS):
        for k in range(64):
            where[direct.token_slot_offset(tok, k // 8) + (k % 8) * 2] = (tok, k)
    return where


def test_token_fragments_are_mma_b_fragments():
    """ldmatrix.x4 at token_ldmatrix_offset(p, lane): registers (0, 1) are (b0b1, b2b3) of k16 step 2p and (2, 3) of
    step 2p + 1: lane (g, q) holds B[k 16 s + 2q (+1)][n = g] and B[k 16 s + 2q + 8 (+1)][g] (routed row g)."""
    where = _token_slot()
    for p in range(2):
        offsets = [direct.token_ldmatrix_offset(p, lane) for lane in range(32)]
        for lane in range(32):
            g, q = lane // 4, lane % 4
            for j in range(4):
                # matrix j's row g starts at offsets[8 j + g]; lane gets its elements 2q, 2q + 1
                got = tuple(where[offsets[8 * j + g] + 4 * q + 2 * e] for e in range(2))
                step, half = 2 * p + j // 2, j % 2
                assert got == tuple((g, 16 * step + 2 * q + 8 * half + e) for e in range(2)), (p, lane, j)


def test_token_ldmatrix_and_copies_are_conflict_free():
    """Each ldmatrix matrix (8 lanes' 16-byte rows) covers the 8 bank groups of a 128-byte line; the token rows'
    chunks are a permutation of the slot's token bytes (every copy lands on its own 16 bytes)."""
    for p in range(2):
        offsets = [direct.token_ldmatrix_offset(p, lane) for lane in range(32)]
        for j in range(4):
            assert len({(o // 16) % 8 for o in offsets[8 * j:8 * j + 8]}) == 8
    chunks = {direct.token_slot_offset(t, c) for t in range(direct.TOKENS) for c in range(8)}
    assert chunks == {direct.TOKEN_OFF + 16 * i for i in range(direct.TOKENS * 8)}


def test_partial_offsets_are_a_permutation():
    offs = {direct.partial_offset(w, b, i, lane) for w in range(8) for b in range(4) for i in range(4)
            for lane in range(32)}
    assert offs == {4 * n for n in range(8 * direct.PART_BYTES_PER_WARP // 4)}


# ---- stream-K schedule (plain Python on ints, the kernel's own helpers) ----------------------------------------


@pytest.mark.parametrize("units,unit_steps,ctas", [(896, 4, 264), (128, 14, 264), (3, 14, 264), (1, 1, 264),
                                                   (500, 7, 264), (264, 1, 264), (7, 3, 5), (2, 56, 16)])
def test_stream_k_schedule(units, unit_steps, ctas):
    """Every step of every unit is computed by exactly one CTA, the runs differ by at most one step, and a unit
    shared by several CTAs has exactly its owners as sharers: each writes the slot the finisher reads for it
    (sharer_slot), no two shared (CTA, unit) pairs use one slot, and one counter per shared unit (the head's slot)."""
    steps_total = units * unit_steps
    ctas = min(ctas, steps_total)  # as the kernel: CTAs past the steps have no run
    starts = [direct.stream_k_start(c, steps_total, ctas) for c in range(ctas + 1)]
    assert starts[0] == 0 and starts[-1] == steps_total
    runs = [b - a for a, b in zip(starts, starts[1:])]
    assert min(runs) >= 1 and max(runs) - min(runs) <= 1
    for step in range(steps_total):
        owner = direct.stream_k_owner(step, steps_total, ctas)
        assert starts[owner] <= step < starts[owner + 1]
    written = {}  # slot -> (cta, unit)
    sharers = {}
    for c in range(ctas):
        s0, s1 = starts[c], starts[c + 1]
        if s0 == s1:
            continue
        for u in range(s0 // unit_steps, (s1 - 1) // unit_steps + 1):
            lo, hi = max(s0, u * unit_steps), min(s1, (u + 1) * unit_steps)
            if (lo, hi) == (u * unit_steps, (u + 1) * unit_steps):
                continue  # whole in this CTA: stored directly (the kernel's c_whole and c_j == kpw)
            slot = direct.sharer_slot(c, u, unit_steps, steps_total, ctas)
            assert slot not in written, (slot, written[slot], (c, u))
            assert slot < direct.direct_workspace_sizes(ctas // direct.CTAS_PER_SM + 1)[1]
            written[slot] = (c, u)
            sharers.setdefault(u, []).append(c)
    counters = set()
    for u, cs in sharers.items():
        head = direct.stream_k_owner(u * unit_steps, steps_total, ctas)
        tail = direct.stream_k_owner(u * unit_steps + unit_steps - 1, steps_total, ctas)
        assert cs == list(range(head, tail + 1)) and len(cs) > 1
        counter = direct.sharer_slot(head, u, unit_steps, steps_total, ctas)
        assert counter not in counters
        counters.add(counter)


# ---- tile choice and refusals ---------------------------------------------------------------------------------


def test_direct_tile_choice():
    assert direct_tile(4096, 128, gated=True) == TileConfig(64, 8, direct_warps=8)
    assert direct_tile(14336, 128, gated=False) == TileConfig(64, 8, direct_warps=8, early_weights=True)
    assert direct_tile(1408, 128, gated=False) is None  # Qwen2-MoE: 22 k-tiles, no whole g = 128 groups per warp
    assert direct_tile(1408, 64, gated=False) == TileConfig(64, 8, direct_warps=2, early_weights=True)
    assert direct_tile(4096, 32, gated=True) is None  # two groups per k-tile: not taken
    # decode rows only: T = 1 and 4 (Mixtral, top-2) take it, T = 64 keeps the 256 x 32 wgmma tile
    for rows in (2, 8):
        assert choose_w4a16_tile(rows, 8, 28672, 4096, group_size=128, gated=True, decode_kernel="direct").direct_warps
    # ... where the units fill a wave of 2 CTAs per SM: T = 1's down projection (2 x 64 atoms) keeps the wgmma tile,
    # T = 2's (4 x 64, 0.97 of a wave) takes it; 132 SMs
    assert not choose_w4a16_tile(2, 8, 4096, 14336, group_size=128, decode_kernel="direct").direct_warps
    assert choose_w4a16_tile(4, 8, 4096, 14336, group_size=128, decode_kernel="direct").direct_warps
    assert not choose_w4a16_tile(128, 8, 28672, 4096, group_size=128, gated=True, decode_kernel="direct").direct_warps
    assert not choose_w4a16_tile(2, 8, 28672, 4096, group_size=128, gated=True).direct_warps  # default: wgmma
    with pytest.raises(ValueError, match="decode_kernel"):
        choose_w4a16_tile(2, 8, 28672, 4096, decode_kernel="gemv")


def test_direct_refusals():
    with pytest.raises(ValueError, match="plain 64 x 8"):
        TileConfig(64, 8, k_split=4, direct_warps=8)
    with pytest.raises(ValueError, match="direct_warps"):
        TileConfig(64, 8, direct_warps=16)
    with pytest.raises(ValueError, match="belong to the direct kernel"):
        TileConfig(64, 8, k_split=4, stream_k=True)
    ok, reason = w4a16_plan.supports_config(gated=True, n_out=28672, k_dim=4096, num_experts=8, group_size=32,
                                            config=TileConfig(64, 8, direct_warps=8))
    assert not ok and "g = 64 or 128" in reason
    ok, reason = w4a16_plan.supports_config(gated=True, n_out=28672, k_dim=4096, num_experts=8, group_size=128,
                                            config=TileConfig(64, 8, stages=8, direct_warps=8))
    assert not ok and "do not fit" in reason
    # the ring fits beside the partials for every E the kernels take, at every warp count
    for warps in (2, 4, 8):
        assert w4a16_plan.direct_ring(TileConfig(64, 8, direct_warps=warps), 1024) >= 2


def test_bench_spec_names_the_direct_kernel():
    from light_moe.bench.w4a16_experts import _parse_config
    from light_moe.kernels.tile_config import W4A16_TILE_TABLE

    assert _parse_config("64x8g8e", W4A16_TILE_TABLE) == TileConfig(64, 8, direct_warps=8, early_weights=True)
    assert _parse_config("64x8s3g4", W4A16_TILE_TABLE) == TileConfig(64, 8, stages=3, direct_warps=4)
    assert _parse_config("64x8g8ek", W4A16_TILE_TABLE) == TileConfig(64, 8, direct_warps=8, early_weights=True,
                                                                     stream_k=True)


def _with_next_weights(args, num_experts: int, hidden: int, inter: int, group_size: int):
    """args + the down projection's qweight / meta views (as w4a16_gemm._views makes them: 16-byte chunks)."""
    _, _, down = _gemm_args(False, num_experts, hidden, inter, group_size)
    return (*args, down[0], down[1])


def test_direct_up_prefetches_the_down_weights(tmp_path):
    """next_weights: the up kernel ends with the next projection's L2 prefetch (cp.async.bulk.prefetch.L2, after the
    main loop: after the last mma), one instruction per piece; nothing else changes (the same mma count, no local
    memory); without the plan there is no prefetch at all."""
    num_experts, hidden, inter = MIXTRAL
    config = TileConfig(64, 8, direct_warps=8)
    down = choose_w4a16_tile(2, num_experts, hidden, inter, 132, 128, False, "direct")
    plan = w4a16_plan.next_prefetch(hidden, inter, 128, down)
    assert plan is not None and plan.run == inter // 64 and plan.head == round(plan.run / 3)  # wgmma down: one stream
    n_out, k_dim, args = _args(True, num_experts, hidden, inter, 128)
    ptx = {}
    for name, pf in (("plain", None), ("prefetch", plan)):
        kernel = direct.make_direct_kernel(True, n_out, k_dim, num_experts, 128, config, prefetch=pf)
        call = _with_next_weights(args, num_experts, hidden, inter, 128) if pf else args
        ptx[name] = compile_sm90a_ptx(kernel, *call, dump_root=str(tmp_path / name))
    assert "prefetch.L2" not in ptx["plain"]
    body = ptx["prefetch"]
    assert body.count("cp.async.bulk.prefetch.L2.global") == 2  # the int4 piece and the meta piece
    assert body.rindex("mma.sync") < body.index("cp.async.bulk.prefetch.L2")
    count = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
    assert body.count(count) == ptx["plain"].count(count)
    assert "ld.local" not in body and "st.local" not in body
    with pytest.raises(ValueError, match="up projection with whole units"):
        direct.make_direct_kernel(False, hidden, inter, num_experts, 128, TileConfig(64, 8, direct_warps=8),
                                  prefetch=plan)


def test_next_prefetch_plans():
    """The stream heads follow the next kernel's k-tile order: the direct kernel's warps each take a contiguous run
    of K / 64 / warps k-tiles, the wgmma kernel one run of all; the cap counts (expert, k-tile) blocks of int4."""
    direct_down = TileConfig(64, 8, direct_warps=8, early_weights=True)
    plan = w4a16_plan.next_prefetch(4096, 14336, 128, direct_down, fraction=0.25)
    assert (plan.run, plan.head, plan.n_atoms, plan.k_tiles) == (28, 7, 64, 224)
    assert plan.max_blocks == w4a16_plan.PREFETCH_MAX_BYTES // (64 * 2048)
    assert plan.piece_bytes == 16384 and plan.pieces == 64 * 2048 // 16384 + 1
    wgmma_down = TileConfig(64, 8, k_split=4, deferred_scale=True)
    assert w4a16_plan.next_prefetch(4096, 14336, 128, wgmma_down).run == 224
    assert w4a16_plan.next_prefetch(4096, 14336, 128, wgmma_down, fraction=0.001) is None  # nothing to prefetch
    odd = w4a16_plan.next_prefetch(64 * 12, 1024, 64, direct_down)  # 12 atoms: pieces of one atom's k-tile
    assert odd.piece_bytes == 2048 and odd.pieces == 13
