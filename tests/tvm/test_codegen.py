"""The micro-kernel printer (lincomp/lower/tvmir/codegen.py): rows whose width is no power of two.

LLVM widens such a vector (an 80-float row took 8 AVX-512 registers, not 5), so the accumulators of a
micro-kernel spilled: Lizard's linear backward, whose value rows carry the normaliser's 65th column, ran
3.8x slower than without it. The printer now splits such a row into power-of-two column blocks. The kernels
that take the split (odd head dims, the normaliser's column) are checked against the reference in
test_linear_backward.py / test_window.py; here, the printed code itself.
"""

import re

import pytest

from lincomp.lower.tvmir.codegen import Script, emit_gemm_tile, pow2_parts


@pytest.mark.parametrize("width, parts", [(64, [64]), (80, [64, 16]), (65, [64, 1]), (33, [32, 1]), (1, [1]),
                                          (127, [64, 32, 16, 8, 4, 2, 1])])
def test_pow2_parts(width, parts):
    assert pow2_parts(width) == parts and sum(parts) == width


@pytest.mark.parametrize("width", [80, 65, 48, 33])
def test_rows_are_printed_in_power_of_two_blocks(width):
    s = Script()
    emit_gemm_tile(s, rows=8, mr=4, width=width, red="16", a=lambda r, x: f"A[{r}, {x}]",
                   b=lambda x, w: f"Bm[{x}, {w}]", init=lambda r, w: f"C[{r}, {w}]",
                   store=lambda r, w, v: f"C[{r}, {w}] = {v}")
    text = s.text()
    widths = [int(w) for w in re.findall(r"T\.vectorized\((\d+)\)", text)]
    assert widths and all(w & (w - 1) == 0 for w in widths), text
    assert sorted(set(widths), reverse=True) == pow2_parts(width)
    # every column is stored once: block offsets 0, 64, ... reach exactly ``width``
    offsets = [0] + [int(o) for o in re.findall(r"C\[[^,\]]+, (\d+) \+ w_\d+\] = ", text)]
    assert sorted(set(offsets)) == [sum(pow2_parts(width)[:i]) for i in range(len(pow2_parts(width)))]


def test_power_of_two_rows_are_unchanged():
    s = Script()
    emit_gemm_tile(s, rows=4, mr=4, width=64, red="8", a=lambda r, x: f"A[{r}, {x}]", b=lambda x, w: f"Bm[{x}, {w}]",
                   store=lambda r, w, v: f"C[{r}, {w}] = {v}")
    assert set(re.findall(r"T\.vectorized\((\d+)\)", s.text())) == {"64"}
