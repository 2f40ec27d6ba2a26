"""Constant-memory generation for linearised causal models: ``lincomp.models.generate``.

A simple greedy loop that needs no transformers ``Cache`` (``model.generate()`` with sampling, streamers and
padding goes through ``lincomp.models.cache.LincompCache``, which holds the same decoders). Every linearised
layer holds a decoder of its target (``TritonDecoder`` on CUDA, ``TVMDecoder`` on the CPU, ``ReferenceDecoder``
for target="reference"; one interface, ``step(q_t, k_t, v_t, g_t)``) carrying the linear state ``(S, z)`` plus
the window's last keys; the model runs with ``use_cache=False`` and explicit ``position_ids``, so RoPE and the attention function see the
true positions. The prompt is fed once (each layer's decoder ``prefill``s it: the forward kernel over the whole
prompt fills the decoder state; see ``lincomp.models.modules.step_through``); every new
token is one forward of length 1. The cache holds ``O(window + prefix)`` tokens per layer, whatever the context.
Steps of small models run on one thread (:func:`step_threads`): their ops are too small to repay waking others.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import List, Optional

import torch
from torch import nn

from lincomp.models.modules import LinearizedAttention

# A forward of fewer multiply-adds than this (parameters x new tokens: one token of a model up to ~16M
# parameters) runs its torch ops on the calling thread. Each op of such a step is tiny (a 512 x 1376
# matrix-vector product: ~0.1 ms), and waking the other threads for it costs microseconds on an idle machine but
# a scheduler time slice (milliseconds) on a busy one: one token of benchmarks/bench_decode.py's 4 x 512 Llama
# took ~150 ms with 2 threads and ~45 ms with 1 on a loaded 2-core VM. Prompts (many tokens) stay parallel.
SERIAL_STEP_WORK = 1 << 24


def step_work(model: nn.Module, tokens: int) -> int:
    """Multiply-adds of a forward over ``tokens`` new tokens (all rows), estimated as parameters x tokens."""
    params = model.__dict__.get("_lincomp_params")
    if params is None:
        params = model.__dict__["_lincomp_params"] = sum(p.numel() for p in model.parameters())
    return params * tokens


@contextlib.contextmanager
def step_threads(work: int):
    """Within the block torch (and the TVM kernels, which share its OpenMP threads) runs on one thread when
    ``work`` (multiply-adds) is below :data:`SERIAL_STEP_WORK`; the thread count is restored after."""
    n = torch.get_num_threads()
    if n == 1 or work >= SERIAL_STEP_WORK:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclasses.dataclass
class Generated:
    """``sequences [B, n + new]``; ``logits [B, n + new, V]`` (prompt and generated positions) when asked;
    ``cache_bytes[i]``: bytes held by all decoders after context length ``n + i`` (i = 0 after the prompt)."""

    sequences: torch.Tensor
    logits: Optional[torch.Tensor]
    cache_bytes: List[int]


def _layers(model: nn.Module) -> list:
    layers = [m for m in model.modules() if isinstance(m, LinearizedAttention)]
    if not layers:
        raise ValueError("generate needs a linearised model: call lincomp.linearize(model, spec) first")
    for lin in layers:
        if not lin.spec.causal:
            raise ValueError(f"generate needs causal specs; {lin.spec.summary()} is not causal")
        if lin.mode != "student":
            raise ValueError("generate runs lincomp attention: set_attention_mode(model, 'student') first")
    return layers


@contextlib.contextmanager
def decoding(model: nn.Module):
    """Within the block, every linearised layer of ``model`` runs through a fresh per-layer decoder.

    Yields the list of LinearizedAttention modules (their ``_decoder`` holds the state once a forward ran).
    """
    layers = _layers(model)
    for lin in layers:
        lin._decoder = "pending"
    try:
        yield layers
    finally:
        for lin in layers:
            lin._decoder = None


def _tensor_bytes(obj, seen) -> int:
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.data_ptr(), tuple(obj.shape))
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(x, seen) for x in obj.values())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):   # e.g. TritonDecoder's DecodeState
        return sum(_tensor_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    return 0


def cache_bytes(layers) -> int:
    """Bytes of every tensor the decoders hold (state, cached keys / values; not the shared weights)."""
    seen: set = set()
    return sum(decoder_bytes(lin._decoder, seen) for lin in layers)


def decoder_bytes(dec, seen: Optional[set] = None) -> int:
    """Bytes of the tensors one decoder holds (0 for none); ``seen`` skips tensors already counted."""
    if dec is None or isinstance(dec, str):
        return 0
    if hasattr(dec, "state_bytes"):
        return int(dec.state_bytes())
    seen = set() if seen is None else seen
    return sum(_tensor_bytes(value, seen) for name, value in vars(dec).items()
               if name not in ("weights", "_given", "spec", "plan", "_initial_state"))


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id: Optional[int] = None,
             output_logits: bool = False) -> Generated:
    """Greedy generation with constant memory per layer (see the module docstring).

    ``input_ids [B, n]`` (no padding); returns :class:`Generated`. The model must be a linearised causal
    transformers LM (``model(input_ids, position_ids=..., use_cache=False).logits``).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be a [B, n] tensor with n >= 1, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    B, n = input_ids.shape
    seq = input_ids
    all_logits, sizes = [], []
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    with decoding(model) as layers:
        step_ids, start = input_ids, 0
        for i in range(max_new_tokens + 1):
            pos = torch.arange(start, start + step_ids.shape[1], device=input_ids.device)[None].expand(B, -1)
            with step_threads(step_work(model, step_ids.numel())):
                logits = model(step_ids, position_ids=pos, use_cache=False).logits
            if output_logits:
                all_logits.append(logits)
            sizes.append(cache_bytes(layers))
            if i == max_new_tokens:
                break
            nxt = logits[:, -1].argmax(-1)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            start += step_ids.shape[1]
            step_ids = nxt[:, None]
            if eos_token_id is not None and bool(done.all()):
                break
    logits = torch.cat(all_logits, dim=1) if output_logits else None
    return Generated(seq, logits, sizes)


__all__ = ["generate", "decoding", "cache_bytes", "Generated", "step_threads", "step_work"]
