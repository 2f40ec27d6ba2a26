"""combine="shared" on a 1D window (inference): the linear terms of the keys outside the window, as lagged scans.

For a 1D window ``(left, right)`` (positions counted after the prefix), the keys outside query i's window
that it may see are ``j <= i - a`` (``a = left + 1``) and, without ``causal``, ``j >= i + b`` (``b = right + 1``);
prefix keys lie inside every window and prefix queries see every key (docs/semantics.md section 3). Each side
is one run of the causal linear template (linear.py, ``mode="numden"``, features precomputed) over keys and
values shifted by the lag: key j enters the scan at position ``j + a``, so "keys up to position i" are the keys
up to ``i - a``. A gate's decay from j to i factors as ``e^(G_i - G_t) e^(G_t - G_j)`` with ``t = j + a``: the
scan applies the first factor, the shifted key carries the second (<= 1, so nothing overflows). The side after
the query is the same scan over the reversed sequence (no gate or state there: gates and states need causal).

Both sides add up the terms the definition names, so nothing cancels: the window kernel (window.py,
``lagged=True``) adds num / den to its softmax sums as they are, and needs neither the features nor the
cancellation check of the full-scan-minus-in-window form that training keeps (shared_train.py saves the full
scan's chunk states). Cost per token: two causal scans (state reads and chunk-local pairs) instead of the
linear terms of every in-window pair.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from lincomp.lower.tvmir.linear import GATE_FLOOR
from lincomp.spec import AttentionSpec, Window1D


def applies(spec: AttentionSpec) -> bool:
    """The spec's out-of-window keys are a lagged prefix (and suffix) of the sequence: a 1D window."""
    return spec.combine == "shared" and isinstance(spec.window, Window1D)


def cheaper(spec: AttentionSpec, F: int, Dv: int, chunk: int, L: int) -> bool:
    """The lagged scans do no more multiply-adds per token than the full scan plus the in-window linear terms.

    Per token: a causal scan reads and updates the [F, Dv] state and pairs each query with its chunk
    (2 F Dv + C (F + Dv)); the full non-causal scan is the state alone; the in-window terms cost F + Dv + 1 per
    visible pair. Narrow windows keep the full scan (its cancellation check still sends a cancelling call here)."""
    win = spec.window
    pairs = min(L, win.left + 1 + (0 if spec.causal else win.right) + spec.prefix)
    scan = 2 * F * Dv + chunk * (F + Dv)
    sides = 1 if spec.causal else 2
    full = scan if spec.causal else 2 * F * Dv
    return sides * scan <= full + pairs * (F + Dv + 1)


def scan_spec(spec: AttentionSpec) -> AttentionSpec:
    """The causal linear-only spec whose template runs each side's scan."""
    return AttentionSpec(causal=True, linear=spec.linear)


def scan_key_heads(spec: AttentionSpec, H: int, HF: int) -> int:
    """Heads of the shifted key features: a gate (per query head) is folded into them, so H with a gate."""
    return H if spec.linear.gate is not None else HF


def _shift(dst: torch.Tensor, src: torch.Tensor, lag: int, first: int) -> torch.Tensor:
    """dst[:, :, t] = src[:, :, t - lag] where first <= t - lag < L, else 0 (``lag`` may be negative; dst is
    fully written: a scratch buffer)."""
    L = src.shape[2]
    lo, hi = min(L, max(0, lag + first)), max(0, min(L, L + lag))   # rows of dst that take a row of src
    dst[:, :, :lo].zero_()
    dst[:, :, max(lo, hi):].zero_()
    if lo < hi:
        dst[:, :, lo:hi].copy_(src[:, :, lo - lag:hi - lag])
    return dst


def out_of_window(scan: Callable, scan_rev: Optional[Callable], spec: AttentionSpec, call, fq: torch.Tensor,
                  fk: torch.Tensor, scratch: Callable) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(num [B, H, L, Dv], den [B, H, L], gcheck) of the keys outside every query's window.

    ``scan`` / ``scan_rev``: the compiled causal ``linear_fwd`` and (without causal) its reverse ``linear_rev``
    (numden, precomputed features); fq [B, H, L, F], fk [B, HF, L, F]
    (padded keys already zeroed); ``scratch(name, shape)``: the call's reusable buffers. gcheck: the scan's
    largest log-gate per task (None without a gate), for the caller's check."""
    B, H, L, Dv = call.B, call.H, call.L, call.Dv
    F, n, win, gate = fq.shape[-1], spec.prefix, spec.window, spec.linear.gate
    a = win.left + 1
    if gate is not None and fk.shape[1] != H:
        fk = fk.repeat_interleave(H // fk.shape[1], 1)
    Hkv = call.v.shape[1]
    num, den = scratch("num", (B, H, L, Dv)), scratch("den", (B, H, L))
    fk_lag = _shift(scratch("fk_lag", (B, fk.shape[1], L, F)), fk, a, n)
    v_lag = _shift(scratch("v_lag", (B, Hkv, L, Dv)), call.v, a, n)
    gcheck = None
    gate_args = []
    if gate is not None:
        # the decay over the lag, e^(G_t - G_{t-a}), folded into the key entering at t (floored as the scan
        # floors its gates; float64 cumulative sums, as the scan's differences)
        G = call.g.clamp_min(GATE_FLOOR).double().cumsum(2)
        start = min(L, a + n)
        if start < L:
            lagged = (G[:, :, start:] - G[:, :, start - a:L - a]).exp().float()
            fk_lag[:, :, start:] *= lagged[..., None] if gate == "scalar" else lagged
        gcheck = torch.empty(B * H, dtype=torch.float32)
        gate_args = [call.g, gcheck]
    state = [call.S0, call.z0] if call.S0 is not None else []
    scan(fq, fk_lag, v_lag, *gate_args, *state, num, den, call.linear_scale)
    if not spec.causal and win.right + 1 < L:
        # the side after the window: the reverse scan (row i sums rows after it) over keys shifted back by b,
        # so that key j enters at row j - b; prefix queries see every key (their rows are cleared)
        b = win.right + 1
        fk_s = _shift(scratch("fk_lag", (B, fk.shape[1], L, F)), fk, -b, 0)
        v_s = _shift(scratch("v_lag", (B, Hkv, L, Dv)), call.v, -b, 0)
        num_r, den_r = scratch("num_rev", (B, H, L, Dv)), scratch("den_rev", (B, H, L))
        scan_rev(fq, fk_s, v_s, num_r, den_r, call.linear_scale)
        num[:, :, n:] += num_r[:, :, n:]
        den[:, :, n:] += den_r[:, :, n:]
    return num, den, gcheck
