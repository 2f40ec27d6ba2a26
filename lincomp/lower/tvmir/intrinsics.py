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

import tvm
from tvm import tirx

from lincomp.lower.tvmir.codegen import EXP2_POLY

OP_NAME = "tirx.lincomp_exp2"
_registered = False


def _lower_exp2(call):
    x = call.args[0]
    dt = x.ty.dtype
    lanes = dt.lanes
    idt = "int32" if lanes == 1 else f"int32x{lanes}"
    xv, fv = tirx.Var("x", dt), tirx.Var("f", dt)
    n = tirx.round(xv)
    poly = tirx.const(EXP2_POLY[5], dt)
    for c in EXP2_POLY[4::-1]:
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
    for attr, value in (("TCallEffectKind", 1), ("TVectorizable", True), ("TScriptPrinterName", "lincomp_exp2"),
                        ("TGlobalSymbol", "lincomp_exp2")):
        tvm.ir.register_op_attr(OP_NAME, attr, value)
    tirx.op.register_intrin_lowering(OP_NAME, "llvm", f=_lower_exp2, level=100)
    _registered = True


def exp2(x):
    """2**x for float32 TIR expressions (what generated scripts call as ``exp2(...)``)."""
    register()
    return tirx.call_intrin("float32", OP_NAME, x)


SCRIPT_VARS = {"exp2": exp2}
