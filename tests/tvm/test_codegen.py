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


@pytest.mark.parametrize("lanes", [4, 8, 16, 3])
@pytest.mark.parametrize("rows, cols", [(16, 32), (64, 16), (24, 40), (5, 7), (33, 16)])
def test_register_transpose_is_exact(lanes, rows, cols):
    """``emit_transpose``: whole lanes x lanes blocks through the LLVM helper (every width printed, whatever this
    CPU's own), ragged rows and columns the plain way, a width without a helper (3) entirely the plain way. Built
    and run on strided views of bigger buffers; every element lands once, bit for bit."""
    import torch

    from lincomp.lower.tvmir import build
    from lincomp.lower.tvmir.codegen import TRANSPOSE_IMPORT, emit_transpose

    s = Script()
    s("@T.prim_func")
    with s.block("def transpose_test(a_h: T.handle, o_h: T.handle):"):
        s('T.func_attr({"global_symbol": "transpose_test", "tir.noalias": True})')
        s(f'a = T.match_buffer(a_h, ({cols + 3}, {rows + 5}), "float32")',
          f'o = T.match_buffer(o_h, ({rows + 2}, {cols + 1}), "float32")')
        with s.block(TRANSPOSE_IMPORT):
            emit_transpose(s, rows=rows, cols=cols, dst=lambda i, j: f"o[1 + {i}, {j}]",
                           src=lambda i, j: f"a[{i}, 2 + {j}]", dst_stride=cols + 1, src_stride=rows + 5, lanes=lanes)
    text = s.text()
    assert ("lincomp_transpose" in text) == (lanes != 3 and rows >= lanes and cols >= lanes), text
    fn = build.build([text], "test-transpose").fn("transpose_test")
    a = torch.randn(cols + 3, rows + 5)
    o = torch.full((rows + 2, cols + 1), float("nan"))
    fn(a, o)
    assert torch.equal(o[1:1 + rows, :cols], a[:cols, 2:2 + rows].t())
    assert o[0].isnan().all() and o[1 + rows:].isnan().all() and o[:, cols].isnan().all()   # nothing else written
