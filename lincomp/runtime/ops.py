"""``torch.ops.lincomp.*``: lincomp attention as torch.library custom ops (fake + autograd).

The ops are what ``torch.compile(backend="lincomp")`` and ``lincomp.linearize`` put into a model: Dynamo
and Inductor see one opaque node per attention call, whose fake implementation only does shape
arithmetic (so symbolic sequence lengths never force a recompile). The spec travels as a JSON string.

- ``torch.ops.lincomp.attention(q, k, v, spec_json, scale=None, g=None, feature_weight_q=None,
  feature_weight_k=None, sink_logits=None, window_gamma=None, alpha=None, key_padding_mask=None,
  target="auto", fallback="warn", hints_json="") -> o [B, H, L, Dv]``
  runs a cached ``lincomp.compile(spec, target, **hints)`` kernel. ``fallback="warn"`` runs the reference
  with a ``LincompFallbackWarning`` when the target is not installed or cannot run a call;
  ``fallback="error"`` raises instead.
- Backward (``register_autograd``) recomputes the forward under autograd and differentiates it: through the
  kernel itself when it is differentiable (Triton, the reference), else through the reference oracle.
  It is its own op, ``torch.ops.lincomp.attention_backward``, so compiled training graphs keep it opaque.
- ``torch.ops.lincomp.key_padding_mask(mask, causal, check) -> [B, Lk] bool`` turns a
  scaled_dot_product_attention ``attn_mask`` (bool, or additive float) into the key-padding mask lincomp
  takes; with ``check`` it raises when the mask is anything else (a bias, a packed-sequence mask, a causal
  mask for a non-causal spec), so a call is never silently wrong.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
import warnings
from typing import List, Optional

import torch
from torch import Tensor

from lincomp.runtime.kernel import Kernel, LincompFallbackWarning, ReferenceKernel
from lincomp.spec import AttentionSpec

TARGETS = ("auto", "triton", "tvm", "reference")
FALLBACKS = ("warn", "error")
# The optional float tensors of a call, in the op's argument order (SEMANTICS.md names).
WEIGHT_NAMES = ("g", "feature_weight_q", "feature_weight_k", "sink_logits", "window_gamma", "alpha")

_lock = threading.Lock()
_kernels: dict = {}


@functools.lru_cache(maxsize=512)
def spec_from_json(spec_json: str) -> AttentionSpec:
    """The spec a JSON string names (parsed once per distinct string)."""
    return AttentionSpec.from_json(spec_json)


def spec_to_json(spec) -> str:
    """The canonical JSON string the ops take for ``spec`` (AttentionSpec, dict or JSON)."""
    return AttentionSpec.coerce(spec).canonical_json()


def _check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def get_kernel(spec_json: str, target: str = "auto", fallback: str = "warn", hints_json: str = "") -> Kernel:
    """The cached ``lincomp.compile`` kernel for (spec, target, hints); the reference if the target is missing.

    A missing target (ImportError) warns once and serves the reference with ``fallback="warn"``; it raises
    with ``fallback="error"``.
    """
    _check_choice(target, "target", TARGETS)
    _check_choice(fallback, "fallback", FALLBACKS)
    key = (spec_json, target, fallback, hints_json)
    kernel = _kernels.get(key)
    if kernel is not None:
        return kernel
    with _lock:
        kernel = _kernels.get(key)
        if kernel is None:
            from lincomp.compiler import compile as lincomp_compile
            hints = json.loads(hints_json) if hints_json else {}
            spec = spec_from_json(spec_json)
            try:
                kernel = lincomp_compile(spec, target, **hints)
            except ImportError as e:
                if fallback == "error":
                    raise RuntimeError(f"lincomp: target {target!r} is not available here ({e}); install it, "
                                       "choose another target, or pass fallback='warn' to run the reference") from e
                warnings.warn(f"lincomp: target {target!r} is not available ({e}); using the reference "
                              "(correct, slower)", LincompFallbackWarning, stacklevel=2)
                kernel = ReferenceKernel(spec)
            _kernels[key] = kernel
    return kernel


def clear_kernel_cache() -> None:
    """Forget every cached kernel (tests; after installing a backend)."""
    with _lock:
        _kernels.clear()


def is_differentiable(kernel: Kernel, device: torch.device) -> bool:
    """True when autograd can flow through ``kernel`` on ``device`` (reference: yes; others: their flag)."""
    if isinstance(kernel, ReferenceKernel):
        return True
    if hasattr(kernel, "kernel_for"):  # AutoKernel: the kernel it picks for this device decides
        return is_differentiable(kernel.kernel_for(device), device)
    return bool(kernel.differentiable)


def _tensors(g, feature_weight_q, feature_weight_k, sink_logits, window_gamma, alpha) -> dict:
    values = (g, feature_weight_q, feature_weight_k, sink_logits, window_gamma, alpha)
    return {n: t for n, t in zip(WEIGHT_NAMES, values) if t is not None}


@contextlib.contextmanager
def _strict(fallback: str):
    """With fallback='error', a kernel's runtime fallback warning becomes an exception."""
    if fallback != "error":
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", LincompFallbackWarning)
        yield


def drop_trivial_padding(key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """None for a ``[B, Lk]`` key-padding mask that lets every key through (what ``tokenizer(text)`` gives an
    unpadded batch): the same result, and kernels that take no mask (TVM, linear Triton) keep running."""
    if key_padding_mask is not None and bool(key_padding_mask.all()):
        return None
    return key_padding_mask


def _run(kernel: Kernel, q, k, v, scale, tensors, key_padding_mask, fallback):
    # Gates arrive as transposed views ([B, L, H] -> [B, H, L]); compiled kernels want them contiguous.
    kw = {name: t.contiguous() for name, t in tensors.items()}
    key_padding_mask = drop_trivial_padding(key_padding_mask)   # runs inside the op: no graph break
    if key_padding_mask is not None:
        kw["key_padding_mask"] = key_padding_mask
    if scale is not None:
        kw["scale"] = scale
    with _strict(fallback):   # compiled kernels want contiguous [B, H, L, D] (SDPA callers often pass views)
        return kernel(q.contiguous(), k.contiguous(), v.contiguous(), **kw)


class _autograd_on:
    """Re-enable autograd inside a custom op's implementation (which runs below the Autograd key)."""

    def __enter__(self):
        exclude = torch._C._dispatch_tls_local_exclude_set().remove(torch._C.DispatchKey.AutogradFunctionality)
        self._guard = torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)
        self._grad = torch.enable_grad()
        self._guard.__enter__()
        self._grad.__enter__()

    def __exit__(self, *exc):
        self._grad.__exit__(*exc)
        self._guard.__exit__(*exc)


# ----------------------------------------------------------------------------------- attention
@torch.library.custom_op("lincomp::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, spec_json: str, scale: Optional[float] = None,
              g: Optional[Tensor] = None, feature_weight_q: Optional[Tensor] = None,
              feature_weight_k: Optional[Tensor] = None, sink_logits: Optional[Tensor] = None,
              window_gamma: Optional[Tensor] = None, alpha: Optional[Tensor] = None,
              key_padding_mask: Optional[Tensor] = None, target: str = "auto", fallback: str = "warn",
              hints_json: str = "") -> Tensor:
    """o [B, H, L, Dv] = the spec's attention of q [B, H, L, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv]."""
    kernel = get_kernel(spec_json, target, fallback, hints_json)
    tensors = _tensors(g, feature_weight_q, feature_weight_k, sink_logits, window_gamma, alpha)
    o = _run(kernel, q, k, v, scale, tensors, key_padding_mask, fallback)
    # Contiguous, as the fake implementation promises; a custom op's output may not alias an input.
    o = o.contiguous()
    return o.clone() if o is q or o is k or o is v else o


@attention.register_fake
def _attention_fake(q, k, v, spec_json, scale=None, g=None, feature_weight_q=None, feature_weight_k=None,
                    sink_logits=None, window_gamma=None, alpha=None, key_padding_mask=None, target="auto",
                    fallback="warn", hints_json=""):
    # Shape arithmetic only: symbolic B / L stay symbolic (no recompile for a new length).
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))


@torch.library.custom_op("lincomp::attention_backward", mutates_args=())
def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, spec_json: str,
                       scale: Optional[float] = None, g: Optional[Tensor] = None,
                       feature_weight_q: Optional[Tensor] = None, feature_weight_k: Optional[Tensor] = None,
                       sink_logits: Optional[Tensor] = None, window_gamma: Optional[Tensor] = None,
                       alpha: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                       target: str = "auto", fallback: str = "warn", hints_json: str = "") -> List[Tensor]:
    """[dq, dk, dv] + the gradient of each given float tensor (order of WEIGHT_NAMES, absent ones skipped)."""
    kernel = get_kernel(spec_json, target, fallback, hints_json)
    if not is_differentiable(kernel, q.device):
        kernel = ReferenceKernel(spec_from_json(spec_json))
    tensors = _tensors(g, feature_weight_q, feature_weight_k, sink_logits, window_gamma, alpha)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v, *tensors.values())]
    with _autograd_on():
        lq, lk, lv, *rest = leaves
        o = _run(kernel, lq, lk, lv, scale, dict(zip(tensors, rest)), key_padding_mask, fallback)
        grads = torch.autograd.grad(o, leaves, grad_out, allow_unused=True)
    return [x.new_zeros(x.shape) if d is None else d.to(x.dtype).contiguous() for x, d in zip(leaves, grads)]


@attention_backward.register_fake
def _attention_backward_fake(grad_out, q, k, v, spec_json, scale=None, g=None, feature_weight_q=None,
                             feature_weight_k=None, sink_logits=None, window_gamma=None, alpha=None,
                             key_padding_mask=None, target="auto", fallback="warn", hints_json=""):
    tensors = _tensors(g, feature_weight_q, feature_weight_k, sink_logits, window_gamma, alpha)
    return [t.new_empty(t.shape) for t in (q, k, v, *tensors.values())]   # contiguous, like the real one


def _setup_context(ctx, inputs, output):
    (q, k, v, spec_json, scale, g, fwq, fwk, sinks, gamma, alpha, kpm, target, fallback, hints_json) = inputs
    ctx.save_for_backward(q, k, v, g, fwq, fwk, sinks, gamma, alpha, kpm)
    ctx.args = (spec_json, scale, target, fallback, hints_json)


def _backward(ctx, grad_out):
    q, k, v, g, fwq, fwk, sinks, gamma, alpha, kpm = ctx.saved_tensors
    spec_json, scale, target, fallback, hints_json = ctx.args
    grads = torch.ops.lincomp.attention_backward(
        grad_out.contiguous(), q, k, v, spec_json, scale, g, fwq, fwk, sinks, gamma, alpha, kpm, target,
        fallback, hints_json)
    dq, dk, dv, *rest = grads
    weights = (g, fwq, fwk, sinks, gamma, alpha)
    it = iter(rest)
    dweights = [None if w is None else next(it) for w in weights]
    return (dq, dk, dv, None, None, *dweights, None, None, None, None)


attention.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------- key padding mask
def _attend(mask: Tensor) -> Tensor:
    """Which entries of an SDPA attn_mask let a key through (bool: True; float: 0, not a large negative)."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


@torch.library.custom_op("lincomp::key_padding_mask", mutates_args=())
def key_padding_mask(mask: Tensor, causal: bool, check: bool = True) -> Tensor:
    """[B|1, H|1, Lq|1, Lk] SDPA ``attn_mask`` -> [B, Lk] bool key-padding mask (True = attend).

    A key counts as present when some query row lets it through. With ``check`` the mask must equal
    ``(causal ? tril : all) & kpm`` (rows of padded queries, which see no key under that rule, may hold
    anything), and a float mask must be exactly 0 where it lets a key through; otherwise ValueError: such a
    mask (an attention bias, a packed-sequence or sliding-window mask) cannot be combined with a spec.
    """
    if mask.dim() != 4:
        raise ValueError(f"attn_mask must be 4D [B, H, Lq, Lk] (broadcastable), got shape {list(mask.shape)}")
    attend = _attend(mask)
    kpm = attend.any(dim=2).all(dim=1)                                    # [B, Lk]
    if check:
        _check_key_padding(mask, attend, kpm, causal)
    return kpm.expand(mask.shape[0], -1).contiguous()


def _check_key_padding(mask: Tensor, attend: Tensor, kpm: Tensor, causal: bool) -> None:
    Lq, Lk = attend.shape[-2:]
    if Lq > 1:
        tril = torch.ones(Lq, Lk, dtype=torch.bool, device=mask.device).tril(Lk - Lq)
        want = (tril if causal else torch.ones_like(tril))[None, None] & kpm[:, None, None, :]
        padded_rows = ~want.any(-1, keepdim=True)
        if not bool(((attend == want) | padded_rows).all()):
            as_causal = tril[None, None] & kpm[:, None, None, :]
            if not causal and bool(((attend == as_causal) | ~as_causal.any(-1, keepdim=True)).all()):
                hint = "it is a causal mask: use a causal spec (causal=True)"
            else:
                hint = "only key-padding masks (optionally causal) can be combined with a spec"
            raise ValueError(f"lincomp: attn_mask is not a key-padding mask for a {'causal' if causal else 'non-causal'} "
                             f"spec; {hint}. Pass the padding as key_padding_mask [B, L], or set the option "
                             "check_masks=False if you know the mask is one.")
    if mask.dtype != torch.bool and bool((mask.masked_fill(~attend, 0) != 0).any()):
        raise ValueError("lincomp: attn_mask is a float mask with a non-zero bias on visible keys (e.g. ALiBi); "
                         "a spec cannot add a bias. Use a boolean key-padding mask.")


@key_padding_mask.register_fake
def _key_padding_mask_fake(mask, causal, check=True):
    return mask.new_empty((mask.shape[0], mask.shape[-1]), dtype=torch.bool)


__all__ = ["attention", "attention_backward", "key_padding_mask", "drop_trivial_padding", "get_kernel", "spec_to_json", "spec_from_json",
           "clear_kernel_cache", "is_differentiable", "TARGETS", "FALLBACKS", "WEIGHT_NAMES"]
