"""``lincomp.linearize(model, spec)``: give a model's attention layers the learned parts of a spec and route
their attention through ``torch.ops.lincomp.attention``, through the libraries' own extension points.

- transformers (Llama-family decoders, BERT-family encoders such as all-MiniLM-L6-v2, and any model whose
  attention modules dispatch through ``ALL_ATTENTION_FUNCTIONS``): registers the attention function and
  mask function ``"lincomp"`` (``AttentionInterface`` / ``AttentionMaskInterface``) and sets the model's
  attention implementation to it. Padding reaches lincomp as a ``[B, L]`` key-padding mask (an all-ones one, as
  every ``tokenizer(...)`` call gives, is dropped so the kernels keep running). The specs are recorded in the
  model config, so ``save_pretrained`` / ``from_pretrained`` round-trip (``lincomp.models.hf``), and
  ``model.generate()`` of a causal LM uses a constant-memory ``LincompCache`` (``lincomp.models.cache``). Gated specs
  get the attention input hidden states through a forward pre-hook (a keyword argument). The spec sees q / k
  after the model's RoPE (as LoLCATs does).
- diffusers Flux (``FluxTransformer2DModel``): a lincomp attention processor on every ``FluxAttention``.
  Text tokens are the prefix (their count is the double-stream layers' encoder length); the image grid is
  ``joint_attention_kwargs={"lincomp_grid": (Hg, Wg)}`` when given (Hg, Wg = image height, width / 16), else
  the spec's own grid when it holds the image's token count, else the grid the model call's ``img_ids`` lay out
  (any aspect ratio), else the square root of the image token count.

Each attention module gets ``module.lincomp = LinearizedAttention(...)`` (the learned parameters);
``learned_parameters(model)`` yields exactly those; ``set_attention_mode(model, "teacher")`` switches back to
the original softmax attention; ``capture_attention(model)`` records each layer's attention output before the
output projection, for stock and linearised models alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import math
import sys
import warnings
from typing import Callable, Dict, Iterator, Mapping, Optional

import torch
from torch import nn

from lincomp.models.modules import MODES, LinearizedAttention
from lincomp.spec import AttentionSpec, GridWindow

ATTN_NAME = "lincomp"
_TEACHERS = ("sdpa", "eager")
_OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "c_proj")
_SPEC_KEYS = ("window", "causal", "prefix", "sinks", "linear", "combine", "name", "description", "version", "paper")


# ------------------------------------------------------------------------------------- families
def is_flux(model: nn.Module) -> bool:
    return any(type(m).__name__ == "FluxAttention" for m in model.modules())


def _transformers_attention_modules(model: nn.Module):
    """(name, module) of self-attention modules that dispatch through transformers' attention registry."""
    found = []
    for name, m in model.named_modules():
        if not hasattr(m, "config") or "Cross" in type(m).__name__ or getattr(m, "is_cross_attention", False):
            continue
        names = set(dict(m.named_children()))
        if {"q_proj", "k_proj", "v_proj"} <= names or {"query", "key", "value"} <= names:
            found.append((name, m))
    return found


def _flux_attention_modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ == "FluxAttention"]


def attention_modules(model: nn.Module) -> list:
    """The (name, module) pairs of the attention layers lincomp handles in ``model`` (stock or linearised)."""
    return _flux_attention_modules(model) if is_flux(model) else _transformers_attention_modules(model)


def _head_sizes(m: nn.Module) -> tuple:
    """(H, Hkv, D, hidden) of a transformers attention module."""
    cfg = m.config
    H = getattr(cfg, "num_attention_heads", None) or getattr(m, "num_attention_heads")
    Hkv = getattr(cfg, "num_key_value_heads", None) or H
    D = getattr(m, "head_dim", None) or getattr(m, "attention_head_size", None) or cfg.hidden_size // H
    return H, Hkv, D, cfg.hidden_size


def _specs_for(spec, names) -> dict:
    """{name: AttentionSpec or None} from a spec or a {pattern: spec | None} mapping."""
    if isinstance(spec, Mapping) and not all(k in _SPEC_KEYS for k in spec):
        table = [(p, None if s is None else AttentionSpec.coerce(s)) for p, s in spec.items()]
        out = {}
        for n in names:
            out[n] = next((s for p, s in table if fnmatch.fnmatchcase(n, p)), None)
        return out
    s = AttentionSpec.coerce(spec)
    return {n: s for n in names}


def linearize_layers(model: nn.Module, spec, *, target: str = "auto", fallback: str = "warn") -> nn.Module:
    """The layers half of ``lincomp.linearize`` (``models/api.py``, which documents the arguments): add the
    learned parts and route attention through lincomp, without the library hooks (transformers' registries
    must already hold lincomp's attention function: ``models/hf.register``)."""
    import lincomp.backends.ops  # noqa: F401  (registers torch.ops.lincomp.*)
    flux = is_flux(model)
    sites = attention_modules(model)
    if not sites:
        raise ValueError(f"{type(model).__name__}: no attention layers lincomp can handle; supported are transformers "
                         "models whose attention dispatches through ALL_ATTENTION_FUNCTIONS (Llama, BERT, ...) and "
                         "diffusers FluxTransformer2DModel")
    specs = _specs_for(spec, [n for n, _ in sites])
    if all(s is None for s in specs.values()):
        raise ValueError(f"no attention layer matched the spec patterns; layer names look like {sites[0][0]!r}")
    for name, m in sites:
        if isinstance(getattr(m, "lincomp", None), LinearizedAttention):
            raise ValueError(f"{name} is already linearised; linearize a fresh model (or remove module.lincomp)")
    if not flux:
        _check_teacher(model)
    flux_shared = {}
    for name, m in sites:
        s = specs[name]
        if s is None:
            continue
        ref = next(m.parameters())
        if flux:
            H, D, hidden = m.heads, m.head_dim, m.query_dim
        else:
            H, _, D, hidden = _head_sizes(m)
            if getattr(m, "is_causal", False) and not s.causal:
                s = dataclasses.replace(s, causal=True)
        m.lincomp = LinearizedAttention(s, H, D, hidden_size=hidden, target=target, fallback=fallback,
                                        dtype=ref.dtype, device=ref.device)
        if flux:
            torch.compiler.assume_constant_result(_flux_spec_json)   # loads Dynamo: only when linearising Flux
            m.set_processor(LincompFluxAttnProcessor(m.processor, flux_shared))
            _watch_img_ids(model, flux_shared)
        elif m.lincomp.needs_hidden_states:
            m.register_forward_pre_hook(_pass_hidden_states, with_kwargs=True)
    if not flux:
        _install_transformers(model)
    return model


# ---------------------------------------------------------------------------------- transformers
def _check_teacher(model: nn.Module) -> None:
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in _TEACHERS and impl != ATTN_NAME:
        raise ValueError(f"{type(model).__name__} uses attn_implementation={impl!r}; linearize keeps the original "
                         f"attention as the teacher and supports {list(_TEACHERS)}: load the model with "
                         "attn_implementation='sdpa'")
    p = getattr(cfg, "attention_dropout", 0) or getattr(cfg, "attention_probs_dropout_prob", 0)
    if p:
        warnings.warn(f"the model's attention dropout ({p}) is not applied by lincomp attention (student mode)",
                      stacklevel=3)


def _install_transformers(model: nn.Module) -> None:
    """Switch the model to the "lincomp" attention implementation (registered by ``models/hf.register``)."""
    cfg = model.config
    if cfg._attn_implementation != ATTN_NAME:
        for _, m in _transformers_attention_modules(model):
            if hasattr(m, "lincomp"):
                m.lincomp.teacher_impl = cfg._attn_implementation
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(ATTN_NAME)
        else:
            cfg._attn_implementation = ATTN_NAME


def _pass_hidden_states(module, args, kwargs):
    """Forward pre-hook: hand the attention input to the attention function (gates are computed from it)."""
    kwargs["lincomp_hidden_states"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return args, kwargs


def lincomp_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, **kwargs):
    """transformers mask function for "lincomp": a ``[B, kv_length]`` bool key-padding mask, or None.

    A plain causal / bidirectional pattern needs no mask (the spec defines the pattern); anything else
    (packed sequences, overlays) is materialised as SDPA's 4D mask, which the attention function checks and
    reduces to a key-padding mask (raising if it is not one).
    """
    from transformers.masking_utils import (bidirectional_mask_function, causal_mask_function, prepare_padding_mask,
                                            sdpa_mask)
    if mask_function is None or mask_function is causal_mask_function or mask_function is bidirectional_mask_function:
        if attention_mask is None:
            return None
        # The keys this call attends to are columns kv_offset .. kv_offset + kv_length (a LincompCache hands
        # attention only the new tokens; without a cache kv_offset is 0).
        mask = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        return mask[:, kv_offset:kv_offset + kv_length].to(torch.bool)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                     device=kwargs.get("device", "cpu"))


def _key_padding(mask, causal: bool):
    if mask is None:
        return None
    if mask.dim() == 2:
        return mask.to(torch.bool)
    return torch.ops.lincomp.key_padding_mask(mask, causal, True)


def _teacher_attention(module, query, key, value, mask, lin: LinearizedAttention, **kwargs):
    """The model's original attention; a lincomp [B, L] padding mask becomes the 4D mask it expects."""
    impl = getattr(lin, "teacher_impl", "sdpa")
    causal = getattr(module, "is_causal", False)
    # eager attention takes causality from the mask only; SDPA uses is_causal when there is no mask.
    if (mask is not None and mask.dim() == 2) or (mask is None and impl == "eager" and causal):
        L, Lk = query.shape[2], key.shape[2]
        allowed = torch.ones(L, Lk, dtype=torch.bool, device=query.device)
        if causal:
            allowed = allowed.tril(Lk - L)
        mask = allowed[None, None] if mask is None else allowed[None, None] & mask[:, None, None, :]
    if impl == "eager":
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min)
        fn = sys.modules[type(module).__module__].eager_attention_forward
    else:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        fn = ALL_ATTENTION_FUNCTIONS[impl]
    return fn(module, query, key, value, mask, **kwargs)


def lincomp_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function "lincomp": q ``[B, H, L, D]``, k / v ``[B, Hkv, L, D]`` -> (``[B, L, H, D]``, None)."""
    lin = getattr(module, "lincomp", None)
    hidden = kwargs.pop("lincomp_hidden_states", None)
    if lin is None and getattr(getattr(module.config, "quantization_config", None), "quant_method", None) != ATTN_NAME:
        raise ValueError(f"{type(module).__name__} runs attn_implementation='lincomp' but was never linearised, so "
                         "there is no spec to run; call lincomp.linearize(model, spec) (or load a folder saved by "
                         "save_pretrained after linearize) instead of passing attn_implementation='lincomp'")
    if lin is None or lin.mode == "teacher":
        return _teacher_attention(module, query, key, value, attention_mask, lin, scaling=scaling, dropout=dropout,
                                  **kwargs)
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"lincomp attention got {query.shape[2]} queries and {key.shape[2]} keys (a KV cache?); "
                         "pass cache=lincomp.models.cache.LincompCache(model) (model.generate() does by default) "
                         "or call the model with use_cache=False")
    from lincomp.models.packing import check_packed_mask, packed_cu_seqlens
    cu = packed_cu_seqlens(query.shape[0], kwargs)   # packed training: each document on its own
    if cu is not None:
        check_packed_mask(attention_mask, cu, lin.spec.causal)
        kpm = None
    else:
        kpm = _key_padding(attention_mask, lin.spec.causal)
    o = lin(query, key, value, hidden_states=hidden, key_padding_mask=kpm, scale=scaling, cu_seqlens=cu)
    return o.transpose(1, 2).contiguous(), None


# ------------------------------------------------------------------------------------------ Flux
def _flux_spec_json(base_json: str, prefix: int, grid: Optional[tuple]) -> str:
    """The per-call spec JSON (marked constant for Dynamo by ``linearize``: no tracing into json / dataclasses)."""
    return _flux_spec_json_cached(base_json, prefix, grid)


@functools.lru_cache(maxsize=256)
def _flux_spec_json_cached(base_json: str, prefix: int, grid: Optional[tuple]) -> str:
    spec = dataclasses.replace(AttentionSpec.from_json(base_json), prefix=prefix)
    if grid is not None:
        spec = spec.with_grid(grid)
    return spec.canonical_json()


_GRID_FIX = "pass joint_attention_kwargs={'lincomp_grid': (height // 16, width // 16)}"


def _grid_from_ids(img_ids: torch.Tensor, n: int, nd: int) -> tuple:
    """The grid (rows, cols) or (frames, rows, cols) that Flux's ``img_ids`` ``[n, 3]`` (frame, row, col per image
    token; ``[B, n, 3]`` in older diffusers) lay out in row-major order; ValueError when they do not."""
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    if ids.dim() != 2 or ids.shape[0] != n or ids.shape[1] < nd:
        raise ValueError(f"img_ids {list(img_ids.shape)} do not describe the call's {n} image tokens; {_GRID_FIX}")
    coords, rest = ids[:, ids.shape[1] - nd:], ids[:, :ids.shape[1] - nd]
    axes = [torch.unique(coords[:, a]) for a in range(nd)]
    grid = tuple(len(a) for a in axes)
    row_major = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, nd)
    if math.prod(grid) != n or not torch.equal(row_major, coords) or not bool((rest == rest[:1]).all()):
        raise ValueError(f"img_ids do not lay the {n} image tokens out on one row-major {nd}D grid (a grid window needs "
                         f"that order); {_GRID_FIX}")
    return grid


def _watch_img_ids(model: nn.Module, shared: dict) -> None:
    """Install :func:`_record_img_ids` once on each FluxTransformer2DModel in ``model``."""
    for m in model.modules():
        if type(m).__name__ == "FluxTransformer2DModel" and not getattr(m, "_lincomp_ids_hook", False):
            m.register_forward_pre_hook(_record_img_ids(shared), with_kwargs=True)
            m._lincomp_ids_hook = True


def _record_img_ids(shared: dict):
    """Forward pre-hook of a linearised FluxTransformer2DModel: its processors read the grid off ``img_ids``."""
    def hook(module, args, kwargs):
        shared["img_ids"] = kwargs.get("img_ids", args[4] if len(args) > 4 else None)
        shared["ids_grids"] = {}
    return hook


def _ids_grid(shared: dict, n: int, nd: int) -> Optional[tuple]:
    """The grid of the model call's ``img_ids`` (None without them), computed once per forward."""
    ids = shared.get("img_ids")
    if ids is None:
        return None
    cache = shared.setdefault("ids_grids", {})
    if (n, nd) not in cache:
        cache[(n, nd)] = _grid_from_ids(ids, n, nd)
    return cache[(n, nd)]


def _flux_layout(spec: AttentionSpec, L: int, text_len: Optional[int], grid,
                 ids_grid: Callable[[int, int], Optional[tuple]] = lambda n, nd: None) -> tuple:
    """(prefix, grid) of one Flux attention call from its length, text length and the optional grid kwarg.

    The text length is the double-stream layers' encoder length; failing that, L - prod(grid), or spec.prefix.
    The grid: the ``lincomp_grid`` kwarg; else the spec's own grid when it has the image's token count (checked
    against ``img_ids`` outside torch.compile); else the grid ``ids_grid(n, nd)`` reads off ``img_ids``; else a
    square.
    """
    if grid is not None:
        grid = tuple(int(g) for g in grid)
        if text_len is None:
            text_len = L - math.prod(grid)
    if text_len is None:
        text_len = spec.prefix
    image = L - text_len
    w = spec.window
    if grid is None and isinstance(w, GridWindow):
        nd = len(w.grid)
        if math.prod(w.grid) == image:
            grid = w.grid
            found = None if torch.compiler.is_compiling() else ids_grid(image, nd)
            if found is not None and found != grid:
                raise ValueError(f"the spec's grid {list(grid)} has the image's {image} tokens, but img_ids lay them "
                                 f"out as {list(found)}; use spec.with_grid({found}) or {_GRID_FIX}")
        else:
            grid = ids_grid(image, nd)
        if grid is None:
            side = math.isqrt(image) if image > 0 else 0
            if nd != 2 or side * side != image:
                raise ValueError(f"cannot infer the image grid from {image} image tokens (not a square, no img_ids); "
                                 + _GRID_FIX)
            grid = (side, side)
    if grid is not None and math.prod(grid) != image:
        raise ValueError(f"lincomp_grid {list(grid)} has {math.prod(grid)} tokens but the call has {image} image tokens "
                         f"({L} tokens, {text_len} text tokens); pass (height // 16, width // 16)")
    return text_len, (grid if isinstance(spec.window, GridWindow) else None)


class LincompFluxAttnProcessor:
    """diffusers attention processor for ``FluxAttention`` that computes attention with lincomp.

    The same projections, q/k norms and RoPE as ``FluxAttnProcessor``; text tokens form the spec's prefix;
    the grid comes from ``joint_attention_kwargs={"lincomp_grid": (Hg, Wg)}``, the spec or ``img_ids``. In teacher
    mode it calls the processor it replaced.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, original, shared: Optional[dict] = None):
        self.original = original
        # Shared by a model's processors: double-stream layers record the text length for single-stream ones
        # (which see [text; image] already concatenated).
        self.shared = {} if shared is None else shared

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 lincomp_grid=None):
        lin = attn.lincomp
        if lin.mode == "teacher":
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise ValueError("lincomp's Flux processor takes no attention_mask (Flux passes none); the spec defines "
                             "which tokens see which")
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections
        query, key, value, e_query, e_key, e_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (attn.heads, -1)))
        key = attn.norm_k(key.unflatten(-1, (attn.heads, -1)))
        value = value.unflatten(-1, (attn.heads, -1))
        text_len = self.shared.get("text_len")
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            text_len = self.shared["text_len"] = encoder_hidden_states.shape[1]
            query = torch.cat([attn.norm_added_q(e_query.unflatten(-1, (attn.heads, -1))), query], dim=1)
            key = torch.cat([attn.norm_added_k(e_key.unflatten(-1, (attn.heads, -1))), key], dim=1)
            value = torch.cat([e_value.unflatten(-1, (attn.heads, -1)), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        prefix, grid = _flux_layout(lin.spec, query.shape[1], text_len, lincomp_grid,
                                    functools.partial(_ids_grid, self.shared))
        spec_json = _flux_spec_json(lin.spec_json, prefix, grid)
        x = None
        if lin.needs_hidden_states:   # gates read the hidden states of every token, text first
            x = hidden_states if text_len is None or encoder_hidden_states is None else \
                torch.cat([encoder_hidden_states, hidden_states], dim=1)
        out = lin(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), hidden_states=x,
                  spec_json=spec_json)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            enc, img = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
            img = attn.to_out[1](attn.to_out[0](img.contiguous()))
            return img, attn.to_add_out(enc.contiguous())
        return out


# ------------------------------------------------------------------------------------ utilities
def learned_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Exactly the parameters ``linearize`` added (feature maps, gates, sinks, window factors, alphas)."""
    for m in model.modules():
        if isinstance(m, LinearizedAttention):
            yield from m.parameters()


def set_attention_mode(model: nn.Module, mode: str) -> nn.Module:
    """``"teacher"``: the original softmax attention; ``"student"``: lincomp. One model can be its own teacher."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    found = False
    for m in model.modules():
        if isinstance(m, LinearizedAttention):
            m.mode, found = mode, True
    if not found:
        raise ValueError("set_attention_mode needs a linearised model: call lincomp.linearize(model, spec) first")
    return model


@contextlib.contextmanager
def attention_mode(model: nn.Module, mode: str):
    """Context manager form of ``set_attention_mode`` (restores each layer's mode on exit)."""
    saved = [(m, m.mode) for m in model.modules() if isinstance(m, LinearizedAttention)]
    set_attention_mode(model, mode)
    try:
        yield model
    finally:
        for m, old in saved:
            m.mode = old


@contextlib.contextmanager
def capture_attention(model: nn.Module, detach: bool = False):
    """Record each attention layer's output before its output projection, keyed by module name.

    Yields a dict ``{name: [B, L, H * D]}`` filled (overwritten) by every forward inside the block; it works
    on stock models (the teacher) and linearised ones (the student) alike. Flux double-stream layers record
    ``[text; image]`` tokens in that order. ``detach=True`` stores detached tensors (for teacher targets).
    """
    records: Dict[str, torch.Tensor] = {}
    handles = []
    sites = attention_modules(model)
    if not sites:
        raise ValueError(f"{type(model).__name__}: no attention layers found to capture")

    def put(name, t):
        records[name] = t.detach() if detach else t

    for name, m in sites:
        handles.extend(_capture_hooks(name, m, put))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def _capture_hooks(name: str, m: nn.Module, put: Callable) -> list:
    if type(m).__name__ == "FluxAttention":
        if getattr(m, "pre_only", False):      # single-stream: the module returns the attention output
            return [m.register_forward_hook(lambda mod, args, out: put(name, out))]
        parts = {}
        return [m.to_out[0].register_forward_pre_hook(lambda mod, args: parts.__setitem__("img", args[0])),
                m.to_add_out.register_forward_pre_hook(lambda mod, args: parts.__setitem__("txt", args[0])),
                m.register_forward_hook(lambda mod, args, out: put(name, torch.cat([parts.pop("txt"),
                                                                                   parts.pop("img")], 1)))]
    for proj in _OUTPUT_PROJECTIONS:
        child = getattr(m, proj, None)
        if isinstance(child, nn.Module):
            return [child.register_forward_pre_hook(lambda mod, args: put(name, args[0]))]
    # BERT-style: the self-attention module returns (context, weights) and the projection lives outside it.
    return [m.register_forward_hook(lambda mod, args, out: put(name, out[0] if isinstance(out, tuple) else out))]


__all__ = ["linearize_layers", "learned_parameters", "set_attention_mode", "attention_mode", "capture_attention",
           "attention_modules", "LincompFluxAttnProcessor", "lincomp_attention_forward", "lincomp_mask"]
