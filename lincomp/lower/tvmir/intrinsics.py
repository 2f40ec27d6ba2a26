"""``exp2(x)`` for generated TVMScript: a vectorisable 2**x on the LLVM CPU target.

TVM lowers ``T.exp2`` to ``llvm.exp2``, which LLVM turns into one scalar libm call per lane: the softmax
would spend most of its time there. ``exp2`` here is a TIR intrinsic (``tirx.lincomp_exp2``) that the
vectoriser widens like any pure op and that lowers (after vectorisation) to::

    x = clamp(x, -127, 127);  n = round(x);  f = x - n            # f in [-0.5, 0.5]
    2**x = poly5(f) * bits_as_float((int(n) + 127) << 23)           # max relative error 2.2e-7

It returns exactly 0 for x <= -127 (also -inf), so masked scores add nothing, never overflows, and
returns NaN for NaN (a NaN or Inf in the inputs reaches the output, as in the reference).
Registering it is idempotent and touches no TVM op but its own.
"""

from __future__ import annotations

import hashlib

import tvm
from tvm import tirx

from lincomp.lower.tvmir.codegen import EXP2_POLY, EXP2_POLY_BF16, TRANSPOSE_SIZES

OP_NAME = "tirx.lincomp_exp2"
# The bf16 window kernel's probabilities are rounded to bf16 (relative error 2^-9) before P @ V: a degree-3
# polynomial (max relative error 1.4e-4) is exact enough there and two FMAs a vector cheaper.
OP_NAME_BF16 = "tirx.lincomp_exp2_bf16"
_registered = False


def _lower_exp2(call, coeffs=EXP2_POLY):
    x = call.args[0]
    dt = x.ty.dtype
    lanes = dt.lanes
    idt = "int32" if lanes == 1 else f"int32x{lanes}"
    xv, fv = tirx.Var("x", dt), tirx.Var("f", dt)
    n = tirx.round(xv)
    poly = tirx.const(coeffs[-1], dt)
    for c in coeffs[-2::-1]:
        poly = poly * fv + tirx.const(c, dt)
    bits = tirx.shift_left(tirx.Cast(idt, n) + tirx.const(127, idt), tirx.const(23, idt))
    body = poly * tirx.reinterpret(dt, bits)
    clamped = tirx.max(tirx.min(x, tirx.const(127.0, dt)), tirx.const(-127.0, dt))
    # The clamp (LLVM minnum / maxnum) would turn NaN into 2^127: pass NaN through, so a NaN or Inf input
    # (inf - inf) makes the output NaN as in the reference, never finite garbage.
    value = tirx.Let(xv, clamped, tirx.Let(fv, xv - n, body))
    # NaN test on the bits (|x| > inf): TVM's simplifier folds ``x != x`` to false.
    magnitude = tirx.bitwise_and(tirx.reinterpret(idt, x), tirx.const(0x7FFFFFFF, idt))
    return tirx.Select(magnitude > tirx.const(0x7F800000, idt), x, value)


def register() -> None:
    """Register ``tirx.lincomp_exp2`` and its LLVM lowering (once per process)."""
    global _registered
    if _registered:
        return
    for op, coeffs in ((OP_NAME, EXP2_POLY), (OP_NAME_BF16, EXP2_POLY_BF16)):
        short = op.split(".")[1]
        for attr, value in (("TCallEffectKind", 1), ("TVectorizable", True), ("TScriptPrinterName", short),
                            ("TGlobalSymbol", short)):
            tvm.ir.register_op_attr(op, attr, value)
        tirx.op.register_intrin_lowering(op, "llvm", f=lambda call, c=coeffs: _lower_exp2(call, c), level=100)
    _registered = True


def exp2(x):
    """2**x for float32 TIR expressions (what generated scripts call as ``exp2(...)``)."""
    register()
    return tirx.call_intrin("float32", OP_NAME, x)


def exp2_bf16(x):
    """2**x to 1.4e-4 relative (the bf16 kernel's probabilities; generated scripts call ``exp2_bf16(...)``)."""
    register()
    return tirx.call_intrin("float32", OP_NAME_BF16, x)


SCRIPT_VARS = {"exp2": exp2, "exp2_bf16": exp2_bf16}


# -- bf16 dot products (AVX-512 BF16) ---------------------------------------------------------------
# TVM 0.27 legalises bfloat16 values to float32 before LLVM sees them, so a TIR call of the dot-product
# intrinsic cannot be typed. The bf16 kernels keep bf16 data as int32 words (two bf16 each) and call three
# helpers written in LLVM IR, linked into the module (``pragma_import_llvm``) and inlined by LLVM:
#   lincomp_dpbf16(acc, a, b):  acc[l] + a.lo[l] * b.lo[l] + a.hi[l] * b.hi[l]  (vdpbf16ps, fp32 accumulate)
#   lincomp_pack_bf16(x, y):    word l = bf16(x[l]) | bf16(y[l]) << 16           (vcvtne2ps2bf16, round to even)
#   lincomp_round_bf16(x):      x[0..15] as 16 bf16 values in 8 words              (the output rows)
# linkonce_odr: every PrimFunc of a module imports them; the linker keeps one copy.
BF16_LLVM = r"""
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)

define linkonce_odr <16 x float> @lincomp_dpbf16(<16 x float> %acc, <16 x i32> %a, <16 x i32> %b) alwaysinline {
  %a2 = bitcast <16 x i32> %a to <32 x bfloat>
  %b2 = bitcast <16 x i32> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %acc, <32 x bfloat> %a2, <32 x bfloat> %b2)
  ret <16 x float> %r
}

define linkonce_odr <16 x i32> @lincomp_pack_bf16(<16 x float> %x, <16 x float> %y) alwaysinline {
  %x2 = fptrunc <16 x float> %x to <16 x bfloat>
  %y2 = fptrunc <16 x float> %y to <16 x bfloat>
  %xy = shufflevector <16 x bfloat> %x2, <16 x bfloat> %y2, <32 x i32> <i32 0, i32 16, i32 1, i32 17, i32 2, i32 18, i32 3, i32 19, i32 4, i32 20, i32 5, i32 21, i32 6, i32 22, i32 7, i32 23, i32 8, i32 24, i32 9, i32 25, i32 10, i32 26, i32 11, i32 27, i32 12, i32 28, i32 13, i32 29, i32 14, i32 30, i32 15, i32 31>
  %w = bitcast <32 x bfloat> %xy to <16 x i32>
  ret <16 x i32> %w
}

define linkonce_odr <8 x i32> @lincomp_round_bf16(<16 x float> %x) alwaysinline {
  %x2 = fptrunc <16 x float> %x to <16 x bfloat>
  %w = bitcast <16 x bfloat> %x2 to <8 x i32>
  ret <8 x i32> %w
}
"""
SCRIPT_VARS["BF16_LLVM"] = BF16_LLVM


# -- n x n transposes in registers ------------------------------------------------------------------------
# A vectorised strided copy (``for r in T.vectorized(C): qT[f, r] = q[r, f]``) is a gather: one element per
# lane and cycle or worse. lincomp_transpose{n}(dst, dst_stride, src, src_stride) loads n rows of n floats,
# exchanges one bit of the (row, column) index per stage (log2 n stages of n two-source shuffles) and stores
# n rows: dst[i, j] = src[j, i], strides in elements. Printed for every vector width the kernels use.
def transpose_llvm(n: int) -> str:
    """LLVM IR of ``lincomp_transpose{n}`` (n a power of two)."""
    vt = f"<{n} x float>"
    lines = [f"define linkonce_odr void @lincomp_transpose{n}(ptr %dst, i32 %ds, ptr %src, i32 %ss) alwaysinline {{",
             "  %ss64 = sext i32 %ss to i64", "  %ds64 = sext i32 %ds to i64"]
    rows = []
    for r in range(n):
        lines += [f"  %so{r} = mul i64 %ss64, {r}", f"  %sp{r} = getelementptr float, ptr %src, i64 %so{r}",
                  f"  %t0_{r} = load {vt}, ptr %sp{r}, align 4"]
        rows.append(f"%t0_{r}")
    bit, stage = 1, 0
    while bit < n:   # swap bit ``bit`` between the row and the column index
        new = list(rows)
        for lo in (r for r in range(n) if not r & bit):
            hi = lo | bit
            for dst, mask in ((lo, [c if not c & bit else n + (c ^ bit) for c in range(n)]),
                              (hi, [(c ^ bit) if not c & bit else n + c for c in range(n)])):
                new[dst] = f"%t{stage + 1}_{dst}"
                lanes = ", ".join(f"i32 {m}" for m in mask)
                lines.append(f"  {new[dst]} = shufflevector {vt} {rows[lo]}, {vt} {rows[hi]}, <{n} x i32> <{lanes}>")
        rows, bit, stage = new, bit * 2, stage + 1
    for r in range(n):
        lines += [f"  %do{r} = mul i64 %ds64, {r}", f"  %dp{r} = getelementptr float, ptr %dst, i64 %do{r}",
                  f"  store {vt} {rows[r]}, ptr %dp{r}, align 4"]
    return "\n".join(lines + ["  ret void", "}"]) + "\n"


TRANSPOSE_LLVM = "".join(transpose_llvm(n) for n in TRANSPOSE_SIZES)
SCRIPT_VARS["TRANSPOSE_LLVM"] = TRANSPOSE_LLVM
# What the generated text names but does not spell out (the helpers' IR, the exp2 polynomials): part of every
# module's cache key, so editing them rebuilds cached modules.
FINGERPRINT = hashlib.sha256(repr((BF16_LLVM, TRANSPOSE_LLVM, EXP2_POLY, EXP2_POLY_BF16)).encode()).hexdigest()[:12]
