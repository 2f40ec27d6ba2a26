"""Small helpers the TVMScript templates share: an indenting line writer and inlined math snippets.

Templates emit plain TVMScript text (what ``kernel.source`` shows); nothing here imports tvm.
Conventions of the generated code:
- softmax runs in base 2: scores are pre-multiplied by ``scale * log2(e)`` and exponentiated with
  ``exp2`` (:mod:`.intrinsics`: a vectorisable polynomial; LLVM's ``exp`` becomes scalar libm calls);
- micro-kernels keep an ``MR x width`` accumulator tile in a stack buffer (<= 1 KiB, so LLVM promotes it
  to vector registers): ``width`` is the vectorised axis (query rows of a tile, or head-dim columns).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, List

LOG2E = 1.4426950408889634
# 2^f on f in [-0.5, 0.5], degree 5 (least squares on relative error, fp32 Horner: max rel err 2.2e-7).
EXP2_POLY = (1.0000001192092896, 0.6931469440460205, 0.24022121727466583, 0.05550742521882057,
             0.009675459936261177, 0.0013266970636323094)
# The same fit at degree 3 (max rel err 1.4e-4): the bf16 kernel's probabilities, rounded to bf16 (2^-9) next.
EXP2_POLY_BF16 = (0.9999513626098633, 0.6932530403137207, 0.2422569841146469, 0.05502926558256149)
# Largest accumulator tile (bytes) TVM keeps on the stack (runtime::kMaxStackAlloca); LLVM can then
# promote it to registers. Bigger tiles go to the heap workspace and stay in memory.
STACK_TILE_BYTES = 1024


class Script:
    """Collects TVMScript lines with indentation: ``s("line")``; ``with s.block("for ...:"):``."""

    def __init__(self) -> None:
        self.lines: List[str] = []
        self.depth = 0
        self._names = 0

    def __call__(self, *lines: str) -> None:
        for line in lines:
            self.lines.append(("    " * self.depth + line) if line else "")

    @contextmanager
    def block(self, header: str) -> Iterator[None]:
        self(header)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    @contextmanager
    def block_if(self, header) -> Iterator[None]:
        """``block(header)`` when a header is given, else no new block (same indentation)."""
        if header:
            with self.block(header):
                yield
        else:
            yield

    def fresh(self, stem: str) -> str:
        """A new local name (``stem_3``) for generated let-bindings."""
        self._names += 1
        return f"{stem}_{self._names}"

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def f32(x: float) -> str:
    """A float32 literal in TVMScript."""
    if math.isinf(x):
        return "T.float32(-math.inf)" if x < 0 else "T.float32(math.inf)"
    return f"T.float32({float(x)!r})"


NEG_INF = "T.float32(-math.inf)"


def base2(logits):
    """Sink logits (a float tensor) times log2(e), as float32: what the kernels take. Scaling on the host
    keeps ``t * log2(e) - max`` out of the kernel, where LLVM fuses it into an fma whose unrounded
    product differs from the rounded max by an ulp of a huge logit (exp2 of garbage at -1e10)."""
    return (logits.double() * LOG2E).float().contiguous()


def exp2(arg: str, bf16: bool = False) -> str:
    """``2 ** arg`` in generated code: the vectorisable intrinsic of :mod:`.intrinsics` (exact 0 at -inf);
    ``bf16``: its degree-3 form, for probabilities rounded to bf16 next."""
    return f"exp2_bf16({arg})" if bf16 else f"exp2({arg})"


def check_config_int(value, name: str, lo: int, hi: int, pow2: bool = False) -> None:
    """Raise ValueError / TypeError unless ``value`` is an int in [lo, hi] (a power of two if ``pow2``):
    a config from a user or the tuning database never reaches the code generator out of range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"config {name} must be an int, got {type(value).__name__} {value!r}")
    if not lo <= value <= hi or (pow2 and value & (value - 1)):
        raise ValueError(f"config {name} must be {'a power of two ' if pow2 else 'an int '}in [{lo}, {hi}], "
                         f"got {value}")


def divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is <= cap (micro-kernel rows must tile the rows exactly)."""
    for m in range(min(n, max(1, cap)), 0, -1):
        if n % m == 0:
            return m
    return 1


def tile_cols(width: int, lanes: int) -> "int | None":
    """Column block of a ``width``-wide micro-kernel (``emit_gemm_tile``'s ``cols``), None for the whole width.

    With 16 vector registers (AVX2) a 64-float row is 8 accumulators by itself: one row per step, so each
    loaded row of the right operand feeds a single FMA. Blocks of two vectors let 4 rows share every load
    (8 accumulators, 2 loads and 4 broadcasts per 8 FMAs). With 32 registers (AVX-512) whole rows fit."""
    block = 2 * lanes
    if lanes >= 16 or width <= block or width % block:
        return None
    return block


def rows_that_fit(width: int, lanes: int, cols=None) -> int:
    """Accumulator rows of ``width`` (or its ``cols`` block) floats that fit the vector registers, a few left
    for the operands."""
    regs = 32 if lanes >= 16 else 16
    return max(1, (regs - 6) // -(-min(width, cols or width) // lanes))


def pow2_parts(width: int) -> List[int]:
    """``width`` as a sum of powers of two, largest first (80 -> [64, 16], 65 -> [64, 1])."""
    return [1 << i for i in range(width.bit_length() - 1, -1, -1) if width >> i & 1]


def _column_pass(s: Script, offset, *, rows: int, mr: int, width: int, init, store, terms, guard, tag: str) -> None:
    """``emit_gemm_tile`` over the columns [offset, offset + width) of C: the right operand, init and store
    see column ``offset + w`` (``offset``: an index expression, or 0)."""
    def shift(w):
        return f"{offset} + {w}" if offset else w

    def col(f):
        return None if f is None else (lambda i, w, f=f: f(i, shift(w)))

    emit_gemm_tile(s, rows=rows, mr=mr, width=width, init=col(init), store=lambda r, w, val: store(r, shift(w), val),
                   terms=[(red, a_t, col(b_t)) for red, a_t, b_t in terms], guard=guard, tag=tag)


def _step_rows(s: Script, rows: int, mr: int) -> tuple:
    """(loop variable, first row, the ``mr`` row expressions) of a micro-kernel stepping ``mr`` rows at a time."""
    ro = s.fresh("ro")
    first = f"{ro} * {mr}" if rows > mr else "0"
    return ro, first, [(f"{first} + {r}" if r else first) if rows > mr else str(r) for r in range(mr)]


HEADER = ("# Generated by lincomp (lincomp/lower/tvmir): TVMScript for the LLVM CPU target.\n"
          "import math\n"
          "from tvm.script import ir as I\n"
          "from tvm.script import tirx as T\n"
          "from lincomp.lower.tvmir.intrinsics import exp2  # vectorisable 2**x, exact 0 at -inf\n"
          "from lincomp.lower.tvmir.intrinsics import BF16_LLVM, exp2_bf16  # bf16 dot-product helpers (LLVM IR)\n"
          "from lincomp.lower.tvmir.intrinsics import TRANSPOSE_LLVM  # n x n transposes in registers (LLVM IR)\n")
# Around a function body whose code calls ``emit_transpose``'s helpers (links them into the module).
TRANSPOSE_IMPORT = 'with T.attr(0, "pragma_import_llvm", TRANSPOSE_LLVM):  # the register-transpose helpers'
TRANSPOSE_SIZES = (4, 8, 16)   # the widths intrinsics.TRANSPOSE_LLVM prints a helper for


def emit_transpose(s: Script, *, rows: int, cols: int, dst, src, dst_stride: int, src_stride: int,
                   lanes: int) -> None:
    """Emit ``dst(i, j) = src(j, i)`` for i < rows, j < cols.

    ``lanes`` x ``lanes`` blocks go through ``lincomp_transpose{lanes}`` (shuffles in registers; a vectorised
    strided copy would gather one element per lane); a ragged edge is copied the plain way. ``dst`` / ``src``
    take index-expression strings and return an element expression; the strides are the buffers' row strides
    in elements. The function body must sit under ``TRANSPOSE_IMPORT``."""
    n = lanes if lanes in TRANSPOSE_SIZES else 1
    rb, cb = rows // n * n if n > 1 else 0, cols // n * n if n > 1 else 0
    if rb and cb:
        i, j = s.fresh("ti"), s.fresh("tj")
        with s.block(f"for {i} in range({rb // n}):"):
            with s.block(f"for {j} in range({cb // n}):"):
                s(f'T.call_extern("void", "lincomp_transpose{n}", T.address_of({dst(f"{i} * {n}", f"{j} * {n}")}), '
                  f"{dst_stride}, T.address_of({src(f'{j} * {n}', f'{i} * {n}')}), {src_stride})")
    else:
        rb = cb = 0
    for lo_i, hi_i, lo_j, hi_j in ((rb, rows, 0, cols), (0, rb, cb, cols)):   # the ragged rows, then columns
        if lo_i < hi_i and lo_j < hi_j:
            i, j = s.fresh("ti"), s.fresh("tj")
            with s.block(f"for {i} in range({lo_i}, {hi_i}):" if lo_i else f"for {i} in range({hi_i}):"):
                with s.block(f"for {j} in T.vectorized({hi_j - lo_j}):"):
                    jj = f"{lo_j} + {j}" if lo_j else j
                    s(f"{dst(i, jj)} = {src(jj, i)}")


def emit_gemm_tile(s: Script, *, rows: int, mr: int, width: int, red=None, a=None, b=None, init=None,
                   store=None, terms=None, guard=None, tag: str = "c", cols=None) -> None:
    """Emit ``C[r, w] = init(r, w) + sum_{x < red} a(r, x) * b(x, w)`` for r < rows, w < width.

    The micro-kernel of every template: ``mr`` rows at a time, ``w`` vectorised. Each row's accumulator
    is its own ``width``-float stack buffer (TVM puts "global"-scope buffers under 1 KiB on the stack,
    where LLVM promotes them to vector registers; one buffer per row keeps each small and free of
    aliasing with the workspace). ``a(r, x)`` is a scalar (broadcast) expression, ``b(x, w)`` a row of
    ``width`` contiguous values, ``init(r, w)`` an expression or None (zero), ``store(r, w, value)`` a
    statement; all take index-expression strings. ``red`` is the reduction extent: an expression, or a
    function of the step's first row (a triangular product stops at that row block's end).
    ``terms=[(red, a, b), ...]`` sums several products into the same accumulators (one pass over C).
    ``guard(r)``: a condition under which row r is stored (e.g. "the row is inside the sequence").
    ``cols``: the most columns per pass (a wider C runs in column blocks, so that ``mr`` rows of accumulators
    still fit the registers: one 128-float row alone is all 16 AVX2 registers).
    """
    assert rows % mr == 0, (rows, mr)
    terms = terms or [(red, a, b)]
    wide = width * 4 >= STACK_TILE_BYTES or (cols and width > cols)
    if not wide and width & (width - 1):
        # LLVM legalises a vector whose width is no power of two by widening it (an 80-float row became 8
        # AVX-512 registers, not 5; with the normaliser's 65th column Lizard's linear backward spilled and ran 3.8x
        # slower): one pass per power-of-two column block (80 = 64 + 16, 65 = 64 + 1), each at its offset.
        offset = 0
        for part in pow2_parts(width):
            _column_pass(s, offset, rows=rows, mr=mr, width=part, init=init, store=store, terms=terms, guard=guard,
                         tag=tag)
            offset += part
        return
    if wide:
        # A row's accumulator must stay a small stack buffer: tile a wide C (head dims >= 256) into column
        # blocks of <= 128 (or ``cols``) that divide it, each a full micro-kernel pass of its own.
        wc = divisor_at_most(width, min(STACK_TILE_BYTES // 8, cols or width))
        wo = s.fresh("wo")
        with s.block(f"for {wo} in range({width // wc}):"):
            _column_pass(s, f"{wo} * {wc}", rows=rows, mr=mr, width=wc, init=init, store=store, terms=terms,
                         guard=guard, tag=tag)
        return
    ro, first, row = _step_rows(s, rows, mr)
    w = s.fresh("w")
    acc = [f"{tag}_{r}" for r in range(mr)]
    with s.block(f"for {ro} in range({rows // mr}):"):
        for r in range(mr):
            s(f'{acc[r]} = T.alloc_buffer(({width},), "float32")')
        with s.block(f"for {w} in T.vectorized({width}):"):
            for r in range(mr):
                s(f"{acc[r]}[{w}] = {init(row[r], w) if init else 'T.float32(0)'}")
        for red_t, a_t, b_t in terms:
            x = s.fresh("x")
            extent = red_t(first) if callable(red_t) else red_t
            with s.block(f"for {x} in range({extent}):"):
                with s.block(f"for {w} in T.vectorized({width}):"):
                    for r in range(mr):
                        s(f"{acc[r]}[{w}] = {acc[r]}[{w}] + {a_t(row[r], x)} * {b_t(x, w)}")
        if guard is None:
            with s.block(f"for {w} in T.vectorized({width}):"):
                for r in range(mr):
                    s(store(row[r], w, f"{acc[r]}[{w}]"))
        else:
            for r in range(mr):
                with s.block(f"if {guard(row[r])}:"):
                    with s.block(f"for {w} in T.vectorized({width}):"):
                        s(store(row[r], w, f"{acc[r]}[{w}]"))


BF16_LANES = 16   # fp32 accumulators per bf16 dot-product call (intrinsics.BF16_LLVM): one AVX-512 register


def ramp(base, lanes: int = BF16_LANES) -> str:
    """The index of ``lanes`` consecutive elements from ``base`` (a vector load or store)."""
    return f"T.ramp({base}, 1, {lanes})"


def emit_bf16_tile(s: Script, *, rows: int, mr: int, width: int, pairs, a, b, init=None, store=None,
                   tag: str = "c") -> None:
    """Emit ``C[r, w] = init(r, w) + sum_{x < pairs} dot2(a(r, x), b(x, w))`` on bf16 pairs (AVX-512 BF16).

    ``emit_gemm_tile`` with the reduction over pairs: ``a(r, x)`` is an int32 scalar holding two bf16 values
    (broadcast to every lane), ``b(x, ofs)`` an int32x16 vector expression (16 words from column ``ofs``,
    each two bf16 values), and each call adds both products of a lane to its fp32 accumulator. ``init(r, ofs)``
    is a float32x16 expression or None (zero); ``store(r, ofs, value)`` a statement storing 16 columns.
    ``width`` is a multiple of 16 and at most 128 (mr rows of width / 16 registers stay in registers)."""
    assert rows % mr == 0 and width % BF16_LANES == 0 and width <= 128, (rows, mr, width)
    ro, _, row = _step_rows(s, rows, mr)
    offs = list(range(0, width, BF16_LANES))
    acc = [f"{tag}_{r}" for r in range(mr)]
    with s.block(f"for {ro} in range({rows // mr}):"):
        for r in range(mr):
            s(f'{acc[r]} = T.alloc_buffer(({width},), "float32")')
            for o in offs:
                s(f"{acc[r]}[{ramp(o)}] = {init(row[r], o) if init else f'T.broadcast(T.float32(0), {BF16_LANES})'}")
        x = s.fresh("x")
        with s.block(f"for {x} in range({pairs}):"):
            for o in offs:
                for r in range(mr):
                    s(f'{acc[r]}[{ramp(o)}] = T.call_pure_extern("float32x{BF16_LANES}", "lincomp_dpbf16", '
                      f"{acc[r]}[{ramp(o)}], T.broadcast({a(row[r], x)}, {BF16_LANES}), {b(x, o)})")
        for r in range(mr):
            for o in offs:
                s(store(row[r], o, f"{acc[r]}[{ramp(o)}]"))
