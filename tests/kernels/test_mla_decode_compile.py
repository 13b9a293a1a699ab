"""CPU-only tests of the MLA decode kernel (kernels/mla_decode_attention.py): sm_90a compiles of its static
configurations (h = 16 and 128, HG = 16 and 32, block sizes 1 .. 256, with and without split-KV), the cubin's
registers (no spills, the residency the split choice assumes), the PTX it is designed around (PDL wait first, the
mma / shared-memory / cp.async counts per tile), the bank-conflict claims of its shared-memory layout, the split
choice, and the launch wrapper's input checks (all raised before anything touches a GPU).
Run with -s to see the compile time and registers of each case.
"""
import struct

import pytest
import torch

pytest.importorskip("cutlass")

from cutlass.cute.runtime import make_fake_stream  # noqa: E402

from light_moe.kernels import mla_decode_attention as mk  # noqa: E402
from tests.kernels.compile_check import assert_waits_before_loads, compile_sm90a, compile_sm90a_ptx, ptx_entries  # noqa: E402

BF16 = torch.bfloat16
SMEM_PER_SM = 232448  # bytes an H100 SM has for its CTAs, 1 KB of it reserved per CTA
REGS_PER_SM = 65536

# name -> (h, bs, HG, split)
CASES = {
    "v2lite_h16_bs16_split": (16, 16, 16, True),
    "v2lite_h16_bs16_single": (16, 16, 16, False),
    "v3_h128_bs16_hg32_split": (128, 16, 32, True),
    "v3_h128_bs64_hg32_single": (128, 64, 32, False),
    "v3_h128_bs64_hg16_split": (128, 64, 16, True),
    "h48_bs32_split": (48, 32, 16, True),  # a tensor-parallel slice that 32 does not divide
    "h64_bs1_hg32_split": (64, 1, 32, True),  # one table lookup per key
    "h16_bs8_single": (16, 8, 16, False),  # four blocks per 32-key tile
    "h128_bs256_hg32_split": (128, 256, 32, True),  # eight tiles per block
}


def _args(name):
    h, bs, group, split = CASES[name]
    return mk.make_compile_args(h, bs, group, split, stream=make_fake_stream())


def _sections(data: bytes) -> list[dict]:
    shoff, = struct.unpack_from("<Q", data, 0x28)
    entsize, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    secs = []
    for i in range(count):
        name, kind, _, _, off, size, link, _, _, _ = struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * entsize)
        secs.append(dict(name=name, kind=kind, off=off, size=size, link=link))
    names = secs[names_index]
    for s in secs:
        s["name"] = data[names["off"] + s["name"]:data.index(b"\0", names["off"] + s["name"])].decode()
    return secs


def kernel_resources(cubin_path: str) -> dict[str, dict[str, int]]:
    """{kernel symbol: {"regs": registers per thread, "frame": local-memory frame bytes (spills)}} from the cubin's
    .nv.info attributes EIATTR_REGCOUNT (0x2f) and EIATTR_FRAME_SIZE (0x11), each (symbol index, value)."""
    with open(cubin_path, "rb") as f:
        data = f.read()
    secs = _sections(data)
    symtab = next(s for s in secs if s["kind"] == 2)
    strtab = secs[symtab["link"]]
    symbols = {}
    for i in range(symtab["size"] // 24):
        off, = struct.unpack_from("<I", data, symtab["off"] + 24 * i)
        symbols[i] = data[strtab["off"] + off:data.index(b"\0", strtab["off"] + off)].decode()
    info = next(s for s in secs if s["name"] == ".nv.info")
    res: dict[str, dict[str, int]] = {}
    pos, end = info["off"], info["off"] + info["size"]
    while pos < end:
        fmt, attr = data[pos], data[pos + 1]
        if fmt == 4:  # EIFMT_SVAL: u16 size, payload
            size, = struct.unpack_from("<H", data, pos + 2)
            if attr in (0x2F, 0x11) and size == 8:
                sym, value = struct.unpack_from("<II", data, pos + 4)
                res.setdefault(symbols[sym], {})["regs" if attr == 0x2F else "frame"] = value
            pos += 4 + size
        else:
            pos += {3: 4, 2: 3}.get(fmt, 2)
    return {name: v for name, v in res.items() if name.startswith("kernel_")}


@pytest.mark.parametrize("name", list(CASES))
def test_mla_decode_compiles_without_spills(name, tmp_path):
    h, bs, group, split = CASES[name]
    assert mk.supports(BF16, h, 512, 64, bs) == (True, "ok")
    jit_fn, args = _args(name)
    cubin, seconds = compile_sm90a(jit_fn, *args, dump_root=str(tmp_path))
    resources = kernel_resources(cubin)
    attention = next(v for k, v in resources.items() if "attention_kernel" in k)
    short = {("attention" if "attention_kernel" in k else "combine"): v for k, v in resources.items()}
    print(f"\nmla_decode {name}: compiled in {seconds:.2f} s, {short}")
    assert len(resources) == (2 if split else 1)
    assert all(v.get("frame", 0) == 0 for v in resources.values()), f"local memory (spills): {resources}"
    threads = 32 * 4 * (group // 16)
    resident = mk.RESIDENT_CTAS_PER_SM[group]
    assert attention["regs"] * threads * resident <= REGS_PER_SM, "fewer resident CTAs than choose_splits assumes"
    assert (mk.smem_bytes(group, mk.STAGES[group]) + 1024) * resident <= SMEM_PER_SM


@pytest.mark.parametrize("name", ["v2lite_h16_bs16_split", "v3_h128_bs16_hg32_split"])
def test_ptx_structure(name, tmp_path):
    """Both kernels wait for their predecessor (PDL) before any global load. Per tile the attention kernel does
    36 S mma (9 k-steps x 4 key n-tiles) + 32 PV mma (2 key chunks x 16 value n-tiles), each once in the code,
    from 36 8-byte key and 16 16-byte value loads of shared memory; the partial scores go through shared memory
    (8 stores, 32 loads); the tile arrives by 16-byte cp.async (stages - 1 tiles in the prologue, one in the loop),
    two barriers per tile."""
    h, bs, group, split = CASES[name]
    jit_fn, args = _args(name)
    ptx = compile_sm90a_ptx(jit_fn, *args, dump_root=str(tmp_path))
    entries = ptx_entries(ptx)
    assert len(entries) == 2, list(entries)
    assert_waits_before_loads(entries)
    attn = next(body for kernel_name, body in entries.items() if "attention_kernel" in kernel_name)
    assert attn.count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == 36 + 32
    assert attn.count("ld.shared.v2.b32") == 36 and attn.count("ld.shared.v4.b32") == 16
    assert attn.count("st.shared.v2.f32") == 8 and attn.count("ld.shared.v2.f32") == 32
    chunks_per_thread = mk.ROW_CHUNKS * mk.TILE_KEYS // (32 * 4 * (group // 16))
    assert attn.count("cp.async.cg.shared.global") == mk.STAGES[group] * chunks_per_thread
    assert attn.count("bar.sync") == 2
    assert attn.count("ld.global.nc.v2.b32") == 2 * 9  # q_abs: two rows x 9 k-steps, once
    assert "ex2.approx" in attn


def test_key_permutation_and_bank_conflicts():
    """sigma is a permutation of 0..7, and with PITCH every shared-memory phase of the S loads (16 lanes x 8 bytes)
    and of the V loads (8 lanes x 16 bytes) touches each 4-byte bank once (the module docstring's claim)."""
    sigma = [mk.key_column(n) for n in range(8)]
    assert sorted(sigma) == list(range(8))
    assert mk.PITCH % 16 == 0 and mk.PITCH >= mk.ROW_BYTES

    def banks(addresses: list[int], width: int) -> list[int]:
        return [(a // 4 + w) % 32 for a in addresses for w in range(width // 4)]

    for quarter in range(4):
        for step in range(9):
            for half in range(2):  # lanes 0-15 and 16-31 of an 8-byte load
                addrs = [mk.key_column(g) * mk.PITCH + quarter * 288 + 32 * step + 8 * c
                         for g in range(4 * half, 4 * half + 4) for c in range(4)]
                assert sorted(banks(addrs, 8)) == list(range(32))
    for quarter in range(4):
        for u in range(2):
            for hh in range(2):
                for e in range(2):
                    for phase in range(4):  # lanes 8p .. 8p + 7 of a 16-byte load: g in {2p, 2p + 1}, c in 0..3
                        addrs = [(8 * hh + mk.key_column(2 * c + e)) * mk.PITCH + (quarter * 128 + 64 * u + 8 * g) * 2
                                 for g in (2 * phase, 2 * phase + 1) for c in range(4)]
                        assert sorted(banks(addrs, 16)) == list(range(32))


def test_supports_reasons():
    assert mk.supports(BF16, 16, 512, 64, 16) == (True, "ok")
    assert mk.supports(BF16, 128, 512, 64, 1) == (True, "ok")
    assert mk.supports(BF16, 112, 512, 64, 256) == (True, "ok")
    assert "dtype" in mk.supports(torch.float16, 16, 512, 64, 16)[1]
    assert "latent" in mk.supports(BF16, 16, 256, 64, 16)[1]
    assert "latent" in mk.supports(BF16, 16, 512, 32, 16)[1]
    assert "multiple of 16" in mk.supports(BF16, 8, 512, 64, 16)[1]
    assert "multiple of 16" in mk.supports(BF16, 40, 512, 64, 16)[1]
    assert "power of two" in mk.supports(BF16, 16, 512, 64, 24)[1]
    assert mk.heads_per_cta(16) == 16 and mk.heads_per_cta(48) == 16 and mk.heads_per_cta(128) == 32


@pytest.mark.parametrize("batch", [1, 8, 64, 256])
@pytest.mark.parametrize("max_blocks", [1, 7, 64, 2048])
@pytest.mark.parametrize("block_size", [1, 16, 64])
@pytest.mark.parametrize("heads", [16, 128])
def test_choose_splits_covers_every_tile(batch, max_blocks, block_size, heads):
    group = mk.heads_per_cta(heads)
    n_tiles = -(-max_blocks * block_size // mk.TILE_KEYS)
    splits, per_split = mk.choose_splits(batch, heads, max_blocks, block_size, 132, group)
    assert splits >= 1 and per_split >= 1
    assert splits * per_split >= n_tiles > (splits - 1) * per_split  # every tile owned, no empty last split
    if splits > 1:
        assert batch * heads // group * splits <= mk.RESIDENT_CTAS_PER_SM[group] * 132  # one wave, never two
        assert per_split >= min(mk.MIN_TILES_PER_SPLIT, n_tiles)
    forced, forced_per_split = mk.choose_splits(batch, heads, max_blocks, block_size, 132, group, num_splits=5)
    assert forced <= 5 and forced * forced_per_split >= n_tiles > (forced - 1) * forced_per_split


def test_choose_splits_fills_one_wave():
    """V2-Lite (h = 16, HG = 16, two CTAs per SM: 264 per wave) and V3 (h = 128, HG = 32: 4 CTAs per sequence,
    132 per wave) at 32k context (1024 tiles) and bs = 16."""
    assert mk.choose_splits(1, 16, 2048, 16, 132, 16) == (256, 4)  # 264 CTAs would leave 3.9 tiles each
    assert mk.choose_splits(64, 16, 2048, 16, 132, 16) == (4, 256)
    assert mk.choose_splits(1, 128, 2048, 16, 132, 32) == (32, 32)
    assert mk.choose_splits(64, 128, 2048, 16, 132, 32) == (1, 1024)  # 256 CTAs: already two waves
    assert mk.choose_splits(1, 16, 1, 16, 132, 16) == (1, 1)  # one tile


def _inputs(batch=2, heads=16, block_size=16, blocks=8, width=4):
    q = torch.zeros(batch, heads, 576, dtype=BF16)
    cache = torch.zeros(blocks, block_size, 576, dtype=BF16)
    tables = torch.zeros(batch, width, dtype=torch.int32)
    ctx = torch.ones(batch, dtype=torch.int32)
    return q, cache, tables, ctx


@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(q=a["q"][:, :, :512].contiguous(), cache=a["cache"][:, :, :512].contiguous()),
     "latent 512 \\+ rope 0"),
    (lambda a: a.update(q=a["q"].transpose(0, 1)), "contiguous"),
    (lambda a: a.update(q=a["q"].float(), cache=a["cache"].float()), "dtype"),
    (lambda a: a.update(q=a["q"][:, :8].contiguous()), "multiple of 16"),
    (lambda a: a.update(cache=a["cache"][:, :, :512].contiguous()), "latent_cache"),  # q 576 wide
    (lambda a: a.update(cache=torch.zeros(8, 24, 576, dtype=BF16)), "power of two"),
    (lambda a: a.update(tables=a["tables"].long()), "block_tables"),
    (lambda a: a.update(tables=a["tables"][:1]), "block_tables"),
    (lambda a: a.update(tables=a["tables"].t().contiguous().t()), "block_tables"),
    (lambda a: a.update(ctx=a["ctx"].long()), "ctx_lens"),
    (lambda a: a.update(ctx=a["ctx"][:1]), "ctx_lens"),
    (lambda a: a.update(out=torch.zeros(2, 16, 576, dtype=BF16)), "out"),
    (lambda a: a.update(out=torch.zeros(2, 16, 512)), "out"),
    (lambda a: None, "CUDA device"),  # every shape right, but on the CPU
])
def test_wrapper_rejects_bad_inputs(change, message):
    q, cache, tables, ctx = _inputs()
    args = dict(q=q, cache=cache, tables=tables, ctx=ctx, out=None)
    change(args)
    with pytest.raises(ValueError, match=message):
        mk.mla_decode_attention(args["q"], args["cache"], args["tables"], args["ctx"], 0.1, out=args["out"])


def test_cute_ops_keeps_cpu_tensors_and_prefill_on_the_reference():
    """CuteOps.mla_attention: CPU tensors (decode) and prefill steps give the reference backend's result exactly,
    each fallback logged under its own op with its reason."""
    from light_moe.ops.attention import AttentionMetadata
    from light_moe.ops.backend import ReferenceOps
    from light_moe.ops.cute_backend import CuteOps

    torch.manual_seed(0)
    heads, nope, v_dim, bs = 16, 16, 8, 4
    lengths = [5, 11, 1]
    cache = torch.randn(16, bs, 576).to(BF16)
    tables = torch.tensor([[3, 7, 0], [1, 2, 9], [5, 0, 0]], dtype=torch.int32)
    kv_b = (torch.randn(heads * (nope + v_dim), 512) * 0.05).to(BF16)
    ops = CuteOps()
    for query_lens in ([1, 1, 1], [2, 3, 1]):
        meta = AttentionMetadata.for_lengths(lengths, query_lens, tables)
        q = torch.randn(sum(query_lens), heads, nope + 64).to(BF16)
        got = ops.mla_attention(q, cache, kv_b, meta, 0.1)
        assert torch.equal(got, ReferenceOps().mla_attention(q, cache, kv_b, meta, 0.1))
    logged = dict(ops._logged)
    assert "cpu" in logged["MLA decode attention"] and "decode-only" in logged["MLA prefill attention"], logged
