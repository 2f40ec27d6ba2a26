"""``torch.ops.lincomp.*``: lincomp attention as torch.library custom ops (fake + autograd).

The ops are what ``torch.compile(backend="lincomp")`` and ``lincomp.linearize`` put into a model: Dynamo
and Inductor see one opaque node per attention call, whose fake implementation only does shape
arithmetic (so symbolic sequence lengths never force a recompile). The spec travels as a JSON string.

- ``torch.ops.lincomp.attention(q, k, v, spec_json, scale=None, g=None, feature_weight_q=None,
  feature_weight_k=None, sink_logits=None, window_gamma=None, alpha=None, key_padding_mask=None,
  target="auto", fallback="warn", hints_json="", cu_seqlens=None, pool_weight=None) -> o [B, H, L, Dv]``
  runs a cached ``lincomp.compile(spec, target, **hints)`` kernel. ``fallback="warn"`` runs the reference
  with a ``LincompFallbackWarning`` when the target is not installed or cannot run a call;
  ``fallback="error"`` raises instead. ``cu_seqlens`` (int ``[N + 1]``, B = 1): a packed row of N documents,
  each attended on its own (lincomp.runtime.varlen); trailing repeats of ``L`` are ignored (the fixed-size
  ``[L + 1]`` form ``mask_documents`` returns) and a single document ``[0, L]`` is the plain call (any B).
- Training: ``lincomp::attention`` is ``lincomp::attention_forward(...)[0]``; that op also returns what
  the kernel's backward needs (the window kernels' log-sum-exp, the linear kernels' states), and its
  backward, ``torch.ops.lincomp.attention_backward`` (its own op, so compiled training graphs keep it
  opaque), runs only backward kernels: each forward runs once. Kernels without a backward of their own
  (the reference; TVM for the calls its backward does not cover: key-padded, fp64): a call whose inputs
  require grad runs the reference under autograd instead (one evaluation); without grad it runs the kernel.
  A call that fell back saves nothing and its gradient is the reference's (``torch.func.vjp``). A packed
  row (``cu_seqlens``) saves nothing either: on kernels with a backward its gradient re-runs each document
  group's forward and backward kernels (``lincomp.runtime.varlen.packed_backward``; two forwards per step),
  else it is the reference's.
- ``torch.ops.lincomp.key_padding_mask(mask, causal, check) -> [B, Lk] bool`` turns a
  scaled_dot_product_attention ``attn_mask`` (bool, or additive float) into the key-padding mask lincomp
  takes; with ``check`` it raises when the mask is anything else (a bias, a sliding-window mask, a causal
  mask for a non-causal spec), so a call is never silently wrong.
- ``torch.ops.lincomp.mask_documents(mask, causal, check) -> (key_padding_mask [B, Lk], cu_seqlens int32 [Lk + 1])``:
  the same for ``torch.compile``'s rewrite, which cannot tell a packed row from a padded batch when it builds
  the graph: a ``[1, H|1, L, L]`` mask that is exactly block diagonal (causal within each block for a causal
  spec) is a packed row (``cu_seqlens`` padded with repeats of L, no padding); any other mask is
  ``key_padding_mask``'s (``cu_seqlens`` ``[0, L, ..., L]``: one document).
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

from lincomp.compiler import compile as lincomp_compile
from lincomp.documents import document_ids
from lincomp.reference import reference
from lincomp.runtime.kernel import Kernel, LincompFallbackWarning, ReferenceKernel, warn_fallback
from lincomp.runtime.varlen import packed_backward
from lincomp.spec import AttentionSpec

TARGETS = ("auto", "triton", "tvm", "reference")
FALLBACKS = ("warn", "error")
# The optional float tensors of a call, in the op's argument order (docs/semantics.md names).
WEIGHT_NAMES = ("g", "feature_weight_q", "feature_weight_k", "sink_logits", "window_gamma", "alpha", "pool_weight")

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


def has_own_backward(kernel: Kernel) -> bool:
    """True when ``kernel`` brings backward kernels that take what its forward saved (Triton; TVM for the
    specs its backward covers: ``kernel.backward_unsupported()`` is None)."""
    return kernel.has_backward()


def _tensors(g, feature_weight_q, feature_weight_k, sink_logits, window_gamma, alpha, pool_weight) -> dict:
    values = (g, feature_weight_q, feature_weight_k, sink_logits, window_gamma, alpha, pool_weight)
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


def _concrete(kernel: Kernel, device: torch.device) -> Kernel:
    """The kernel that runs on ``device`` (an AutoKernel picks one per device)."""
    return kernel.kernel_for(device) if hasattr(kernel, "kernel_for") else kernel


def drop_trivial_padding(key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """None for a ``[B, Lk]`` key-padding mask that lets every key through (what ``tokenizer(text)`` gives an
    unpadded batch): the same result, and kernels that take no mask (TVM, linear Triton) keep running."""
    if key_padding_mask is not None and bool(key_padding_mask.all()):
        return None
    return key_padding_mask


def _kwargs(scale, tensors: dict, key_padding_mask, cu_seqlens=None) -> dict:
    # Gates arrive as transposed views ([B, L, H] -> [B, H, L]); compiled kernels want them contiguous.
    kw = {name: t.contiguous() for name, t in tensors.items()}
    if key_padding_mask is not None:
        kw["key_padding_mask"] = key_padding_mask
    if cu_seqlens is not None:
        kw["cu_seqlens"] = cu_seqlens
    if scale is not None:
        kw["scale"] = scale
    return kw


def _saved_like(kernel: Kernel, q, k, v, kw: dict) -> list:
    """What ``attention_forward`` saves for this call: the unpacked call's slots, whether or not ``cu_seqlens``
    comes (the fake cannot read how many documents it holds); a packed row leaves them unused."""
    return kernel.saved_like(q, k, v, **{n: t for n, t in kw.items() if n != "cu_seqlens"})


def documents(cu_seqlens: Optional[Tensor]) -> Optional[Tensor]:
    """``cu_seqlens`` without trailing repeats of L, or None for one document (then the call is the plain one)."""
    if cu_seqlens is None or cu_seqlens.numel() <= 2:
        return None
    n = int((cu_seqlens < cu_seqlens[-1]).sum()) + 1     # c_0 .. c_{N-1} < L, then L
    return None if n <= 2 else cu_seqlens[:n]


# ----------------------------------------------------------------------------------- attention
# ``lincomp::attention`` is what graphs and linearised models call. It is CompositeImplicitAutograd: it
# is ``lincomp::attention_forward(...)[0]``, and autograd (eager or AOTAutograd) differentiates that op,
# whose extra outputs are what the kernel's backward needs (the window kernels' log-sum-exp, the linear
# kernels' states and normalisers). Training runs each forward once; the backward op runs only the
# backward kernels. Kernels without a backward of their own (TVM, the reference, or a call that fell back)
# save nothing, and their gradient is the reference's (torch.func.vjp), which evaluates the reference
# once more inside the backward.
torch.library.define(
    "lincomp::attention",
    "(Tensor q, Tensor k, Tensor v, str spec_json, float? scale=None, Tensor? g=None, Tensor? feature_weight_q=None, "
    "Tensor? feature_weight_k=None, Tensor? sink_logits=None, Tensor? window_gamma=None, Tensor? alpha=None, "
    "Tensor? key_padding_mask=None, str target='auto', str fallback='warn', str hints_json='', "
    "Tensor? cu_seqlens=None, Tensor? pool_weight=None) -> Tensor")


@torch.library.impl("lincomp::attention", "CompositeImplicitAutograd")
def _attention(q, k, v, spec_json, scale=None, g=None, feature_weight_q=None, feature_weight_k=None, sink_logits=None,
               window_gamma=None, alpha=None, key_padding_mask=None, target="auto", fallback="warn", hints_json="",
               cu_seqlens=None, pool_weight=None):
    """o [B, H, L, Dv] = the spec's attention of q [B, H, L, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv]."""
    tensors = _tensors(g, feature_weight_q, feature_weight_k, sink_logits, window_gamma, alpha, pool_weight)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *tensors.values())):
        kernel = _concrete(get_kernel(spec_json, target, fallback, hints_json), q.device)
        if not has_own_backward(kernel):
            # No backward kernels (the reference, or a spec the kernel's backward does not cover: a warning,
            # even with fallback="error", which keeps such training running as it always has): differentiate
            # the reference itself, so training runs one forward (the reference's) instead of the kernel's
            # plus the reference's inside the backward.
            why = kernel.backward_unsupported()
            if why is not None:
                warn_fallback(kernel.target, f"no backward kernel: {why}")
            return reference(spec_from_json(spec_json), q, k, v, **_kwargs(scale, tensors, key_padding_mask,
                                                                 documents(cu_seqlens)))
    return torch.ops.lincomp.attention_forward(q, k, v, spec_json, scale, g, feature_weight_q, feature_weight_k,
                                               sink_logits, window_gamma, alpha, key_padding_mask, target, fallback,
                                               hints_json, cu_seqlens, pool_weight)[0]


attention = torch.ops.lincomp.attention


@torch.library.custom_op("lincomp::attention_forward", mutates_args=())
def attention_forward(q: Tensor, k: Tensor, v: Tensor, spec_json: str, scale: Optional[float] = None,
                      g: Optional[Tensor] = None, feature_weight_q: Optional[Tensor] = None,
                      feature_weight_k: Optional[Tensor] = None, sink_logits: Optional[Tensor] = None,
                      window_gamma: Optional[Tensor] = None, alpha: Optional[Tensor] = None,
                      key_padding_mask: Optional[Tensor] = None, target: str = "auto", fallback: str = "warn",
                      hints_json: str = "", cu_seqlens: Optional[Tensor] = None,
                      pool_weight: Optional[Tensor] = None) -> List[Tensor]:
    """[o [B, H, L, Dv], own_backward (int32 [], 1: ``saved`` is the kernel's), *saved].

    ``saved`` is ``Kernel.forward_saved``'s list (shapes from ``Kernel.saved_like``)."""
    kernel = _concrete(get_kernel(spec_json, target, fallback, hints_json), q.device)
    tensors = _tensors(g, feature_weight_q, feature_weight_k, sink_logits, window_gamma, alpha, pool_weight)
    # compiled kernels want contiguous [B, H, L, D] (SDPA callers often pass views)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    # an all-ones mask (tokenizer output) is no mask: dropped here, inside the op (no graph break), so
    # kernels that take no mask keep running
    cu_seqlens = documents(cu_seqlens)
    kw = _kwargs(scale, tensors, drop_trivial_padding(key_padding_mask), cu_seqlens)
    like = _saved_like(kernel, q, k, v, kw)
    with _strict(fallback):   # a packed row runs by document groups and saves nothing (see attention_backward)
        o, saved = kernel.forward_saved(q, k, v, **kw) if cu_seqlens is None else (kernel(q, k, v, **kw), None)
    own = saved is not None
    if not own:   # the reference ran: the saved slots stay as promised, unused
        saved = [torch.empty_like(t) for t in like]
    # Contiguous, as the fake implementation promises; a custom op's output may not alias an input.
    o = o.contiguous()
    o = o.clone() if o is q or o is k or o is v else o
    return [o, torch.tensor(int(own), dtype=torch.int32), *[t.contiguous() for t in saved]]


@attention_forward.register_fake
def _attention_forward_fake(q, k, v, spec_json, scale=None, g=None, feature_weight_q=None, feature_weight_k=None,
                            sink_logits=None, window_gamma=None, alpha=None, key_padding_mask=None, target="auto",
                            fallback="warn", hints_json="", cu_seqlens=None, pool_weight=None):
    # Shape arithmetic only: symbolic B / L stay symbolic (no recompile for a new length).
    kernel = _concrete(get_kernel(spec_json, target, fallback, hints_json), q.device)
    tensors = _tensors(g, feature_weight_q, feature_weight_k, sink_logits, window_gamma, alpha, pool_weight)
    saved = _saved_like(kernel, q, k, v, _kwargs(scale, tensors, key_padding_mask, cu_seqlens))
    o = q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))
    return [o, torch.empty((), dtype=torch.int32, device="cpu"), *[t.new_empty(t.shape) for t in saved]]


@torch.library.custom_op("lincomp::attention_backward", mutates_args=())
def attention_backward(grad_out: Tensor, o: Tensor, own_backward: Tensor, saved: List[Tensor], q: Tensor, k: Tensor,
                       v: Tensor, spec_json: str, scale: Optional[float] = None, g: Optional[Tensor] = None,
                       feature_weight_q: Optional[Tensor] = None, feature_weight_k: Optional[Tensor] = None,
                       sink_logits: Optional[Tensor] = None, window_gamma: Optional[Tensor] = None,
                       alpha: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                       target: str = "auto", fallback: str = "warn", hints_json: str = "",
                       cu_seqlens: Optional[Tensor] = None, pool_weight: Optional[Tensor] = None,
                       needs: str = "") -> List[Tensor]:
    """[dq, dk, dv] + the gradient of each given float tensor (order of WEIGHT_NAMES, absent ones skipped).

    ``needs``: comma-separated names of the inputs autograd wants a gradient for ("" : all); a kernel may skip
    the others' work (their slots are zeros)."""
    tensors = _tensors(g, feature_weight_q, feature_weight_k, sink_logits, window_gamma, alpha, pool_weight)
    names = ("q", "k", "v", *tensors)
    inputs = (q, k, v, *tensors.values())
    kernel = _concrete(get_kernel(spec_json, target, fallback, hints_json), q.device)
    kw = _kwargs(scale, tensors, drop_trivial_padding(key_padding_mask))   # as the forward saw it
    cu_seqlens, grads = documents(cu_seqlens), None
    if int(own_backward) == 1:
        # the saved inputs are the caller's (often transposed views, as the forward got them): made contiguous
        # here, silently, as the forward does (a kernel's copy warning would name a layout the caller never chose)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        grads = kernel.backward_saved(grad_out, o, list(saved), q, k, v, needs=frozenset(needs.split(",")) if needs
                                      else None, **kw)
    elif cu_seqlens is not None and has_own_backward(kernel):
        # a packed row saved nothing: its documents' forward runs again, each length group through the
        # kernel's own backward (None if one fell back: then the reference's gradient below)
        with _strict(fallback):
            grads = packed_backward(kernel, grad_out.to(o.dtype), q.contiguous(), k.contiguous(), v.contiguous(),
                                    cu_seqlens, **kw)
    if grads is not None:
        grads = [grads.get(n) for n in names]
    else:
        spec = spec_from_json(spec_json)

        def run(q, k, v, *weights):
            return reference(spec, q, k, v, **_kwargs(scale, dict(zip(tensors, weights)), key_padding_mask,
                                                      cu_seqlens))
        _, vjp = torch.func.vjp(run, *inputs)
        grads = vjp(grad_out.to(o.dtype))
    return [x.new_zeros(x.shape) if d is None else d.to(x.dtype).contiguous() for x, d in zip(inputs, grads)]


@attention_backward.register_fake
def _attention_backward_fake(grad_out, o, own_backward, saved, q, k, v, spec_json, scale=None, g=None,
                             feature_weight_q=None, feature_weight_k=None, sink_logits=None, window_gamma=None,
                             alpha=None, key_padding_mask=None, target="auto", fallback="warn", hints_json="",
                             cu_seqlens=None, pool_weight=None, needs=""):
    tensors = _tensors(g, feature_weight_q, feature_weight_k, sink_logits, window_gamma, alpha, pool_weight)
    return [t.new_empty(t.shape) for t in (q, k, v, *tensors.values())]   # contiguous, like the real one


def _setup_context(ctx, inputs, output):
    (q, k, v, spec_json, scale, g, fwq, fwk, sinks, gamma, alpha, kpm, target, fallback, hints_json, *rest) = inputs
    cu, pool = (list(rest) + [None, None])[:2]   # trailing arguments left at their default may be absent
    o, own, *saved = output
    ctx.n_saved = len(saved)
    ctx.save_for_backward(q, k, v, g, fwq, fwk, sinks, gamma, alpha, kpm, cu, pool, o, own, *saved)
    ctx.args = (spec_json, scale, target, fallback, hints_json)


def _backward(ctx, grads):
    grad_out = grads[0]
    q, k, v, g, fwq, fwk, sinks, gamma, alpha, kpm, cu, pool, o, own, *saved = ctx.saved_tensors
    spec_json, scale, target, fallback, hints_json = ctx.args
    if grad_out is None:
        grad_out = torch.zeros_like(o)
    out = torch.ops.lincomp.attention_backward(
        grad_out.contiguous(), o, own, saved, q, k, v, spec_json, scale, g, fwq, fwk, sinks, gamma, alpha, kpm,
        target, fallback, hints_json, cu, pool, _needs(ctx.needs_input_grad))
    dq, dk, dv, *rest = out
    weights = (g, fwq, fwk, sinks, gamma, alpha, pool)
    it = iter(rest)
    dweights = [None if w is None else next(it) for w in weights]
    out = (dq, dk, dv, None, None, *dweights[:6], None, None, None, None, None, dweights[6])
    # one gradient per argument actually passed: the dispatcher drops trailing arguments left at their default
    return out[:len(ctx.needs_input_grad)]


# attention_forward's differentiable arguments by position, read from its schema (the rest are strings, flags
# and masks)
_GRAD_ARGS = {i: a.name for i, a in enumerate(torch.ops.lincomp.attention_forward.default._schema.arguments)
              if a.name in ("q", "k", "v", *WEIGHT_NAMES)}


def _needs(needs_input_grad) -> str:
    """attention_backward's ``needs`` from autograd's flags ("": all, when every flag is set); trailing
    arguments left at their default have no flag."""
    flags = dict(enumerate(needs_input_grad))
    wanted = [n for i, n in _GRAD_ARGS.items() if flags.get(i, False)]
    return "" if len(wanted) == len(_GRAD_ARGS) else ",".join(wanted) or "none"


def _backward_wrapper(ctx, *grads):
    # grads arrive as one list (the op returns List[Tensor]) or as separate tensors, by torch version
    if len(grads) == 1 and isinstance(grads[0], (list, tuple)):
        grads = tuple(grads[0])
    return _backward(ctx, grads)


attention_forward.register_autograd(_backward_wrapper, setup_context=_setup_context)


# ---------------------------------------------------------------------------- key padding mask
# An additive mask entry at or below this removes its key exactly: exp(-1e4 + score) is 0 even in fp64
# (exp underflows below -745), so old-style -1e4 padding masks (BERT) are padding, not a bias.
MASKED_LOGIT = -1.0e4


def _attend(mask: Tensor) -> Tensor:
    """Which entries of an SDPA attn_mask let a key through (bool: True; float: above ``MASKED_LOGIT``)."""
    if mask.dtype == torch.bool:
        return mask
    return mask > MASKED_LOGIT


def _as_4d(mask: Tensor) -> Tensor:
    """An SDPA ``attn_mask`` of 2 to 4 dims as ``[B|1, H|1, Lq, Lk]`` (SDPA broadcasts from the right)."""
    if not 2 <= mask.dim() <= 4:
        raise ValueError(f"attn_mask must be [Lq, Lk], [H, Lq, Lk] or [B, H, Lq, Lk] (broadcastable), got shape "
                         f"{list(mask.shape)}")
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


@torch.library.custom_op("lincomp::key_padding_mask", mutates_args=())
def key_padding_mask(mask: Tensor, causal: bool, check: bool = True) -> Tensor:
    """[B|1, H|1, Lq|1, Lk] SDPA ``attn_mask`` (or [Lq, Lk], [H, Lq, Lk]) -> [B|1, Lk] bool key-padding mask
    (True = attend). Float entries <= -1e4 (``MASKED_LOGIT``) remove their key.

    A key counts as present when some query row lets it through. With ``check`` the mask must equal
    ``(causal ? tril : all) & kpm`` (rows of padded queries, which see no key under that rule, may hold
    anything), and a float mask must be exactly 0 where it lets a key through; otherwise ValueError: such a
    mask (an attention bias, a packed-sequence or sliding-window mask) cannot be combined with a spec.
    """
    mask = _as_4d(mask)
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
    mask = _as_4d(mask)
    return mask.new_empty((mask.shape[0], mask.shape[-1]), dtype=torch.bool)


def block_diagonal(mask: Tensor, causal: bool) -> Optional[List[int]]:
    """The boundaries ``[0, c_1, ..., L]`` of a ``[1, H|1, L, L]`` SDPA mask that is exactly the block-diagonal
    pattern of two or more documents (each block lower-triangular when ``causal``, full otherwise; a float mask
    0 inside the blocks), else None. Each row's first visible key is its document's start; one O(L^2)
    comparison with the pattern those starts give checks every entry."""
    mask = _as_4d(mask)
    L = mask.shape[-1]
    if mask.shape[0] != 1 or mask.shape[-2] != L or L < 2:
        return None
    attend = _attend(mask)
    first = attend[0, 0].to(torch.uint8).argmax(-1)                     # [L]: first True of each row
    starts = torch.unique(first)
    if starts.numel() < 2:
        return None
    cu = starts.tolist() + [L]
    doc = document_ids(torch.tensor(cu), L, mask.device)
    want = doc[:, None] == doc[None, :]
    if causal:
        want = want & torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()
    if cu[0] != 0 or not bool((attend == want).all()):
        return None
    if mask.dtype != torch.bool and bool((mask.masked_fill(~attend, 0) != 0).any()):
        return None   # a bias inside the blocks: key_padding_mask's check names it
    return cu


@torch.library.custom_op("lincomp::mask_documents", mutates_args=())
def mask_documents(mask: Tensor, causal: bool, check: bool = True) -> List[Tensor]:
    """SDPA ``attn_mask`` -> [key-padding mask [B|1, Lk] bool, cu_seqlens int32 [Lk + 1]] (see the module docstring):
    a packed row's block-diagonal mask gives its documents (padded with repeats of Lk) and no padding; any other
    mask gives ``key_padding_mask(mask, causal, check)`` and one document."""
    m = _as_4d(mask)
    Lk = m.shape[-1]
    cu = block_diagonal(m, causal)
    if cu is None:
        kpm, cu = key_padding_mask(mask, causal, check), [0]
    else:
        kpm = torch.ones(1, Lk, dtype=torch.bool, device=mask.device)
    cu = torch.tensor(cu + [Lk] * (Lk + 1 - len(cu)), dtype=torch.int32, device=mask.device)
    return [kpm, cu]


@mask_documents.register_fake
def _mask_documents_fake(mask, causal, check=True):
    m = _as_4d(mask)
    return [m.new_empty((m.shape[0], m.shape[-1]), dtype=torch.bool),
            m.new_empty((m.shape[-1] + 1,), dtype=torch.int32)]


__all__ = ["attention", "attention_forward", "attention_backward", "key_padding_mask", "mask_documents",
           "block_diagonal", "documents", "drop_trivial_padding",
           "get_kernel", "spec_to_json",
           "spec_from_json",
           "clear_kernel_cache", "has_own_backward", "TARGETS", "FALLBACKS", "WEIGHT_NAMES"]
