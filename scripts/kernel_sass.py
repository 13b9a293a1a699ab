"""SASS of a grouped-GEMM kernel, compiled on this machine (no GPU) for sm_90a: instruction counts per
k-tile of its main loop, wgmma waits, spills; optionally compared line by line with another checkout.

    pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm    # also on CPU-only machines
    python scripts/kernel_sass.py w4a16 down 64x8x4                  # tile spec as in bench.w4a16_experts
    python scripts/kernel_sass.py w4a16 up 128x256x1p --against ../old-checkout
    python scripts/kernel_sass.py w4a16 down 64x8g8e                 # the direct decode kernel (mma.sync)
    python scripts/kernel_sass.py bf16 up 256x128p --dump sass.txt

The W4A16 decode kernel is bound by issue slots (Nsight Compute, BENCHMARKS.md), so the instructions per
k-tile and per KB of int4 of its main loop predict its speed; `--against` shows that a refactor left a
kernel's code unchanged (no difference: no GPU run needed to trust it).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")  # read once, when cutlass is imported

MIXTRAL = dict(num_experts=8, hidden=4096, inter=14336)


def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    for base in map(Path, sys.path):
        for candidate in base.glob("nvidia/cu*/bin/cuobjdump"):
            return str(candidate)
    raise SystemExit("cuobjdump not found: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")


def compile_cubin(repo: Path, kind: str, proj: str, spec: str, group_size: int, out_dir: str) -> str:
    """Compile in a child process with `repo` first on sys.path (so --against compiles the other checkout)."""
    code = f"""
import sys
sys.path.insert(0, {str(repo)!r})
from tests.kernels.compile_check import compile_sm90a
from light_moe.bench.w4a16_experts import _parse_config
gated = {proj == "up"}
E, H, I, G = {MIXTRAL["num_experts"]}, {MIXTRAL["hidden"]}, {MIXTRAL["inter"]}, {group_size}
if {kind == "w4a16"}:
    from tests.kernels.test_w4a16_compile import _args
    from light_moe.kernels.w4a16_gemm import W4A16_TILE_TABLE, W4A16GroupedGemmSm90
    n_out, k_dim, args = _args(gated, E, H, I, G)
    config = _parse_config({spec!r}, W4A16_TILE_TABLE)
    if config.direct_warps:
        from light_moe.kernels.w4a16_direct import make_direct_kernel
        kernel = make_direct_kernel(gated, n_out, k_dim, E, G, config)
        try:  # its stream-K workspace (a checkout from before session 19 has none)
            from tests.kernels.test_w4a16_direct_compile import _args as _direct_args
            n_out, k_dim, args = _direct_args(gated, E, H, I, G)
        except ImportError:
            pass
    else:
        kernel = W4A16GroupedGemmSm90(gated=gated, n_out=n_out, k_dim=k_dim, num_experts=E, group_size=G,
                                      config=config)
else:
    from tests.kernels.test_grouped_gemm_compile import _args
    from light_moe.kernels.grouped_gemm import GroupedGemmSm90
    from light_moe.kernels.tile_config import TILE_TABLE
    n_out, k_dim, args = _args(gated, E, H, I)
    config = _parse_config({spec!r}, [(0, *row[1:], 1) for row in TILE_TABLE])
    kernel = GroupedGemmSm90(gated=gated, n_out=n_out, k_dim=k_dim, num_experts=E, config=config)
print(compile_sm90a(kernel, *args, dump_root={out_dir!r})[0])
"""
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=repo)
    if proc.returncode != 0:
        raise SystemExit(f"compile failed in {repo}:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


def sass_lines(cubin: str) -> list[tuple[int, str]]:
    """(address, instruction) of every SASS instruction in the cubin."""
    tool = cuobjdump()
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(tool).parent), os.environ.get("PATH", "")])}  # nvdisasm
    return parse_sass(subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True,
                                     env=env).stdout)


def parse_sass(text: str) -> list[tuple[int, str]]:
    """cuobjdump -sass text -> (address, instruction) pairs."""
    return [(int(m.group(1), 16), m.group(2).strip())
            for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", text)]


def main_loop(lines: list[tuple[int, str]]) -> tuple[int, int, int] | None:
    """(first address, last address, instructions) of the innermost backward branch range holding HGMMA (wgmma)
    or HMMA (mma.sync: the direct decode kernel)."""
    best = None
    for addr, ins in lines:
        m = re.search(r"BRA (0x[0-9a-f]+)", ins)
        if not m or int(m.group(1), 16) >= addr:
            continue
        start = int(m.group(1), 16)
        body = [i for a, i in lines if start <= a <= addr]
        inner = best is None or addr - start < best[1] - best[0]
        if inner and any("HGMMA" in i or "HMMA" in i for i in body):
            best = (start, addr, len(body))
    return best


def report(lines: list[tuple[int, str]], spec: str, w4a16: bool = True) -> None:
    ins = [i for _, i in lines]

    def count(pattern: str) -> int:
        return sum(1 for i in ins if re.search(pattern, i))

    spills = count(r"\bLDL|\bSTL")
    print(f"instructions {len(ins)}, HGMMA {count('HGMMA')}, with gsb0 {count('HGMMA.*gsb0')}, "
          f"WARPGROUP.DEPBAR {count('WARPGROUP.DEPBAR')}, local memory (spills) {spills}")
    loop = main_loop(lines)
    if loop is None:
        print("no loop with HGMMA found")
        return
    start, end, size = loop
    body = [i for a, i in lines if start <= a <= end]
    k_tiles = sum(1 for i in body if "HGMMA" in i and "gsb0" in i)  # one committed wgmma group per k-tile
    tile_w = int(spec.split("x")[0])
    direct = k_tiles == 0  # mma.sync: one warp's 64 rows x 64 of K are 16 HMMA.16816
    if direct:
        k_tiles = sum(1 for i in body if "HMMA" in i) // 16
    print(f"main loop {start:#x}..{end:#x}: {size} instructions, {k_tiles} k-tile(s) per iteration -> "
          f"{size / max(k_tiles, 1):.0f} per k-tile and warp; kinds: "
          + ", ".join(f"{op} {n}" for op, n in _top_ops(body)))
    if k_tiles and w4a16:
        rows = 64 if direct else tile_w
        print(f"(one k-tile of {rows} rows is {rows * 64 // 2 // 1024} KB of int4 for the "
              f"{'warp' if direct else 'CTA'})")


def _top_ops(body: list[str], n: int = 8) -> list[tuple[str, int]]:
    ops: dict[str, int] = {}
    for i in body:
        op = i.split()[0] if not i.startswith("@") else i.split()[1]
        op = op.split(".")[0]
        ops[op] = ops.get(op, 0) + 1
    return sorted(ops.items(), key=lambda kv: -kv[1])[:n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["w4a16", "bf16"])
    p.add_argument("proj", choices=["up", "down"])
    p.add_argument("spec", help="tile spec, e.g. 64x8x4 (w4a16) or 256x128p (bf16), as in bench.w4a16_experts")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--against", type=Path, help="another checkout: compile there too and compare the SASS")
    p.add_argument("--dump", type=Path, help="write this checkout's SASS here")
    args = p.parse_args()
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        lines = sass_lines(compile_cubin(repo, args.kind, args.proj, args.spec, args.group_size, tmp))
        if args.dump:
            args.dump.write_text("\n".join(f"{a:#06x} {i}" for a, i in lines) + "\n")
        print(f"{args.kind} {args.proj} {args.spec} (Mixtral shape, g={args.group_size}):")
        report(lines, args.spec, args.kind == "w4a16")
        if args.against:
            other = sass_lines(compile_cubin(args.against.resolve(), args.kind, args.proj, args.spec,
                                             args.group_size, tmp))
            same = [i for _, i in lines] == [i for _, i in other]
            print(f"against {args.against}: {'identical SASS' if same else 'SASS differs'} "
                  f"({len(lines)} vs {len(other)} instructions)")


if __name__ == "__main__":
    main()
