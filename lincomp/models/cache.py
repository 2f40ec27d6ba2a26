"""``LincompCache``: a constant-memory ``transformers.Cache`` so ``model.generate()`` runs a linearised causal LM.

transformers' attention layers call ``cache.update(k_new, v_new, layer_idx)`` and attend over what it returns.
A ``LincompLayer`` returns only the new tokens' keys / values and arms its ``LinearizedAttention`` for that
call; the layer then feeds a per-layer decoder (the target's: TVM on the CPU, Triton on CUDA, the reference
for target="reference"; see ``lincomp.models.modules``) the new tokens: a prompt in one ``prefill`` (the forward
kernel over all of it, then the decoder state filled from its output state and last keys), each later token in
one ``step``. The decoder holds the linear
state ``(S, z)`` plus the window's last keys: ``O(window + prefix)`` tokens per layer, whatever the context.

``lincomp.linearize`` makes ``model.generate()`` use this cache by default (a per-model hook on
``_prepare_cache_for_generation``); pass ``cache=LincompCache(model)`` to be explicit. A step with this cache
whose work is small (one token of a model under ~16M parameters: ``lincomp.models.generate.SERIAL_STEP_WORK``)
runs on one torch thread (forward hooks; the thread count is restored after the step). Greedy, sampling,
``GenerationConfig``, streamers and batches with left padding work; beam search, assisted decoding and
cache cropping need past keys a constant-memory state does not keep, and raise.

Padding: a prompt batch with padding (``attention_mask`` zeros) switches a layer to one decoder per sequence
that skips the padded tokens, so every sequence decodes exactly as it would alone (each row's prompt is
prefilled on its own, B = 1).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from lincomp.models.generate import SERIAL_STEP_WORK, decoder_bytes, step_work
from lincomp.models.linearize import attention_modules
from lincomp.models.modules import LinearizedAttention, step_through


def active_module(lin) -> Optional[LinearizedAttention]:
    """The LinearizedAttention that runs for ``attention_module.lincomp``: itself, or the active copy when peft's
    ``modules_to_save`` wrapped it (see ``lincomp.models.adapters``); None if there is none."""
    if isinstance(lin, LinearizedAttention) or lin is None:
        return lin
    copies, active = getattr(lin, "modules_to_save", None), getattr(lin, "active_adapters", None)
    if copies is not None and active and not lin.disable_adapters:
        return active_module(copies[active[0]])
    return active_module(getattr(lin, "original_module", None))


class LincompLayer(CacheLayerMixin):
    """The cache of one linearised attention layer: a decoder state, not keys and values."""

    is_compileable = False
    is_sliding = False

    def __init__(self, lin: LinearizedAttention):
        super().__init__()
        self.lin = lin
        self.seen = 0                       # tokens fed so far (padding included: positions in the mask)
        self.decoder = None                 # one decoder for the whole batch ...
        self.rows: Optional[List] = None    # ... or one per sequence once a padded batch arrived

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if self.lin.mode != "student":
            raise ValueError("LincompCache runs lincomp attention; set_attention_mode(model, 'student') first (the "
                             "teacher's softmax needs a DynamicCache)")
        self.is_initialized = True
        self.lin._cache_layer = self        # consumed by LinearizedAttention.forward for this call
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def attend(self, q, k, v, g, scale, key_padding_mask) -> torch.Tensor:
        """o ``[B, H, n, Dv]`` for the n new tokens; ``key_padding_mask [B, n]`` (True = real token) or None."""
        if key_padding_mask is not None and bool(key_padding_mask.all()):
            key_padding_mask = None
        if self.decoder is None and self.rows is None:
            if key_padding_mask is None:
                self.decoder = self.lin.make_decoder(scale, q.device)
            else:
                self.rows = [self.lin.make_decoder(scale, q.device) for _ in range(q.shape[0])]
        if self.decoder is not None:
            if key_padding_mask is not None:
                raise ValueError("LincompCache: padding appeared after the prompt; pad the prompt batch (left "
                                 "padding) and keep attention_mask ones for generated tokens")
            return step_through(self.decoder, q, k, v, g)
        out = q.new_zeros(q.shape[:3] + v.shape[3:])       # padded tokens output 0 (they see no key)
        for b, dec in enumerate(self.rows):
            keep = slice(None) if key_padding_mask is None else key_padding_mask[b].nonzero()[:, 0]
            qb, kb, vb = q[b:b + 1, :, keep], k[b:b + 1, :, keep], v[b:b + 1, :, keep]
            if qb.shape[2]:
                out[b:b + 1, :, keep] = step_through(dec, qb, kb, vb, None if g is None else g[b:b + 1, :, keep])
        return out

    def get_mask_sizes(self, query_length: int) -> tuple:
        # The attention sees only the new tokens: their padding is the mask's last query_length columns.
        return query_length, self.seen

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen, self.decoder, self.rows = 0, None, None

    def state_bytes(self) -> int:
        seen: set = set()
        return sum(decoder_bytes(d, seen) for d in ([self.decoder] if self.rows is None else self.rows))

    def _no_past(self, what: str):
        raise NotImplementedError(f"LincompCache cannot {what}: it keeps a constant-size state, not past keys and "
                                  "values; use greedy search or sampling (num_beams=1, no assistant model)")

    def reorder_cache(self, beam_idx):
        self._no_past("reorder for beam search")

    def crop(self, max_length):
        self._no_past("crop")

    def batch_repeat_interleave(self, repeats: int):
        if self.seen:
            self._no_past("repeat a filled batch")

    def batch_select_indices(self, indices):
        if self.seen:
            self._no_past("select from a filled batch")


class LincompCache(Cache):
    """A ``transformers.Cache`` for a model whose every attention layer is linearised with a causal spec."""

    def __init__(self, model: nn.Module):
        layers = []
        for name, m in attention_modules(model):
            lin = active_module(getattr(m, "lincomp", None))
            if lin is None:
                raise ValueError(f"LincompCache needs every attention layer linearised; {name} is not (generate "
                                 "with a DynamicCache: model.generate(..., cache=transformers.DynamicCache())")
            if not lin.spec.causal:
                raise ValueError(f"LincompCache needs causal specs; {name} has {lin.spec.summary()}")
            layer_idx = getattr(m, "layer_idx", len(layers))
            if layer_idx != len(layers):
                raise ValueError(f"attention layer {name} has layer_idx {layer_idx}, expected {len(layers)}")
            layers.append(LincompLayer(lin))
        super().__init__(layers=layers)

    def state_bytes(self) -> int:
        """Bytes of every tensor the decoders hold (constant in the context length)."""
        return sum(layer.state_bytes() for layer in self.layers)


def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
    """``model.generate()`` hook (bound per model by ``install_generate``): a LincompCache unless the caller chose a
    cache, turned caching off, or runs the teacher (softmax attention needs past keys)."""
    students = all(m.mode == "student" for m in self.modules() if isinstance(m, LinearizedAttention))
    if (model_kwargs.get("cache") is None and generation_config.use_cache is not False
            and generation_config.cache_implementation is None and students):
        model_kwargs["cache"] = LincompCache(self)
        return None
    return type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)


def _serial_step(model, args, kwargs) -> None:
    """Forward pre-hook: a small step with a LincompCache (one token of a small model; see
    ``lincomp.models.generate.SERIAL_STEP_WORK``) runs on one thread, a big one (a prompt) on all of them."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))   # transformers 5 renamed past_key_values
    if not isinstance(cache, LincompCache):
        return
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
        tokens = None if ids is None else ids.shape[:-1].numel()
    else:
        tokens = ids.numel()
    if tokens is None:
        return
    now = torch.get_num_threads()
    base = model.__dict__.get("_lincomp_base_threads")
    if base is None:                     # a forward outside generate(): restored by _restore_threads
        base = model.__dict__["_lincomp_threads"] = now
    want = 1 if step_work(model, tokens) < SERIAL_STEP_WORK else base
    if want != now:
        torch.set_num_threads(want)


def _restore_threads(model, args, kwargs, output) -> None:
    n = model.__dict__.pop("_lincomp_threads", None)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)


def _generate(self, *args, **kwargs):
    """``model.generate()`` (bound per model by ``install_generate``): transformers' own, with the thread count
    restored when it returns. Within it the steps' thread count (see :func:`_serial_step`) also holds between
    steps, where generate appends the token to the ids and attention mask it keeps (O(context) copies per
    token: at 32K tokens, waking the other threads for them cost more than a small model's whole step)."""
    n = torch.get_num_threads()
    outer = self.__dict__.get("_lincomp_base_threads")
    self.__dict__["_lincomp_base_threads"] = n if outer is None else outer
    try:
        return type(self).generate(self, *args, **kwargs)
    finally:
        if outer is None:
            self.__dict__.pop("_lincomp_base_threads", None)
        torch.set_num_threads(n)


def install_generate(model: nn.Module) -> None:
    """Make ``model.generate()`` use a LincompCache (a bound method on this model only; survives deepcopy), and
    run its small steps on one thread (forward hooks and a ``generate`` wrapper; see :func:`_serial_step`)."""
    import types
    if not (callable(getattr(model, "can_generate", None)) and model.can_generate()):
        return
    if hasattr(type(model), "_prepare_cache_for_generation"):
        model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)
    if not getattr(model, "_lincomp_step_hooks", False):
        model.generate = types.MethodType(_generate, model)
        model.register_forward_pre_hook(_serial_step, with_kwargs=True)
        model.register_forward_hook(_restore_threads, with_kwargs=True, always_call=True)
        model._lincomp_step_hooks = True


__all__ = ["LincompCache", "LincompLayer", "install_generate", "active_module"]
