"""``torch.compile(model, backend="lincomp", options={...})``: lincomp kernels in place of SDPA, Inductor for the rest.

The backend receives Dynamo's FX graph, replaces every ``F.scaled_dot_product_attention`` call it is asked to
with ``torch.ops.lincomp.attention`` (a custom op with a fake and an autograd implementation, the spec carried
as a JSON string), then hands the graph to Inductor (``compile_fx``). Models linearised with
``lincomp.linearize`` already call ``torch.ops.lincomp.attention``; those nodes pass through (re-targeted when
``target`` is given). Registered through the ``torch_dynamo_backends`` entry point, so ``backend="lincomp"`` works
in a process that never imported lincomp; this module imports only torch and lincomp's light modules.

Options (``options={...}``; unknown keys raise ValueError):

- ``spec``: what replaces SDPA (optional for linearised models, whose attention already calls lincomp).
  * an ``AttentionSpec``, its dict, or a JSON string / path: every call site;
  * a mapping ``{module-name pattern: spec or None}``: fnmatch patterns over the module path of the call site
    (``"model.layers.*.self_attn"`` in transformers, ``"transformer_blocks.*.attn"`` /
    ``"single_transformer_blocks.*.attn"`` in diffusers Flux); the first matching pattern wins; ``None`` or no match
    keeps SDPA; a pattern that matches no call site of a graph warns, naming the sites;
  * a callable ``f(site: CallSite) -> spec | None`` (``None`` keeps SDPA), e.g. to pick a grid per site with
    ``spec.with_grid(...)``.
- ``target``: ``"auto"`` (default: Triton for CUDA tensors, TVM for CPU tensors), ``"triton"``, ``"tvm"``,
  ``"reference"``.
- ``fallback``: ``"warn"`` (default: a target that is not installed, or a call a kernel cannot run, runs the
  reference with a ``LincompFallbackWarning``) or ``"error"`` (raise instead).
- ``hints``: a JSON-able dict passed to ``lincomp.compile(spec, target, **hints)`` (tuning choices).
- ``unsupported``: ``"error"`` (default) or ``"keep"``: what to do with a call site the spec cannot serve
  (query length != key length, dropout, a spec that needs learned tensors, a grid that does not match). ``"keep"``
  leaves SDPA there, with a warning.
- ``check_masks``: ``True`` (default). An ``attn_mask`` is turned into a key-padding mask (``[B, L]`` bool) and
  combined with the spec; with ``True`` each call verifies that the mask is one (optionally causal), raising
  ValueError for any other mask (a bias, a sliding-window mask). ``False`` skips that O(L^2) check. A packed
  row's mask (B = 1, exactly block diagonal: causal within each block for a causal spec) is recognised at run
  time, whatever ``check_masks`` says, and reaches the kernels as ``cu_seqlens`` (each document on its own).
- ``inductor``: ``True`` (default), ``False`` (run the rewritten graph eagerly), or a dict of Inductor config
  patches.

Call-site semantics: ``is_causal=True`` makes the spec causal (``causal`` is OR-ed); ``scale`` is passed through;
grouped-query attention (``enable_gqa=True``, or keys/values repeated with ``repeat_kv``'s expand + reshape) runs
on the un-repeated key/value heads. ``rewrite_report()`` lists what the last compilations did at each site.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import fnmatch
import json
import operator
import re
import warnings
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F

from lincomp.spec import AttentionSpec

_OPTION_KEYS = ("spec", "target", "fallback", "hints", "unsupported", "check_masks", "inductor")
_SPEC_KEYS = ("window", "causal", "prefix", "sinks", "linear", "combine", "name", "description", "version", "paper")
_TARGETS = ("auto", "triton", "tvm", "reference")
_LEARNED = ("g", "feature_weight_q", "feature_weight_k", "sink_logits", "window_gamma", "alpha", "pool_weight")
_SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
                 torch.ops.aten.scaled_dot_product_attention.default)
_REPORT = collections.deque(maxlen=256)


@dataclasses.dataclass(frozen=True)
class CallSite:
    """One scaled_dot_product_attention call in a Dynamo graph (what a spec chooser sees).

    Shapes are ``[B, H, L, D]`` tuples of ints (or SymInts under dynamic shapes).
    """

    name: str                 # module path, e.g. "model.layers.0.self_attn" ("" outside any module)
    index: int                # position among the SDPA calls of this graph
    q_shape: tuple
    k_shape: tuple
    v_shape: tuple
    dtype: torch.dtype
    device: torch.device
    is_causal: bool
    has_mask: bool
    scale: Optional[float]
    enable_gqa: bool


@dataclasses.dataclass(frozen=True)
class Options:
    """Validated backend options (see the module docstring)."""

    chooser: Optional[Callable[[CallSite], Optional[AttentionSpec]]]   # None: no spec given
    target: Optional[str] = None
    fallback: str = "warn"
    hints_json: str = ""
    unsupported: str = "error"
    check_masks: bool = True
    inductor: Any = True


class _Reject(Exception):
    """A call site the spec cannot serve; the message says why and how to fix it."""


# -------------------------------------------------------------------------------------- options
def _as_spec(value, where: str) -> Optional[AttentionSpec]:
    if value is None:
        return None
    try:
        return AttentionSpec.coerce(value)
    except (TypeError, ValueError) as e:
        raise type(e)(f"options[{where}]: {e}") from None


def _is_spec_dict(m: Mapping) -> bool:
    return all(isinstance(k, str) and k in _SPEC_KEYS for k in m)


def _chooser(spec) -> Callable[[CallSite], Optional[AttentionSpec]]:
    if isinstance(spec, AttentionSpec) or isinstance(spec, str) or (isinstance(spec, Mapping) and _is_spec_dict(spec)):
        fixed = _as_spec(spec, "'spec'")
        return lambda site: fixed
    if isinstance(spec, Mapping):
        table = []
        for pattern, value in spec.items():
            if not isinstance(pattern, str):
                raise TypeError(f"options['spec'] as a mapping needs module-name patterns (str) as keys, got "
                                f"{pattern!r}; e.g. {{'model.layers.*.self_attn': spec}}")
            table.append((pattern, _as_spec(value, f"'spec'][{pattern!r}")))

        def choose(site: CallSite):
            for pattern, s in table:
                if fnmatch.fnmatchcase(site.name, pattern):
                    return s
            return None
        choose.patterns = tuple(p for p, _ in table)   # rewrite() warns about a pattern no call site matches
        return choose
    if callable(spec):
        def choose_call(site: CallSite):
            return _as_spec(spec(site), "'spec'] (returned by the callable")
        return choose_call
    raise TypeError(f"options['spec'] must be an AttentionSpec, a spec dict or JSON, a mapping "
                    f"{{module-name pattern: spec}}, or a callable(site) -> spec; got {type(spec).__name__}")


def _choice(options, key, choices, default):
    value = options.get(key, default)
    if value not in choices:
        raise ValueError(f"options[{key!r}] must be one of {list(choices)}, got {value!r}")
    return value


def parse_options(options: Optional[Mapping]) -> Options:
    """Validate ``options`` (raises ValueError / TypeError naming the option and the fix)."""
    if isinstance(options, Options):
        return options
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise TypeError(f"options must be a dict like {{'spec': lincomp.presets.lizard()}}, got {type(options).__name__}")
    for key in options:
        if key not in _OPTION_KEYS:
            close = difflib.get_close_matches(str(key), _OPTION_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; the options are {list(_OPTION_KEYS)}"
            raise ValueError(f"unknown lincomp backend option {key!r}{hint}")
    target = options.get("target")
    if target is not None and target not in _TARGETS:
        raise ValueError(f"options['target'] must be one of {list(_TARGETS)}, got {target!r}")
    hints = options.get("hints") or {}
    if not isinstance(hints, Mapping):
        raise TypeError(f"options['hints'] must be a dict of lincomp.compile keyword arguments, got {type(hints).__name__}")
    try:
        hints_json = json.dumps(dict(hints), sort_keys=True) if hints else ""
    except TypeError as e:
        raise TypeError(f"options['hints'] must be JSON-serialisable (it travels inside the graph): {e}") from None
    check = options.get("check_masks", True)
    if not isinstance(check, bool):
        raise TypeError(f"options['check_masks'] must be True or False, got {check!r}")
    inductor = options.get("inductor", True)
    if not isinstance(inductor, (bool, Mapping)):
        raise TypeError(f"options['inductor'] must be True, False or a dict of Inductor config patches, got {inductor!r}")
    spec = options.get("spec")
    return Options(chooser=_chooser(spec) if spec is not None else None, target=target,
                   fallback=_choice(options, "fallback", ("warn", "error"), "warn"), hints_json=hints_json,
                   unsupported=_choice(options, "unsupported", ("error", "keep"), "error"), check_masks=check,
                   inductor=inductor)


# -------------------------------------------------------------------------------------- graph
def _val(node):
    if isinstance(node, torch.fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def _module_name(node: torch.fx.Node) -> str:
    """'model.layers.0.self_attn' from Dynamo's nn_module_stack (innermost module), '' if none."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['[^']*'\](\[\d+\])?\.?", "", path)          # the root: L['self'], L['args'][0]
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[['\"]?([^\]'\"]*)['\"]?\]", r".\1", path)      # [0] / ['name'] -> .0 / .name
    # Dynamo spells some module paths through the instance dict (diffusers: "__dict__['_modules']['blocks']"):
    # those two hops are not part of the module's name.
    return ".".join(p for p in path.split(".") if p and p not in ("__dict__", "_modules"))


def _sdpa_args(node: torch.fx.Node) -> dict:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    for alias, name in (("q", "query"), ("k", "key"), ("v", "value")):
        if alias in args:
            args[name] = args.pop(alias)
    return args


def _same(a, b) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    return a is b or bool(statically_known_true(a == b))


def _unrepeat(node):
    """x for ``x[:, :, None].expand(B, Hkv, n, L, D).reshape(B, Hkv * n, L, D)`` (transformers' repeat_kv), else None.

    Query head h then reads key/value head h // n: exactly grouped-query attention, so x can be passed as is.
    """
    if not (isinstance(node, torch.fx.Node) and node.target in ("reshape", "view", torch.reshape)):
        return None
    src = node.args[0]
    if not (isinstance(src, torch.fx.Node) and src.target == "expand"):
        return None
    inner = src.args[0]
    if not (isinstance(inner, torch.fx.Node) and inner.target is operator.getitem):
        return None
    base, index = inner.args
    full = slice(None, None, None)
    if not (isinstance(index, tuple) and index[:3] == (full, full, None) and all(i == full for i in index[3:])):
        return None
    bv, iv, ev, ov = _val(base), _val(inner), _val(src), _val(node)
    if not all(isinstance(t, torch.Tensor) for t in (bv, iv, ev, ov)) or bv.dim() != 4 or iv.dim() != 5:
        return None
    B, Hkv, L, D = bv.shape
    if (_same(iv.shape[0], B) and _same(iv.shape[1], Hkv) and _same(iv.shape[2], 1) and _same(iv.shape[3], L)
            and _same(iv.shape[4], D) and ov.dim() == 4 and _same(ov.shape[1], Hkv * ev.shape[2])
            and _same(ov.shape[2], L) and _same(ov.shape[3], D)):
        return base
    return None


def _sites(gm: torch.fx.GraphModule):
    index = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _SDPA_TARGETS:
            yield index, node
            index += 1


def _call_site(index: int, node: torch.fx.Node) -> CallSite:
    a = _sdpa_args(node)
    q, k, v = (_val(a[n]) for n in ("query", "key", "value"))
    scale, causal, gqa = a.get("scale"), a.get("is_causal", False), a.get("enable_gqa", False)
    return CallSite(name=_module_name(node), index=index, q_shape=tuple(q.shape), k_shape=tuple(k.shape),
                    v_shape=tuple(v.shape), dtype=q.dtype, device=q.device, is_causal=causal is True,
                    has_mask=a.get("attn_mask") is not None, scale=scale if isinstance(scale, (int, float)) else None,
                    enable_gqa=gqa is True)


def _plan(node: torch.fx.Node, site: CallSite, spec: AttentionSpec) -> dict:
    """Check that ``spec`` can serve this call; return the replacement's pieces (or raise _Reject)."""
    a = _sdpa_args(node)
    for name in ("is_causal", "dropout_p", "enable_gqa"):
        if isinstance(a.get(name), torch.fx.Node):
            raise _Reject(f"{name} is a traced value, not a constant; pass a Python constant")
    if a.get("dropout_p", 0.0):
        raise _Reject(f"dropout_p={a['dropout_p']} (attention dropout); lincomp kernels have none: call model.eval() "
                      "or set the model's attention dropout to 0")
    q, k, v = (_val(a[n]) for n in ("query", "key", "value"))
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        raise _Reject("query/key/value are not 4D [B, H, L, D] tensors")
    if not _same(q.shape[2], k.shape[2]):
        raise _Reject(f"query length {q.shape[2]} != key length {k.shape[2]} (cross-attention or a KV cache); "
                      "lincomp replaces self-attention over whole sequences (decode with lincomp.models.generate)")
    if site.is_causal:
        spec = dataclasses.replace(spec, causal=True)
    needs = [n for n in _LEARNED if _needs(spec, n)]
    if needs:
        raise _Reject(f"the spec ({spec.summary()}) needs learned tensors {needs} that a stock model does not have; "
                      "call lincomp.linearize(model, spec) first (it routes attention through lincomp itself)")
    expected = spec.expected_length()
    if expected is not None:
        L = q.shape[2]
        if not isinstance(L, int):
            raise _Reject(f"the spec's grid fixes the length to {expected} but this graph has a symbolic length; "
                          "compile with dynamic=False, or choose the grid per call site with a callable spec")
        if L != expected:
            raise _Reject(f"the spec's grid {list(spec.window.grid)} with prefix {spec.prefix} needs L={expected}, "
                          f"but the call has L={L}; build it with spec.with_grid(...) (a callable spec can do so per "
                          "call site)")
    k_node, v_node = a["key"], a["value"]
    if not site.enable_gqa:
        kb, vb = _unrepeat(k_node), _unrepeat(v_node)
        if kb is not None and vb is not None and _same(_val(kb).shape[1], _val(vb).shape[1]):
            k_node, v_node = kb, vb
    return {"spec": spec, "q": a["query"], "k": k_node, "v": v_node, "mask": a.get("attn_mask"),
            # A traced scale (dynamic=True turns a module's float attribute into a graph input) goes to the op as
            # is: Inductor then asks Dynamo to specialise it (one restart inside the first compilation, no
            # recompile per length); an eager graph passes the float.
            "scale": a.get("scale") if isinstance(a.get("scale"), torch.fx.Node) else site.scale}


def _needs(spec: AttentionSpec, name: str) -> bool:
    lin = spec.linear
    return {"g": lin is not None and lin.gate is not None,
            "feature_weight_q": lin is not None and lin.has_weights,
            "feature_weight_k": lin is not None and lin.has_weights,
            "sink_logits": spec.sinks > 0,
            "window_gamma": spec.combine == "shared",
            "alpha": spec.combine == "sum",
            "pool_weight": spec.pool is not None}[name]


def _replace(gm: torch.fx.GraphModule, node: torch.fx.Node, plan: dict, opts: Options) -> None:
    from lincomp.backends.ops import spec_to_json
    graph = gm.graph
    spec = plan["spec"]
    with graph.inserting_before(node):
        kpm = cu = None
        if plan["mask"] is not None:   # a padding mask, or a packed row's block-diagonal one (decided per call)
            key = (plan["mask"], spec.causal, opts.check_masks)
            docs = gm.meta.setdefault("lincomp_mask_documents", {})   # one per mask: layers share theirs
            if key not in docs:   # before the first site using the mask, so before every later one
                docs[key] = graph.call_function(torch.ops.lincomp.mask_documents.default, key)
            kpm = graph.call_function(operator.getitem, (docs[key], 0))
            cu = graph.call_function(operator.getitem, (docs[key], 1))
            batch = graph.call_method("size", (plan["q"], 0))
            kpm = graph.call_method("expand", (kpm, batch, -1))
        new = graph.call_function(
            torch.ops.lincomp.attention.default, (plan["q"], plan["k"], plan["v"], spec_to_json(spec)),
            {"scale": plan["scale"], "key_padding_mask": kpm, "target": opts.target or "auto",
             "fallback": opts.fallback, "hints_json": opts.hints_json, "cu_seqlens": cu})
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


_OP_ARG_INDEX = {"target": 12, "fallback": 13, "hints_json": 14}   # positions in lincomp::attention's schema


def _set_op_arg(node: torch.fx.Node, name: str, value) -> None:
    index = _OP_ARG_INDEX[name]
    if len(node.args) > index:
        node.update_arg(index, value)
    else:
        node.update_kwarg(name, value)


def rewrite(gm: torch.fx.GraphModule, options) -> list:
    """Replace the graph's SDPA calls in place (no compilation). Returns one report dict per call site."""
    import lincomp.backends.ops  # noqa: F401  (registers torch.ops.lincomp.*)
    lincomp_ops = (torch.ops.lincomp.attention, torch.ops.lincomp.attention.default)
    opts = parse_options(options)
    report = []
    routed = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in lincomp_ops]
    for index, node in _sites(gm):
        site = _call_site(index, node)
        spec = opts.chooser(site) if opts.chooser is not None else None
        entry = {"site": site.name, "index": index, "action": "kept", "spec": None, "reason": "no spec chosen"}
        if spec is not None:
            try:
                plan = _plan(node, site, spec)
            except _Reject as why:
                msg = f"lincomp: cannot replace scaled_dot_product_attention at {site.name or '<top level>'!r}: {why}"
                if opts.unsupported == "error":
                    raise ValueError(msg + ". (Option unsupported='keep' leaves SDPA at such call sites.)") from None
                warnings.warn(msg + "; keeping SDPA there", stacklevel=2)
                entry["reason"] = str(why)
            else:
                _replace(gm, node, plan, opts)
                entry.update(action="replaced", spec=plan["spec"].key(), reason="")
        report.append(entry)
    for node in routed:  # attention already routed through lincomp (linearised models)
        if opts.target is not None:
            for name, value in (("target", opts.target), ("fallback", opts.fallback), ("hints_json", opts.hints_json)):
                _set_op_arg(node, name, value)
        report.append({"site": _module_name(node), "index": None, "action": "lincomp",
                       "spec": AttentionSpec.from_json(node.args[3]).key(), "reason": "already a lincomp op"})
    _warn_unmatched(opts, [e["site"] for e in report if e["index"] is not None])
    if opts.chooser is None and report and not routed:
        warnings.warn("lincomp backend: no options['spec'] given, so scaled_dot_product_attention is kept; pass "
                      "options={'spec': ...} or linearize the model first", stacklevel=2)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    _REPORT.extend(report)
    return report


def _warn_unmatched(opts: Options, names: list) -> None:
    """Warn for each module-name pattern of ``options['spec']`` that none of this graph's SDPA sites matches."""
    patterns = getattr(opts.chooser, "patterns", ())
    if not names:
        return
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            shown = ", ".join(repr(n or "<top level>") for n in names[:4]) + (", ..." if len(names) > 4 else "")
            warnings.warn(f"lincomp backend: the spec pattern {pattern!r} matches none of the {len(names)} "
                          f"scaled_dot_product_attention call sites of this graph (they are named {shown}); fix the "
                          "pattern, e.g. 'transformer_blocks.*.attn'", stacklevel=3)


def rewrite_report(clear: bool = False) -> list:
    """What recent compilations did at each call site: dicts with site, index, action, spec, reason."""
    out = list(_REPORT)
    if clear:
        _REPORT.clear()
    return out


def lincomp_backend(gm: torch.fx.GraphModule, example_inputs, options: Optional[Mapping] = None):
    """The Dynamo backend: rewrite SDPA to lincomp ops, then compile with Inductor (see the module docstring)."""
    opts = parse_options(options)
    rewrite(gm, opts)
    if opts.inductor is False:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx
    patches = dict(opts.inductor) if isinstance(opts.inductor, Mapping) else None
    return compile_fx(gm, example_inputs, config_patches=patches)


__all__ = ["lincomp_backend", "CallSite", "Options", "parse_options", "rewrite", "rewrite_report"]
