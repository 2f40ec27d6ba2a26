"""``TVMKernel``: a spec's generated TVM kernels behind the :class:`~lincomp.runtime.kernel.Kernel` interface.

A call runs up to three compiled parts (each its own module, cached in memory and on disk):

- ``features``: hedgehog feature maps (and, for ``combine="shared"``, phi(q), phi(k) for the window);
- ``linear``:   the chunked scan (linear.py) -> the branch output, or its num / den for "shared" (a 1D window's
                inference may instead run the lagged scans of shared_lag.py: the keys outside the window alone);
- ``window``:   block-sparse softmax over the plan (window.py), with the hybrid combine fused in.

Sizes ``B`` and ``L`` are symbolic in every PrimFunc: a new length re-plans the window (a few
vectorised numpy ops, cached) but never recompiles. Configs come from the one chooser
(``lincomp.tuning.choose``), in order: ``config=`` given to ``lincomp.compile``, the tuning database
(exact bucket of this CPU, then the nearest length bucket), the defaults below; after a call,
``kernel.config["window_fwd" | "linear_fwd"]`` says which ({"source", "params", "key"}).
``kernel.tune(q, k, v, ...)`` measures the config space and stores the best.

Training: generated backward kernels cover softmax-only specs (every window kind, pooled keys included:
window_bwd.py, driven by window_train.py; ``kernel.config["window_bwd"]``) and the linear branch alone
(linear_bwd.py, driven by linear_train.py; ``kernel.config["linear_bwd"]``, ``{"chunk", "mr"}``);
combine="sum" hybrids (Lizard) compose the two (hybrid_train.py: each branch's saving forward and backward,
plus d alpha); combine="shared" (LoLCATs) saves from the fused forward and adds the in-window linear terms'
backward (shared_train.py, shared_bwd.py); pooled keys add the pooled pair and the pooling's vjp (window_train.py).
The custom op's autograd (``forward_and_save`` / ``backward_saved``) and direct calls on inputs that require grad
use them. Key-padded calls differentiate the reference, with a warning. ``kernel.tune`` tunes the backward too
(``kernel.tune_backward`` for the linear branch alone).

Inputs are fp32 kernels' food: fp16 / bf16 are widened to fp32 (and the output narrowed back),
fp64 runs on the reference (a fp32 kernel would silently lose precision). A ``key_padding_mask`` runs on
the window kernel (its own compiled variant: padded keys score -inf, a row with none left outputs 0) and
zeroes the padded keys' features for the linear branch (elu1, whose phi(0) is not 0, runs on the reference).
Non-contiguous or misaligned (not 64-byte) tensors are copied, with a one-time warning naming the tensor.
A call's intermediates (feature maps, the linear branch's output or num / den) are kept between calls
(:class:`~lincomp.runtime.buffers.Scratch`): fresh multi-MB buffers would page-fault in on every call.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, replace
from typing import Dict, Optional

import torch

from lincomp.inputs import Call, bind, check_log_gate, check_window_gamma
from lincomp.ir.blocks import aligned_block, block_plan, window_tile
from lincomp.ir.lowered import require
from lincomp.lower.tvmir import build as _build
from lincomp.lower.tvmir import features as _features
from lincomp.lower.tvmir import hybrid_train as _hybrid_train
from lincomp.lower.tvmir import linear as _linear
from lincomp.lower.tvmir import linear_bwd as _linear_bwd
from lincomp.lower.tvmir import linear_train as _linear_train
from lincomp.lower.tvmir import shared_lag as _lag
from lincomp.lower.tvmir import window as _window
from lincomp.lower.tvmir import window_bwd as _window_bwd
from lincomp.lower.tvmir.codegen import base2
from lincomp.runtime.buffers import Scratch, alloc_output
from lincomp.runtime.kernel import Kernel, Unsupported, wants
from lincomp.runtime.pool import window_only
from lincomp.spec import AttentionSpec, GridWindow
from lincomp.tuning import TuningDB, median_time_ms, shape_bucket
from lincomp.tuning import tune as run_tune
from lincomp.tuning.choose import Choice, choose

PARTS = ("window", "linear", "linear_bwd")
BACKEND = "tvm"
KERNEL_NAMES = {"window": "window_fwd", "linear": "linear_fwd", "linear_bwd": "linear_bwd"}


class TVMCopyWarning(UserWarning):
    """An input had to be copied (non-contiguous, misaligned or another dtype) before the kernel ran."""


@dataclass(frozen=True)
class Sizes:
    """The static sizes a compiled module is specialised to (B and L stay symbolic)."""

    H: int
    Hkv: int
    D: int
    Dv: int
    F: Optional[int]
    E: Optional[int]
    HF: Optional[int]          # heads of phi(k): H with per-head weights, else Hkv

    @classmethod
    def of(cls, call: Call) -> "Sizes":
        lin = call.spec.linear
        E = call.feature_weight_q.shape[-1] if (lin is not None and lin.has_weights) else None
        HF = None if lin is None else (call.H if lin.has_weights else call.Hkv)
        return cls(call.H, call.Hkv, call.D, call.Dv, call.F, E, HF)

    def bucket(self, L: int, part: str) -> dict:
        dims = {"L": L, "H": self.H, "D": self.D}
        if self.Hkv != self.H:
            dims["Hkv"] = self.Hkv
        if self.Dv != self.D:
            dims["Dv"] = self.Dv
        if part == "linear" and self.F != self.D:
            dims["F"] = self.F
        return dims


# ---------------------------------------------------------------------------------- config space
def default_config(part: str, spec: AttentionSpec, sizes: Sizes, L: int) -> dict:
    """The untuned choice (measured on a 2-core AVX-512 CPU; see benchmarks/results/cpu_kernels.md)."""
    if part == "window":
        if isinstance(spec.window, GridWindow):
            bm = 16 if len(spec.window.grid) == 2 else 32
            bm = aligned_block(spec.window, 16, bm) or bm   # sliding tiles: blocks inside a tile
            cfg = _window.WindowConfig(block_m=bm, block_n=bm, tile=window_tile(spec.window, bm), mr_qk=0,
                                       mr_pv=0)
        else:
            # 64-query tiles need the 32 registers of AVX-512; with 16 (AVX2) 32-query tiles measured 1.1-1.5x
            # faster (hybrids at D = 32 / 64 / 128, L = 4096, on Zen 3)
            wide = 64 if _build.vector_registers() >= 32 else 32
            bm = wide if L >= 1024 else 32 if L > 32 else 16
            cfg = _window.WindowConfig(block_m=bm, block_n=bm, mr_qk=0, mr_pv=0)
        return _fit_window(cfg, sizes).to_dict()
    # Small chunks win while phi is narrow (the state terms dominate); wide hedgehog features amortise
    # their per-chunk work better over longer chunks.
    chunk = 16 if (sizes.F or sizes.D) <= 64 else 64
    return _linear.LinearConfig(chunk=chunk, sub_chunk=8, mr=4).to_dict()


def _fit_window(cfg: "_window.WindowConfig", sizes: Sizes) -> "_window.WindowConfig":
    """Micro-kernel rows: as asked (0 = as many as fit), capped so the accumulators fit the registers."""
    return replace(cfg, mr_qk=_fit_rows(cfg.mr_qk, cfg.block_m),
                   mr_pv=_fit_rows(cfg.mr_pv, min(sizes.Dv, _window.PV_COLS)))


def _fit_rows(asked: int, width: int) -> int:
    lanes, regs = _build.vector_lanes(), _build.vector_registers()
    most = max(1, (regs - 6) // max(1, -(-width // lanes)))   # leave a few registers for operands
    return max(1, min(asked or 8, most, 16))


def config_space(part: str, spec: AttentionSpec, sizes: Sizes, L: int) -> list:
    """The hand-written schedule space searched by measurement (a few dozen configs at most)."""
    out = []
    if part == "window":
        if isinstance(spec.window, GridWindow):
            grid = spec.window.grid
            for bm in (16, 32, 64):
                tiles = {window_tile(spec.window, bm)}
                if len(grid) == 2:
                    tiles |= {t for t in ((2, 8), (4, 4), (8, 2), (4, 8), (8, 4), (8, 8), (4, 16))
                              if math.prod(t) == bm}
                for tile in sorted(tiles):
                    for group in ((1, 4) if bm == 16 else (1,)):
                        out.append(_window.WindowConfig(bm, bm, tile, 0, 0, group))
                out.append(_window.WindowConfig(bm, bm, window_tile(spec.window, bm), 4, 4, 1))
        else:
            for bm in (16, 32, 64):
                for bn in (16, 32, 64, 128):
                    out.append(_window.WindowConfig(bm, bn, None, 0, 0, 1))
                    if bn <= 32:
                        out.append(_window.WindowConfig(bm, bn, None, 0, 0, 64 // bn))
            out.append(_window.WindowConfig(64, 64, None, 4, 4, 1))
        return [c.to_dict() for c in {_fit_window(c, sizes): None for c in out}]
    for chunk in (16, 32, 64):
        subs = (8, 16) if spec.linear.gate == "vector" else (16,)
        for sub in subs:
            for mr in (4, 8):
                if sub <= chunk:
                    out.append(_linear.LinearConfig(chunk, sub, mr).to_dict())
    return out


# ------------------------------------------------------------------------------------------ kernel
class TVMKernel(Kernel):
    """Generated TVM (LLVM CPU) kernels for one spec; see the module docstring."""

    target = "tvm"

    def __init__(self, spec, *, config: Optional[dict] = None, db=None, **hints):
        super().__init__(spec, source="", config=None)
        if self.spec.linear is not None and self.spec.window is not None:   # the window kernel combines
            require(self.lowered, "fused", "the TVM window kernel (hybrid epilogue)")
        self.hints = hints
        self._fixed = {p: dict(c) for p, c in (config or {}).items()}
        unknown = set(self._fixed) - set(PARTS) - {"window_bwd"}
        if unknown:
            raise ValueError(f"config keys must be among {list(PARTS) + ['window_bwd']} (one dict per kernel part), "
                             f"got {sorted(unknown)}")
        if "window_bwd" in self._fixed:   # checked now: it is first used by a backward, long after compile
            _window_bwd.WindowBwdConfig.from_dict(self._fixed["window_bwd"])
        self._db = db
        self._lock = threading.Lock()
        self._configs: Dict[tuple, Choice] = {}
        self._plans: "OrderedDict[tuple, tuple]" = OrderedDict()
        self._built: Dict[str, "_build.Built"] = {}
        self._mods: Dict[tuple, dict] = {}
        self._warned = set()
        self.copies = Counter()   # (tensor name, reason) -> how many times it was copied

    # -- public ---------------------------------------------------------------------------------
    @property
    def source(self) -> str:
        if self._built:
            return "\n\n".join(b.source for b in self._built.values())
        return self.preview_source()

    @source.setter
    def source(self, value):  # the base class assigns it; the real source is generated per call
        pass

    def _preview_sizes(self, H: int, D: int, Hkv: Optional[int] = None) -> Sizes:
        lin = self.spec.linear
        Hkv = H if Hkv is None else Hkv
        if H % Hkv:
            raise ValueError(f"kv heads ({Hkv}) must divide the query heads ({H})")
        E = (lin.feature_dim or D) if (lin is not None and lin.has_weights) else None
        F = None if lin is None else (2 * E if E else D)
        return Sizes(H, Hkv, D, D, F, E, None if lin is None else (H if E else Hkv))

    def preview_configs(self, H: int = 1, D: int = 64, L: int = 4096, Hkv: Optional[int] = None) -> dict:
        """{kernel name: kernel.config entry} a call with H query heads (Hkv key/value heads, default H) of
        dim D at length L would use on this CPU (the same chooser as a call; nothing is compiled or timed)."""
        choices = self._choices_for(self._preview_sizes(H, D, Hkv), L)
        return {KERNEL_NAMES[part]: c.as_dict() for part, c in choices.items()}

    def preview_source(self, H: int = 1, D: int = 64, L: int = 4096) -> str:
        """The generated TVMScript for H heads of dim D (regenerated per call's sizes)."""
        sizes = self._preview_sizes(H, D)
        texts = [f"# preview for H={H}, D={D} (each call compiles for its own sizes)"]
        configs = self._configs_for(sizes, L)
        for part, funcs in self._part_sources(sizes, configs, False, False,
                                              lagged=self._lag_pays(sizes, configs, L)).items():
            texts.append(_build.full_source(funcs))
        return "\n\n".join(texts)

    def forward(self, q, k, v, *, scale=None, linear_scale=None, return_state=False, **tensors):
        if self._check_grad(q, k, v, tensors):
            if self._branch() == "window":
                from lincomp.lower.tvmir.window_train import train_call
                return train_call(self, q, k, v, scale=scale, return_state=return_state, **tensors)
            if return_state:
                raise Unsupported("return_state=True with inputs that require grad (the TVM backward kernels take "
                                  "no gradient of the final state); running the differentiable reference")
            if tensors.get("key_padding_mask") is not None:
                raise Unsupported("key_padding_mask with inputs that require grad: the linear backward kernel has "
                                  "no padded variant; running the differentiable reference")
            return _linear_train.differentiable_call(self, q, k, v, scale, linear_scale, tensors)
        call = self._bind_checked(q, k, v, scale=scale, linear_scale=linear_scale, return_state=return_state,
                                  **tensors)
        out_dtype = q.dtype
        sizes = Sizes.of(call)   # shapes only: the same before and after _prepare
        choices = self._choices_for(sizes, call.L)
        if self.hints.get("autotune") and any(c.source == "default" for c in choices.values()):
            # on-first-use tuning (hint autotune=True): only where the database had nothing for this bucket
            self.tune(q, k, v, progress=False, **tensors)
            choices = self._choices_for(sizes, call.L)
        configs = {p: c.params for p, c in choices.items()}
        # bf16 q, k, v stay bf16 where the bf16 window kernel runs them, else are widened (bf16_unsupported: why)
        bf16 = (out_dtype == k.dtype == v.dtype == torch.bfloat16) and self.bf16_unsupported(sizes, configs) is None
        self._prepare(call, keep_bf16=bf16)
        o, state = self._run(call, sizes, configs)
        self.config = {**self.config, **{KERNEL_NAMES[p]: c.as_dict() for p, c in choices.items()}}
        if out_dtype != torch.float32:
            o = o.to(out_dtype)        # the state stays float32, as the reference returns it
        return (o, state) if return_state else o

    # -- training (window_train.py / linear_train.py: the forward saves what the backward needs) -----
    def _branch(self) -> str:
        """Which backward family covers this spec: "window", "linear", "hybrid" (combine="sum": both composed,
        hybrid_train.py) or "shared" (shared_train.py)."""
        if self.spec.linear is None:
            return "window"
        if not self.spec.has_softmax:
            return "linear"
        return "hybrid" if self.spec.combine == "sum" else "shared"

    def backward_unsupported(self) -> Optional[str]:
        branch = self._branch()
        if branch == "window":
            return _window_bwd.unsupported_reason(self.spec)
        return None

    def forward_and_save(self, q, k, v, **kwargs):
        branch = self._branch()
        if branch == "window":
            from lincomp.lower.tvmir.window_train import forward_and_save
            return forward_and_save(self, q, k, v, **kwargs)
        if branch == "hybrid":
            return _hybrid_train.forward_and_save(self, q, k, v, **kwargs)
        if branch in ("linear", "shared") and kwargs.get("key_padding_mask") is None:
            return self._linear_forward_and_save(q, k, v, **kwargs)
        with torch.no_grad():   # the op calls this for inference too: the forward stays on the kernels
            return self.forward(q, k, v, **kwargs), None

    def saved_like(self, q, k, v, **kwargs) -> list:
        branch = self._branch()
        if branch == "window":
            from lincomp.lower.tvmir.window_train import saved_like
            return saved_like(self, q, k, v, **kwargs)
        if branch in ("linear", "shared"):
            return self._linear_saved_like(q, k, v, **kwargs)
        if branch == "hybrid":
            return _hybrid_train.saved_like(self, q, k, v, **kwargs)
        return []

    def backward_saved(self, grad_o, o, saved, q, k, v, needs=None, **kwargs) -> dict:
        if self._branch() == "window":
            from lincomp.lower.tvmir.window_train import backward_saved
            return backward_saved(self, grad_o, o, saved, q, k, v, needs=needs, **kwargs)
        if self._branch() == "hybrid":
            return _hybrid_train.backward_saved(self, grad_o, o, saved, q, k, v, needs=needs, **kwargs)
        if self._branch() == "shared":
            from lincomp.lower.tvmir.shared_train import backward_saved
            return backward_saved(self, grad_o, o, saved, q, k, v, needs=needs, **kwargs)
        return self._linear_backward_saved(grad_o, o, saved, q, k, v, needs=needs, **kwargs)

    @staticmethod
    def sizes_of(call: Call) -> Sizes:
        """The static sizes this call's modules are specialised to."""
        return Sizes.of(call)

    def _bind_checked(self, q, k, v, **kwargs) -> Call:
        """``bind`` plus what the TVM kernels cannot run (Unsupported: the caller falls back)."""
        call = bind(self.spec, q, k, v, check_values=False, **kwargs)
        check_values(call)
        if q.device.type != "cpu":
            raise Unsupported(f"the tensors are on {q.device}; the TVM backend runs on the CPU "
                              "(use target='auto' to pick Triton for CUDA tensors)")
        lin = self.spec.linear
        if call.key_padding_mask is not None and lin is not None and lin.feature_map == "elu1":
            raise Unsupported("key_padding_mask with the elu1 feature map: the TVM linear kernel applies phi while "
                              "loading k, and phi(0) = 1 is not 0, so a padded key cannot be removed there")
        if q.dtype == torch.float64:
            raise Unsupported("float64 inputs: the TVM kernels compute in float32, which would silently "
                              "drop precision; cast to float32 to use them")
        return call

    # -- inputs ---------------------------------------------------------------------------------
    def _check_grad(self, q, k, v, tensors) -> bool:
        """True when autograd must see this call (grad mode on and an input requires grad)."""
        if not torch.is_grad_enabled():
            return False
        ts = [q, k, v] + [t for x in tensors.values() for t in (x if isinstance(x, (tuple, list)) else (x,))]
        return any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)

    def _prepare(self, call: Call, keep_bf16: bool = False) -> None:
        """Make every tensor fp32, contiguous and 64-byte aligned (copying, with a reason, if needed);
        ``keep_bf16``: q, k, v stay bf16 (contiguous, aligned) for the bf16 window kernel."""
        for name in ("q", "k", "v", "g", "feature_weight_q", "feature_weight_k", "sink_logits",
                     "window_gamma", "alpha", "S0", "z0"):
            t = getattr(call, name)
            if t is not None:
                bf16 = keep_bf16 and name in ("q", "k", "v")
                setattr(call, name, self._fit(name, t, torch.bfloat16 if bf16 else torch.float32))

    def bf16_unsupported(self, sizes: Sizes, configs: dict) -> Optional[str]:
        """Why bf16 inputs of this call are widened to fp32 (None: the bf16 window kernel runs them)."""
        if not _build.bf16_dot():
            return f"this CPU ({_build.host_cpu()}) has no AVX-512 BF16 dot product"
        if not self.spec.has_softmax or self.spec.linear is not None:
            return "only the softmax-only window kernel has a bf16 variant"
        dims = _window.WindowDims(sizes.H, sizes.Hkv, sizes.D, sizes.Dv)
        return _window.bf16_unsupported(self.spec, dims, _window.WindowConfig.from_dict(configs["window"]))

    def _fit(self, name: str, t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        reasons = []
        if t.dtype != dtype:
            reasons.append(f"dtype {t.dtype} -> {dtype}".replace("torch.", ""))
        if not t.is_contiguous():
            reasons.append(f"non-contiguous (strides {list(t.stride())})")
        elif t.data_ptr() % 64:
            reasons.append(f"misaligned (address % 64 = {t.data_ptr() % 64})")
        if not reasons:
            return t
        why = ", ".join(reasons)
        self.copies[(name, why)] += 1
        if (name, why) not in self._warned and not why.startswith("dtype"):
            self._warned.add((name, why))
            warnings.warn(f"lincomp tvm: copying {name} before the kernel: {why}; pass contiguous tensors "
                          "to avoid the copy", TVMCopyWarning, stacklevel=5)
        out = torch.empty(t.shape, dtype=dtype)   # fresh allocations are 64-byte aligned
        out.copy_(t)
        return out

    # -- configs and modules ----------------------------------------------------------------------
    def _parts(self) -> tuple:
        spec = self.spec
        parts = []
        if spec.linear is not None:
            parts.append("linear")
        if spec.has_softmax:
            parts.append("window")
        return tuple(parts)

    def _choices_for(self, sizes: Sizes, L: int) -> dict:
        """{part: Choice} for this length bucket: fixed > tuning db (exact, nearest bucket) > default."""
        out = {}
        for part in self._parts():
            key = (part, sizes, _bucket(sizes, L, part))
            if key not in self._configs:
                # a pooled spec keys its schedule by its window (the pooled steps are fixed)
                self._configs[key] = choose(
                    BACKEND, KERNEL_NAMES[part], window_only(self.spec), "float32", sizes.bucket(L, part),
                    device="cpu",
                    default=lambda part=part: default_config(part, self.spec, sizes, L), fixed=self._fixed.get(part),
                    normalize=lambda cfg, part=part: self._normalise(part, cfg, sizes), db=self._db)
            out[part] = self._configs[key]
        return out

    def _configs_for(self, sizes: Sizes, L: int) -> dict:
        """Launch params per part for this length bucket (see ``_choices_for``)."""
        return {part: c.params for part, c in self._choices_for(sizes, L).items()}

    def _normalise(self, part: str, cfg: dict, sizes: Sizes) -> dict:
        if part == "window":
            c = _window.WindowConfig.from_dict({**{"mr_qk": 0, "mr_pv": 0}, **cfg})
            if isinstance(self.spec.window, GridWindow):
                c = replace(c, block_n=c.block_m, tile=c.tile or window_tile(self.spec.window, c.block_m))
            else:
                c = replace(c, tile=None)
            return _fit_window(c, sizes).to_dict()
        return _linear.LinearConfig.from_dict(cfg).to_dict()

    def _part_sources(self, sizes: Sizes, configs: dict, initial_state: bool, return_state: bool,
                      key_bias: bool = False, save: bool = False, lagged: bool = False, bf16: bool = False) -> dict:
        """{part: [PrimFunc texts]} for this call's variant (``key_bias``: the window takes a key-padding bias;
        ``save``: the training forward, which keeps the chunk states and, with the normaliser, the denominators;
        ``lagged``: combine="shared"'s out-of-window terms by lagged scans, shared_lag.py)."""
        spec, lin = self.spec, self.spec.linear
        out = {}
        if lin is not None:
            funcs = []
            if (not _linear.inline_features(spec)) or spec.combine == "shared":
                E = sizes.E if sizes.E is not None else sizes.D
                fit = dict(mr=_fit_rows(4, E), lanes=_build.vector_lanes())   # the projection's accumulators fit
                funcs.append(_features.feature_source(lin.feature_map, _features.FeatureDims(sizes.H, sizes.H, sizes.D, E),
                                                      name="features_q", **fit))
                funcs.append(_features.feature_source(lin.feature_map, _features.FeatureDims(sizes.Hkv, sizes.HF, sizes.D, E),
                                                      name="features_k", **fit))
            mode = "numden" if spec.combine == "shared" or (save and lin.normalize) else "o"
            cfg = _linear.LinearConfig.from_dict(configs["linear"])
            if lagged:   # the causal scan each side of the window runs (shared_lag.py)
                dims = _linear.LinearDims(sizes.H, sizes.Hkv, sizes.D, sizes.Dv, sizes.F,
                                          _lag.scan_key_heads(spec, sizes.H, sizes.HF))
                cfg = replace(cfg, chunk=_lag.scan_chunk(cfg.chunk))
                for name, side in _lag.sides(spec).items():
                    funcs.append(_linear.linear_source(_lag.scan_spec(spec), dims, cfg, mode="numden",
                                                       initial_state=initial_state and name == "linear_fwd",
                                                       precomputed=True, lanes=_build.vector_lanes(), name=name,
                                                       **side))
            else:
                funcs.append(_linear.linear_source(
                    spec, _linear.LinearDims(sizes.H, sizes.Hkv, sizes.D, sizes.Dv, sizes.F, sizes.HF), cfg,
                    mode=mode, initial_state=initial_state, return_state=return_state,
                    save_states=save and spec.causal, lanes=_build.vector_lanes()))
            out["linear"] = funcs
        if spec.has_softmax:
            dims = _window.WindowDims(sizes.H, sizes.Hkv, sizes.D, sizes.Dv, sizes.F, sizes.HF)
            out["window"] = [_window.window_source(spec, dims, _window.WindowConfig.from_dict(configs["window"]),
                                                   key_bias=key_bias, save_lse=save, lagged=lagged, bf16=bf16)]
        return out

    def _can_lag(self, call: Call, save: bool) -> bool:
        """combine="shared" inference on a 1D window may form its out-of-window terms by lagged scans
        (shared_lag.py); training keeps the full scan, whose chunk states its backward reads."""
        return _lag.applies(self.spec) and not save and not call.return_state

    def _lag_pays(self, sizes: Sizes, configs: dict, L: int) -> bool:
        return _lag.applies(self.spec) and _lag.cheaper(self.spec, sizes.F, sizes.Dv,
                                                        _lag.scan_chunk(configs["linear"]["chunk"]), L)

    def _modules(self, sizes: Sizes, configs: dict, initial_state: bool, return_state: bool,
                 key_bias: bool = False, save: bool = False, lagged: bool = False, bf16: bool = False) -> dict:
        """The compiled parts of this variant (generated, compiled or loaded once; then a dict lookup)."""
        key = (sizes, tuple(sorted((p, _frozen(c)) for p, c in configs.items())), initial_state, return_state,
               key_bias, save, lagged, bf16)
        built = self._mods.get(key)
        if built is None:
            built = {}
            for part, funcs in self._part_sources(sizes, configs, initial_state, return_state, key_bias,
                                                  save, lagged, bf16).items():
                built[part] = _build.build(funcs, f"{part}-{self.spec.summary() or 'spec'}{'-bf16' if bf16 else ''}")
            self._mods[key] = built
        self._built = built
        return built

    def _plan(self, L: int, cfg: dict) -> tuple:
        """The window plan's arrays as int32 tensors (cached per length and tile shape)."""
        tile = tuple(cfg["tile"]) if cfg.get("tile") else None
        key = (L, cfg["block_m"], cfg["block_n"], tile)
        with self._lock:
            hit = self._plans.get(key)
            if hit is not None:
                self._plans.move_to_end(key)
                return hit
        p = block_plan(self.spec, L, cfg["block_m"], cfg["block_n"], tile)
        arrays = [p.kv_offsets.to(torch.int32).contiguous(), p.kv_indices.to(torch.int32).contiguous(),
                  p.kv_full.to(torch.int32).contiguous()]
        if _window.tiled(self.spec):
            arrays.append(p.q_tokens.to(torch.int32).contiguous())
        arrays = tuple(arrays)
        with self._lock:
            self._plans[key] = arrays
            while len(self._plans) > 16:
                self._plans.popitem(last=False)
        return arrays

    # -- the call -------------------------------------------------------------------------------
    def _run(self, call: Call, sizes: Sizes, configs: dict, saved: Optional[list] = None):
        """(o, state); ``saved`` (a list, linear-only and combine="shared" specs): filled with what the backward
        needs (shared: the chunk states, the shared denominators and lse2, written by the window kernel)."""
        with _SCRATCH.lease() as scratch:
            return self._run_in(scratch, call, sizes, configs, saved)

    def _run_in(self, scratch, call: Call, sizes: Sizes, configs: dict, saved: Optional[list],
                lagged: Optional[bool] = None):
        """``_run`` with ``scratch(name, shape)``: the call's intermediates (kept between calls); whatever goes
        into ``saved`` is freshly allocated (a later call reuses the scratch buffers before the backward).
        ``lagged`` (combine="shared"): None chooses by cost (shared_lag.cheaper) where the lagged form applies."""
        spec, lin = self.spec, self.spec.linear
        B, H, L, Dv = call.B, call.H, call.L, call.Dv
        kpm = call.key_padding_mask
        save = saved is not None
        if lagged is None:
            lagged = self._can_lag(call, save) and self._lag_pays(sizes, configs, L)
        bf16 = call.q.dtype == torch.bfloat16   # forward() kept bf16 inputs for the bf16 window kernel
        mods = self._modules(sizes, configs, call.S0 is not None, call.return_state, kpm is not None, save, lagged,
                             bf16)
        # the bf16 window kernel writes bf16 bits (two per int32 word)
        o = alloc_output((B, H, L, Dv), torch.bfloat16) if bf16 else _empty((B, H, L, Dv))
        state = None
        lin_args = None
        if lin is not None:
            m = mods["linear"]
            fq = fk = None
            if (not _linear.inline_features(spec)) or spec.combine == "shared":
                keep = save and lin.has_weights   # the backward reads them (linear_train.saved_shapes)
                fq = _empty((B, H, L, sizes.F)) if keep else scratch("fq", (B, H, L, sizes.F))
                fk = _empty((B, sizes.HF, L, sizes.F)) if keep else scratch("fk", (B, sizes.HF, L, sizes.F))
                wq = [call.feature_weight_q] if lin.has_weights else []
                wk = [call.feature_weight_k] if lin.has_weights else []
                m.fn("features_q")(call.q, *wq, fq)
                m.fn("features_k")(call.k, *wk, fk)
                if kpm is not None:   # a padded key contributes to no sum (the reference's phi(k) * mask)
                    fk.mul_(kpm[:, None, :, None])
            if lagged:
                num, den, gcheck = _lag.out_of_window({name: m.fn(name) for name in _lag.sides(spec)}, spec, call,
                                                      fq, fk, scratch)
                if gcheck is not None:
                    check_gate(max(gcheck.tolist()))
                lin_args = [num, den, call.window_gamma]
            else:
                lin_args, state = self._full_scan(m.fn("linear_fwd"), scratch, call, sizes, o, saved, fq, fk,
                                                  configs["linear"]["chunk"])
        if spec.has_softmax:
            args = self._window_inputs(call, configs["window"]) + (lin_args or [])
            if kpm is not None:   # padded keys score -inf (as the reference masks them)
                args.append(torch.zeros(B, L, dtype=torch.float32).masked_fill_(~kpm.cpu(), -math.inf))
            mods["window"].fn("window_fwd")(*args, o.view(torch.int32) if bf16 else o, *(saved[2:3] if save else []),
                                            call.scale)
            if spec.combine == "shared" and not lagged:
                den, cond = lin_args[1], lin_args[-1]
                if self._can_lag(call, save) and not shared_precision_ok(cond):
                    # the full scan minus the in-window terms cancelled here: the lagged form has no difference
                    return self._run_in(scratch, call, sizes, configs, saved, lagged=True)
                check_shared_precision(cond)
                if save:   # the kernel overwrote the scan's den with the shared one
                    saved[1] = den
        return o, state

    def _full_scan(self, scan, scratch, call: Call, sizes: Sizes, o: torch.Tensor, saved: Optional[list],
                   fq: Optional[torch.Tensor], fk: Optional[torch.Tensor], chunk: int) -> tuple:
        """The linear branch over the whole sequence (``linear_fwd``): (the window kernel's linear arguments or
        None, the final state or None). Linear-only specs write ``o`` (and, training, fill ``saved``);
        combine="shared" passes [num, den, window_gamma, fq, fk, (G,) cond] for the window kernel to subtract
        the in-window terms (cond: its cancellation check); combine="sum" passes [lin_o, alpha]."""
        spec, lin = self.spec, self.spec.linear
        B, H, L, Dv = call.B, call.H, call.L, call.Dv
        kpm, save = call.key_padding_mask, saved is not None
        k_in = call.k
        if kpm is not None and _linear.inline_features(spec):   # identity / relu: phi(0) = 0
            k_in = torch.where(kpm[:, None, :, None], call.k, torch.zeros((), dtype=call.k.dtype))
        args = [call.q, k_in] if _linear.inline_features(spec) else [fq, fk]
        args.append(call.v)
        gcheck = None
        if lin.gate is not None:
            gcheck = torch.empty(B * H, dtype=torch.float32)
            args += [call.g, gcheck]
        if call.S0 is not None:
            args += [call.S0, call.z0]
        if spec.combine == "shared" or (save and lin.normalize):
            num = scratch("num", (B, H, L, Dv))
            den = _empty((B, H, L)) if save else scratch("den", (B, H, L))   # saved: the backward keeps it
            args += [num, den]
        else:
            lin_o = o if spec.combine is None else scratch("lin_o", (B, H, L, Dv))
            args.append(lin_o)
        state = None
        if call.return_state:
            state = (_empty((B, H, sizes.F, Dv)), _empty((B, H, sizes.F)))
            args += list(state)
        if save:
            saved += [_empty(s) for s in _linear_train.saved_shapes(spec, B, H, L, sizes.F, Dv)]
            if lin.has_weights:   # phi(q), phi(k): _run_in formed them in fresh buffers
                saved[-2:] = [fq, fk]
            if spec.causal:
                args.append(_linear_train.chunk_states(saved[0], L, chunk))
        scan(*args, call.linear_scale)
        if save and lin.normalize and spec.combine is None:   # o = num / den (0 where den = 0), den kept
            saved[1] = den
            torch.div(num, torch.where(den == 0, torch.ones_like(den), den)[..., None], out=o)
            o.masked_fill_((den == 0)[..., None], 0.0)
        if gcheck is not None:
            check_gate(max(gcheck.tolist()))
        if spec.combine == "shared":
            lin_args = [num, den, call.window_gamma, fq, fk]
            if lin.gate is not None:
                lin_args.append(call.g.double().cumsum(2).contiguous())
            lin_args.append(scratch("cond", (B, H, L)).zero_())
            return lin_args, state
        if spec.combine == "sum":
            return [lin_o, call.alpha], state
        return None, state

    def _window_inputs(self, call: Call, cfg: dict) -> list:
        """The window kernel's leading arguments: q, k, v, the plan, sinks and pooled keys."""
        args = [*_storage(call.q, call.k, call.v), *self._plan(call.L, cfg)]
        if self.spec.sinks:
            args.append(base2(call.sink_logits))
        if self.spec.pool is not None:
            args += _pooled_args(call, cfg)
        return args

    # -- training: the linear branch (linear_train.py, linear_bwd.py) ------------------------------
    def _linear_forward_and_save(self, q, k, v, *, scale=None, linear_scale=None, **tensors):
        """(o, [Sc, den]): the linear branch's output, the state entering each chunk and the denominators."""
        call, sizes = self._train_call(q, k, v, scale, linear_scale, tensors)
        choices = self._choices_for(sizes, call.L)
        bwd = self._bwd_choice(sizes, call.L)
        # the forward walks the backward's chunks, so the saved states sit on its chunk boundaries
        configs = {**{p: c.params for p, c in choices.items()},
                   "linear": self._normalise("linear", {**choices["linear"].params, "chunk": bwd.params["chunk"]},
                                             sizes)}
        saved: list = []
        o, _ = self._run(call, sizes, configs, saved=saved)
        self.config = {**self.config, **{KERNEL_NAMES[p]: c.as_dict() for p, c in choices.items()},
                       "linear_bwd": bwd.as_dict()}
        return o.to(q.dtype), saved

    def _linear_saved_like(self, q, k, v, *, scale=None, linear_scale=None, **tensors) -> list:
        B, H, L, Dv = q.shape[0], q.shape[1], q.shape[2], v.shape[3]
        wq = tensors.get("feature_weight_q")
        F = 2 * wq.shape[-1] if (wq is not None and self.spec.linear.has_weights) else q.shape[3]
        return [q.new_empty(s, dtype=torch.float32) for s in _linear_train.saved_shapes(self.spec, B, H, L, F, Dv)]

    def _linear_backward_saved(self, grad_o, o, saved, q, k, v, *, scale=None, linear_scale=None, needs=None,
                               **tensors) -> dict:
        """{name: gradient} of q, k, v, g, the feature weights and initial_state, from the saved states
        (``needs``: the names wanted, None: all; the feature maps' vjp skips the others)."""
        call, sizes = self._train_call(q, k, v, scale, linear_scale, tensors)
        return self._linear_backward(call, sizes, grad_o, o, saved, needs=needs)

    def _train_call(self, q, k, v, scale, linear_scale, tensors) -> tuple:
        call = self._bind_checked(q, k, v, scale=scale, linear_scale=linear_scale, return_state=False, **tensors)
        self._prepare(call)
        return call, Sizes.of(call)

    def _bwd_choice(self, sizes: Sizes, L: int) -> Choice:
        """The backward's config (the same chooser as the forward; kernel name "linear_bwd")."""
        key = ("linear_bwd", sizes, _bucket(sizes, L, "linear"))
        if key not in self._configs:
            self._configs[key] = choose(
                BACKEND, "linear_bwd", self.spec, "float32", sizes.bucket(L, "linear"), device="cpu",
                default=lambda: _linear_bwd.LinearBwdConfig().to_dict(), fixed=self._fixed.get("linear_bwd"),
                normalize=lambda cfg: _linear_bwd.LinearBwdConfig.from_dict(cfg).to_dict(), db=self._db)
        return self._configs[key]

    def tune_backward(self, q, k, v, *, force: bool = False, progress=True, db=None, reps: int = 5,
                      **tensors):
        """Measure ``linear_bwd``'s configs (a whole training step: the saving forward walks the backward's
        chunks) at these inputs' sizes; store the best per bucket. Each config's gradients are checked
        against the default's. Returns a :class:`lincomp.tuning.TuneResult`."""
        db = db if db is not None else (self._db if self._db is not None else TuningDB())
        call, sizes = self._train_call(q, k, v, None, None, tensors)
        key = ("linear_bwd", sizes, _bucket(sizes, call.L, "linear"))
        choice = self._bwd_choice(sizes, call.L)
        grad_o = torch.randn(call.B, call.H, call.L, call.Dv)

        def step(cfg):
            self._configs[key] = Choice("fixed", cfg, choice.key)
            o, saved = self.forward_and_save(q, k, v, **tensors)
            return self.backward_saved(grad_o, o, saved, q, k, v, **tensors)
        ref = step(_linear_bwd.LinearBwdConfig().to_dict())

        def build(cfg):
            cfg = _linear_bwd.LinearBwdConfig.from_dict(cfg).to_dict()
            got = step(cfg)
            for name in ("q", "k", "v", "g"):
                if ref.get(name) is not None:
                    err = ((got[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-30)).item()
                    if not err <= 1e-4:
                        raise RuntimeError(f"config disagrees with the default config on d{name} (rel err {err:.2e})")
            return lambda: step(cfg)
        space = [_linear_bwd.LinearBwdConfig(c, mr).to_dict() for c in (16, 32, 64) for mr in (2, 4)]
        with torch.no_grad():
            res = run_tune(space, build, lambda fn: median_time_ms(fn, warmup=1, reps=reps, device="cpu"),
                           backend=BACKEND, kernel="linear_bwd", spec=self.spec, dtype="float32",
                           dims=sizes.bucket(call.L, "linear"), db=db, device="cpu", force=force, progress=progress)
        self._configs[key] = Choice("tuned", _linear_bwd.LinearBwdConfig.from_dict(res.config).to_dict(), choice.key)
        return res

    def _bwd_module(self, sizes: Sizes, cfg: dict, aug: bool, dv: bool = True) -> "_build.Built":
        key = ("linear_bwd", sizes, _frozen(cfg), aug, dv)
        built = self._mods.get(key)
        if built is None:
            dims = _linear_bwd.BwdDims(sizes.H, sizes.Hkv, sizes.HF, sizes.F, sizes.Dv, aug)
            src = _linear_bwd.linear_bwd_source(self.spec.linear.gate, dims, _linear_bwd.LinearBwdConfig.from_dict(cfg),
                                                lanes=_build.vector_lanes(), dv=dv)
            built = self._mods[key] = _build.build([src], f"linear_bwd-{self.spec.summary() or 'spec'}")
        return built

    def _feature_module(self, sizes: Sizes) -> "_build.Built":
        """features_q / features_k (phi, as the forward) and features_bwd_q / features_bwd_k (their vjp) of a
        hedgehog map, for training."""
        key = ("features_train", sizes)
        built = self._mods.get(key)
        if built is None:
            fmap, lanes = self.spec.linear.feature_map, _build.vector_lanes()
            fit = dict(mr=_fit_rows(4, sizes.E), lanes=lanes)
            funcs = []
            for side, Hx, H in (("q", sizes.H, sizes.H), ("k", sizes.Hkv, sizes.HF)):
                dims = _features.FeatureDims(Hx, H, sizes.D, sizes.E)
                funcs += [_features.feature_source(fmap, dims, name=f"features_{side}", **fit),
                          _features.feature_bwd_source(fmap, dims, name=f"features_bwd_{side}", lanes=lanes)]
            built = self._mods[key] = _build.build(funcs, f"features-{self.spec.summary() or 'spec'}")
        return built

    def _linear_backward(self, call: Call, sizes: Sizes, grad_o, o, saved: list, inwindow=None,
                         needs=None) -> dict:
        """The scan's gradients on the kernel, the feature maps' and the gate's on the host (linear_train.py).
        ``inwindow(feats, do, dfq, dfk, dv, grads)``: combine="shared"'s hook removing the in-window terms'
        share from the per-query-head gradients before the feature maps' vjp (shared_train.py). ``needs``: the
        names whose gradient is wanted (None: all); the feature maps' vjp skips the others."""
        spec, lin = self.spec, self.spec.linear
        B, H, L, Dv = call.B, call.H, call.L, call.Dv
        aug = lin.normalize or spec.combine == "shared"   # shared: the scan's den column feeds its normaliser
        den = saved[1] if aug else None
        do = _linear_train.scan_grad(spec, grad_o, o, den, call.linear_scale, aug)
        feats = _linear_train.Features(call, needs, self._feature_module(sizes) if lin.has_weights else None,
                                       _linear_train.saved_features(spec, saved))
        fq, fk = feats.fq, feats.fk
        want_dv = wants(needs, "v")
        grads, dS0 = {}, None
        if spec.causal:
            bwd = self._bwd_choice(sizes, L)
            C = bwd.params["chunk"]
            Sc = _linear_train.chunk_states(saved[0], L, C)
            dfq, dfk, dv = _empty((B, H, L, sizes.F)), _empty((B, H, L, sizes.F)), _empty((B, H, L, Dv))
            dS0 = _empty((B, H, sizes.F, Dv + int(aug)))
            gate = [call.g] if lin.gate is not None else []
            dg = [_empty(tuple(call.g.shape))] if lin.gate is not None else []
            self._bwd_module(sizes, bwd.params, aug, want_dv).fn("linear_bwd")(fq, fk, call.v, *gate, Sc, do, dfq, dfk,
                                                                               dv, dS0, *dg)
            if dg:
                grads["g"] = dg[0]
        else:
            dfq, dfk, dv = _linear_train.noncausal_grads(spec, feats, call.v, do, call.Hkv, want_dv)
        if inwindow is not None:
            inwindow(feats, do, dfq, dfk, dv, grads)
        grads.update(feats.backward(dfq, dfk if fk.shape[1] == H else _linear_train.group_sum(dfk, fk.shape[1])))
        grads["v"] = _linear_train.group_sum(dv, call.Hkv) if want_dv else None
        if dS0 is not None and call.S0 is not None:
            grads["initial_state"] = (dS0[..., :Dv], dS0[..., Dv] if aug else torch.zeros_like(call.z0))
        return grads

    # -- tuning ---------------------------------------------------------------------------------
    def tune(self, q, k, v, *, force: bool = False, progress=True, db=None, space: Optional[dict] = None,
             reps: int = 7, **tensors) -> list:
        """Measure the config space of each part at these inputs' sizes; store the best per bucket.

        Returns one :class:`lincomp.tuning.TuneResult` per part. A key already in the database
        costs nothing (unless ``force``). Each config's output is checked against the default's.
        ``space={"window": [...], "linear": [...]}`` replaces the built-in spaces (:func:`config_space`).
        """
        db = db if db is not None else (self._db if self._db is not None else TuningDB())
        with torch.no_grad():
            call = bind(self.spec, q, k, v, **tensors)
            self._prepare(call)
            sizes = Sizes.of(call)
            base = self._configs_for(sizes, call.L)
            ref, _ = self._run(call, sizes, base)
            results = []
            for part in self._parts():
                def build(cfg, part=part):
                    configs = dict(base, **{part: self._normalise(part, cfg, sizes)})
                    out, _ = self._run(call, sizes, configs)
                    err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                    if not err <= 1e-4:
                        raise RuntimeError(f"config disagrees with the default config (rel err {err:.2e})")
                    return lambda: self._run(call, sizes, configs)
                configs = (space or {}).get(part) or config_space(part, self.spec, sizes, call.L)
                res = run_tune(configs, build, lambda fn: median_time_ms(fn, warmup=2, reps=reps, device="cpu"),
                               backend=BACKEND, kernel=KERNEL_NAMES[part], spec=self.spec, dtype="float32",
                               dims=sizes.bucket(call.L, part), db=db, device="cpu", force=force,
                               progress=progress)
                bucket_key = (part, sizes, _bucket(sizes, call.L, part))
                choice = self._configs[bucket_key]
                self._configs[bucket_key] = Choice("tuned", self._normalise(part, res.config, sizes), choice.key)
                base = dict(base, **{part: self._configs[bucket_key].params})
                results.append(res)
        if space is None or "window_bwd" in space:   # the backward (window_train.py), where it has one
            from lincomp.lower.tvmir.window_train import tune_backward
            res = tune_backward(self, q, k, v, db=db, force=force, progress=progress, reps=reps,
                                space=(space or {}).get("window_bwd"), **tensors)
            results += [res] if res is not None else []
        if self._branch() == "linear" and (space is None or "linear_bwd" in space):
            results.append(self.tune_backward(q, k, v, db=db, force=force, progress=progress, **tensors))
        return results


def _pooled_args(call: Call, cfg: dict) -> list:
    """[kp, vp]: the pooled keys / values (computed once per call), zero-padded to whole kernel steps."""
    from lincomp.runtime.pool import pooled_kv
    kp, vp = pooled_kv(call.spec, call.k, call.v, call.pool_weight)
    rows = _window.pooled_rows(call.spec, cfg["block_n"] * max(1, cfg.get("kv_group", 1)))
    out = []
    dtype = call.q.dtype   # float32, or bfloat16 for the bf16 kernel
    for x in (kp, vp):
        if x.shape[2] == rows:   # whole steps already (CLEAR df=4: P = 256): no padded copy
            out.append(x.to(dtype).contiguous())
            continue
        buf = torch.zeros(x.shape[0], x.shape[1], rows, x.shape[3], dtype=dtype)
        buf[:, :, :x.shape[2]] = x
        out.append(buf)
    return list(_storage(*out))


def _storage(*qkv) -> tuple:
    """Keys (and queries) then values as the window kernel's buffers take them (window.storage): as they are in
    fp32; bf16 keys as int32 words of two values along the head dim, bf16 values as int16 bits."""
    if qkv[0].dtype != torch.bfloat16:
        return qkv
    return (*[x.view(torch.int32) for x in qkv[:-1]], qkv[-1].view(torch.int16))


def check_values(call: Call) -> None:
    """``bind``'s value checks, done cheaply: gamma here; the gate inside the linear kernel.

    ``bind`` checks g with ``isfinite().all()`` and ``(g > 0).any()``: 3 ms on a 4096 x 64 vector gate
    (more on a busy machine, where every parallel torch reduction waits for a core), over half the
    kernel. The linear kernel reads every gate anyway and reports the largest (+inf for NaN / Inf):
    :func:`check_gate` raises the same errors from it before anything else runs.
    """
    if call.window_gamma is not None:
        check_window_gamma(call.window_gamma)


# combine="shared" gets the out-of-window linear terms as (full scan) - (in-window terms): in fp32 that
# difference carries an error of ~2^-24 (|full| + |in-window|), large against a denominator that a small
# window_gamma or large features leave small (issue 19: rel err 0.78 at gamma 1e-8). The window kernel
# reports cond = (|full| + |in-window|) / |den| per row; past this bound the call runs on the reference.
SHARED_COND_LIMIT = 1e-4 * 2 ** 24


def shared_precision_ok(cond: torch.Tensor) -> bool:
    """No row's cancellation loses precision (NaN, from NaN inputs, compares false: the NaN output stands)."""
    return not (cond.numel() and float(cond.max()) > SHARED_COND_LIMIT)


def check_shared_precision(cond: torch.Tensor) -> None:
    """Raise Unsupported (-> the reference, with a warning) when a row's cancellation loses precision."""
    if not shared_precision_ok(cond):
        worst = float(cond.max())
        raise Unsupported(f"combine='shared': the TVM kernel subtracts the in-window linear terms from the full "
                          f"scan, and here that cancels ({worst * 2.0 ** -24:.1e} estimated relative error: a small "
                          "window_gamma or large features); the Triton kernel does not have this limit")


def check_gate(worst: float) -> None:
    """Raise bind's errors for the largest log-gate a kernel saw (+inf: NaN or Inf entries)."""
    check_log_gate(worst, worst)


def _bucket(sizes: Sizes, L: int, part: str) -> str:
    return shape_bucket(**sizes.bucket(L, part))


def _frozen(cfg: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()))


_SCRATCH = Scratch()   # intermediates of the calls, shared by every TVMKernel (see Scratch)


def _empty(shape) -> torch.Tensor:
    return alloc_output(shape, torch.float32)   # NaN under LINCOMP_POISON_OUTPUTS=1 (the one poison switch)


def compile_tvm(spec, **hints) -> TVMKernel:
    """``lincomp.compile(spec, target="tvm")``: hints ``config={"window": {...}, "linear": {...}}``, ``db``,
    ``autotune`` (default False; True: a bucket the database has nothing for is tuned at its first call)."""
    return TVMKernel(AttentionSpec.coerce(spec), **hints)
