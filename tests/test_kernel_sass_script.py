"""scripts/kernel_sass.py's reading of a SASS listing (the compile and cuobjdump steps need the CUDA tools; the
parsing is checked here on a listing in cuobjdump's format): the innermost loop holding HGMMA, its k-tiles
(committed wgmma groups), and the report's counts."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "kernel_sass.py"
spec = importlib.util.spec_from_file_location("kernel_sass", SCRIPT)
kernel_sass = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernel_sass)

LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                 /* 0x00000a0000017a02 */
        /*0010*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2 ;   /* 0x0000000000007a02 */
        /*0020*/                   LOP3.LUT R4, R5, 0xf000f, R6, 0xea, !PT ;      /* 0x0000000000007a02 */
        /*0030*/                   HGMMA.64x8x16.F32.BF16 R24, R28, gdesc[UR8], R24 ;  /* 0x0000000000007a02 */
        /*0040*/                   HGMMA.64x8x16.F32.BF16 R24, R32, gdesc[UR8], R24, gsb0 ;  /* 0x0 */
        /*0050*/                   LOP3.LUT R4, R5, 0xf000f, R6, 0xea, !PT ;      /* 0x0000000000007a02 */
        /*0060*/                   HGMMA.64x8x16.F32.BF16 R24, R28, gdesc[UR8], R24, gsb0 ;  /* 0x0 */
        /*0070*/               @P1 BRA 0x10 ;                                     /* 0x0000000000007a02 */
        /*0080*/                   STL [R1], R2 ;                                  /* 0x0000000000007a02 */
        /*0090*/               @P2 BRA 0x0 ;                                      /* 0x0000000000007a02 */
        /*00a0*/                   EXIT ;                                          /* 0x0000000000007a02 */
"""


def test_listing_loop_and_report(capsys):
    lines = kernel_sass.parse_sass(LISTING)
    assert len(lines) == 11 and lines[7] == (0x70, "@P1 BRA 0x10")
    # both backward branches hold HGMMA; the inner one (0x10..0x70, 7 instructions) is the main loop
    assert kernel_sass.main_loop(lines) == (0x10, 0x70, 7)
    assert kernel_sass.main_loop([x for x in lines if "HGMMA" not in x[1]]) is None
    kernel_sass.report(lines, "64x8x4")
    out = capsys.readouterr().out
    assert "HGMMA 3, with gsb0 2" in out and "local memory (spills) 1" in out
    assert "7 instructions, 2 k-tile(s) per iteration -> 4 per k-tile" in out and "2 KB of int4" in out
