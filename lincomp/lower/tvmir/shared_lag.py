"""combine="shared" on a 1D window (inference): the linear terms of the keys outside the window, as lagged scans.

For a 1D window ``(left, right)`` (positions counted after the prefix), the keys outside query i's window
that it may see are ``j <= i - a`` (``a = left + 1``) and, without ``causal``, ``j >= i + b`` (``b = right + 1``);
prefix keys lie inside every window and prefix queries see every key (docs/semantics.md section 3). Each side
is one run of the causal linear template (linear.py, ``mode="numden"``, features precomputed) whose scan row t
pairs with key ``t - a`` (``key_shift``: an index in the generated code, no shifted copy): key j enters the scan
at position ``j + a``, so "keys up to position i" are the keys up to ``i - a``. A gate's decay from j to i
factors as ``e^(G_i - G_t) e^(G_t - G_j)`` with ``t = j + a``: the scan applies the first factor, the key
carries the second (<= 1, so nothing overflows). The side after the query is the same scan walked from the end
(``reverse``; no gate or state there: gates and states need causal), pairing row i with key ``i + b`` and adding
into the same num / den.

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


# The scans' chunk: the tuned "linear" chunk was chosen for the full scan, which has no chunk-local pairs; a
# causal scan pairs each query with its chunk (C (F + Dv) / 2 multiply-adds per token), so it runs shorter
# chunks (MiniLM's spec, one thread: 8.0 ms at C = 32 against 10.5 ms at the full scan's C = 64, L = 1024).
MAX_CHUNK = 32


def scan_chunk(chunk: int) -> int:
    """The lagged scans' chunk for the call's tuned "linear" chunk."""
    return min(chunk, MAX_CHUNK)


# A reach at or past the sequence's end pairs no key; clamped so that row + shift stays inside int32.
_MAX_SHIFT = 1 << 30


def sides(spec: AttentionSpec) -> dict:
    """{kernel name: linear_source keyword arguments} of the scans a call runs (shared_lag's docstring).

    Before the window, scan position t pairs with key t - a (``a = left + 1``; keys before the prefix's end
    pair with nothing, being inside every window); after it (no ``causal``), the reverse scan's position of
    row i pairs with key i + b and adds into the same num / den from row ``prefix`` on (prefix queries see
    every key: their window covers the rest)."""
    win = spec.window
    out = {"linear_fwd": dict(reverse=False, key_shift=-min(win.left + 1, _MAX_SHIFT), key_first=spec.prefix)}
    if not spec.causal:
        out["linear_rev"] = dict(reverse=True, key_shift=min(win.right + 1, _MAX_SHIFT), key_first=0,
                                 accumulate_from=spec.prefix)
    return out


def scan_key_heads(spec: AttentionSpec, H: int, HF: int) -> int:
    """Heads of the key features the scans read: a gate (per query head) is folded into them, so H with a gate."""
    return H if spec.linear.gate is not None else HF


def out_of_window(scans: dict, spec: AttentionSpec, call, fq: torch.Tensor, fk: torch.Tensor,
                  scratch: Callable) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(num [B, H, L, Dv], den [B, H, L], gcheck) of the keys outside every query's window.

    ``scans``: {name: compiled causal scan} for the names of :func:`sides` (numden, precomputed features, the
    lag inside the template); fq [B, H, L, F], fk [B, HF, L, F] (padded keys already zeroed); ``scratch(name,
    shape)``: the call's reusable buffers. gcheck: the scan's largest log-gate per task (None without a gate),
    for the caller's check."""
    B, H, L, Dv = call.B, call.H, call.L, call.Dv
    F, n, win, gate = fq.shape[-1], spec.prefix, spec.window, spec.linear.gate
    a = win.left + 1
    num, den = scratch("num", (B, H, L, Dv)), scratch("den", (B, H, L))
    gcheck = None
    gate_args = []
    if gate is not None:
        # the decay over the lag, e^(G_{j+a} - G_j), folded into key j (which enters the scan at j + a); floored
        # as the scan floors its gates, float64 cumulative sums as the scan's differences. Keys j >= L - a
        # never enter.
        fk_g = scratch("fk_gated", (B, H, L, F))
        fk_g.copy_(fk if fk.shape[1] == H else fk.repeat_interleave(H // fk.shape[1], 1))
        if n < L - a:
            G = call.g.clamp_min(GATE_FLOOR).double().cumsum(2)
            lagged = (G[:, :, n + a:] - G[:, :, n:L - a]).exp().float()
            fk_g[:, :, n:L - a] *= lagged[..., None] if gate == "scalar" else lagged
        fk = fk_g
        gcheck = torch.empty(B * H, dtype=torch.float32)
        gate_args = [call.g, gcheck]
    state = [call.S0, call.z0] if call.S0 is not None else []
    scans["linear_fwd"](fq, fk, call.v, *gate_args, *state, num, den, call.linear_scale)
    if not spec.causal and win.right + 1 < L:   # else no key lies after any window
        scans["linear_rev"](fq, fk, call.v, num, den, call.linear_scale)
    return num, den, gcheck
