"""int4 -> bf16 in registers for the W4A16 grouped GEMM (w4a16_gemm.py): inline PTX on 32-bit registers.

The packed layout (w4a16_layout.py) puts nibbles i and i + 4 of a 32-bit word into the two halves of one bf16x2
A register, so one shift + lop3 builds bf16x2 (128 + q_i, 128 + q_{i+4}) exactly; an exact fma removes
128 + z and a second fma applies the group scale with one rounding: 3.75 instructions per register (nibble 0
needs no shift), Marlin's count. On a power-limited H200 they cost ~8% of the prefill kernel's per-cycle rate
(benchmarks/results/prefill_power_h200_session8/).

Deferred scale (TileConfig.deferred_scale): the A register takes the exact q - z (shift + lop3 into a temporary,
then one fma into A after the wgmma wait: 2.75 instructions per register), the wgmma sums one group into its own
fp32 accumulator, and fold_scaled adds that sum times the group scale to the total: one fp32 fma per accumulator
value per group instead of one bf16x2 fma per A register per k-tile (cheaper while a tile has few token columns).
"""

from __future__ import annotations

from cutlass import Float32, Int32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import dsl_user_op

__all__ = ["apply_scale", "bf16_lo_to_f32", "dequant_exact", "fold_scaled", "nibble_bits", "prmt", "remove_zero"]


def _asm_b32(asm: str, operands: tuple, side_effects: bool, loc, ip) -> Int32:
    """One 32-bit result ($0) of inline PTX over 32-bit register operands ($1, $2, ...)."""
    constraints = ",".join(["=r"] + ["r"] * len(operands))
    values = [Int32(x).ir_value(loc=loc, ip=ip) for x in operands]
    return Int32(llvm.inline_asm(Int32.mlir_type, values, asm, constraints, has_side_effects=side_effects,
                                 is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT))


@dsl_user_op
def prmt(a: Int32, selector: int, *, loc=None, ip=None) -> Int32:
    """prmt.b32 d, a, 0, selector: 0x1010 -> (lo16, lo16), 0x3232 -> (hi16, hi16)."""
    return _asm_b32(f"prmt.b32 $0, $1, 0, {selector:#x};", (a,), False, loc, ip)


@dsl_user_op
def dequant_exact(q: Int32, index: int, neg_zero2: Int32, *, loc=None, ip=None) -> Int32:
    """bf16x2 (q_i - z, q_{i+4} - z) from nibbles i and i + 4 of q, exact: the dequant minus its scale.

    lop3 0xEA = (a & b) | c puts nibble i at bits 0-3 and nibble i + 4 at bits 16-19 of the mantissas of
    two bf16 128.0 (0x4300): bf16x2 (128 + q_i, 128 + q_{i+4}), exact. Then fma(t, 1.0, -(128 + z)) = q - z
    (exact, small integers). The result is a temporary, not a wgmma operand, so this may run while a wgmma
    is in flight.
    """
    shift = f"shr.u32 t, $1, {4 * index};" if index else "mov.b32 t, $1;"
    asm = (
        "{ .reg .b32 t, one;\n"
        f"{shift}\n"
        "lop3.b32 t, t, 0x000F000F, 0x43004300, 0xEA;\n"
        "mov.b32 one, 0x3F803F80;\n"
        "fma.rn.bf16x2 $0, t, one, $2; }"
    )
    return _asm_b32(asm, (q, neg_zero2), False, loc, ip)


@dsl_user_op
def apply_scale(t: Int32, scale2: Int32, *, loc=None, ip=None) -> Int32:
    """fma(t, s, -0.0) = bf16x2 ((q - z) s), one rounding: the same bf16 as rounding the fp32 dequantisation.

    The only instruction that writes a wgmma A register. ptxas serialises every wgmma of the kernel (C7513)
    when a non-wgmma instruction defines a wgmma input while a wgmma is in flight, so callers issue it only
    after wait_group(0); has_side_effects keeps LLVM from moving it above that wait.
    """
    asm = "{ .reg .b32 nzero;\nmov.b32 nzero, 0x80008000;\nfma.rn.bf16x2 $0, $1, $2, nzero; }"
    return _asm_b32(asm, (t, scale2), True, loc, ip)


@dsl_user_op
def nibble_bits(q: Int32, index: int, *, loc=None, ip=None) -> Int32:
    """bf16x2 (128 + q_i, 128 + q_{i+4}) from nibbles i and i + 4 of q (shift + lop3, exact); deferred scale:
    a temporary, written while a wgmma may be in flight."""
    shift = f"shr.u32 t, $1, {4 * index};" if index else "mov.b32 t, $1;"
    asm = "{ .reg .b32 t;\n" f"{shift}\n" "lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA; }"
    return _asm_b32(asm, (q,), False, loc, ip)


@dsl_user_op
def remove_zero(t: Int32, neg_zero2: Int32, *, loc=None, ip=None) -> Int32:
    """fma(t, 1.0, -(128 + z)) = bf16x2 q - z, exact (small integers): deferred scale's A register write. Like
    apply_scale it must follow wait_group(0) (has_side_effects keeps LLVM from hoisting it above the wait)."""
    asm = "{ .reg .b32 one;\nmov.b32 one, 0x3F803F80;\nfma.rn.bf16x2 $0, $1, one, $2; }"
    return _asm_b32(asm, (t, neg_zero2), True, loc, ip)


@dsl_user_op
def bf16_lo_to_f32(word: Int32, *, loc=None, ip=None) -> Float32:
    """The bf16 in the low half of word as fp32 (exact: bf16 is fp32's upper half)."""
    value = llvm.inline_asm(Float32.mlir_type, [Int32(word).ir_value(loc=loc, ip=ip)],
                            "{ .reg .b32 t;\nshl.b32 t, $1, 16;\nmov.b32 $0, t; }", "=f,r",
                            has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT)
    return Float32(value)


@dsl_user_op
def fold_scaled(total: Float32, part: Float32, scale: Float32, *, loc=None, ip=None) -> Float32:
    """total + part * scale as one fp32 fma (one rounding), the deferred scale's fold of a group's sum."""
    values = [Float32(x).ir_value(loc=loc, ip=ip) for x in (part, scale, total)]
    value = llvm.inline_asm(Float32.mlir_type, values, "fma.rn.f32 $0, $1, $2, $3;", "=f,f,f,f",
                            has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT)
    return Float32(value)
