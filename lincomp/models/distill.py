"""Distillation of a linearised model into its teacher (attention transfer, as in LoLCATs / Lizard / CLEAR).

``distill(student, teacher, data)`` runs two stages:

1. **attention transfer**: every linearised layer's attention output (before the output projection) is
   matched to the softmax teacher's with an MSE; only the parameters ``lincomp.linearize`` added train
   (feature maps, gates, sink logits, mixing weights). Layer-local by default (LoLCATs: each layer sees
   the teacher's hidden states, one forward pass, no backward through the network), or end to end
   (``capture_attention`` on student and teacher);
2. **fine-tuning**: LoRA adapters (peft) on the q/k/v projections train with a task loss
   (next-token loss for causal LMs, embedding distillation for encoders, ``clear_loss`` for Flux, or
   any callable); the adapters are merged into the weights at the end.

Training is deterministic for a seed (the RNG is re-seeded from (seed, stage, step) before every step,
and the batch of step ``i`` is ``data[i % len(data)]`` or ``data(i)``), so a run resumed from its
checkpoint (``checkpoint_dir``: one safetensors file per stage, written atomically) ends with exactly
the weights of an uninterrupted run. Works on CPU and GPU: batches follow the student's device.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from lincomp._atomic import atomic_write_bytes

TASK_LOSSES = ("auto", "lm", "embedding", "clear")
TRANSFERS = ("local", "end_to_end")
# q/k/v projection names per model family (Llama / BERT / diffusers attention incl. Flux's text stream).
QKV_NAMES = ("q_proj", "k_proj", "v_proj", "query", "key", "value", "to_q", "to_k", "to_v",
             "add_q_proj", "add_k_proj", "add_v_proj")
CHECKPOINT_FORMAT = "lincomp-distill-1"

LossOut = Union[torch.Tensor, Tuple[torch.Tensor, Mapping[str, float]]]


# ------------------------------------------------------------------------------- linearize's parts
def learned_named_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """``{name: parameter}`` of exactly the parameters ``lincomp.linearize`` added to ``model``, sorted."""
    from lincomp.models import learned_parameters

    learned = {id(p) for p in learned_parameters(model)}
    return dict(sorted((n, p) for n, p in model.named_parameters() if id(p) in learned))


# ----------------------------------------------------------------------------------------- batches
def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _batch_at(data: Union[Sequence, Callable[[int], Any]], step: int) -> Any:
    """The batch of step ``step``: ``data(step)`` or ``data[step % len(data)]`` (deterministic, resumable)."""
    if callable(data) and not isinstance(data, (torch.Tensor, Sequence)):
        return data(step)
    if isinstance(data, torch.Tensor):
        raise TypeError("data must be a sequence of batches (e.g. a list, or a [N, B, L] tensor of token ids "
                        "indexed per step) or a callable step -> batch; a bare [B, L] tensor is one batch: "
                        "wrap it in a list")
    if not isinstance(data, Sequence) or len(data) == 0:
        raise TypeError(f"data must be a non-empty sequence of batches or a callable step -> batch, got "
                        f"{type(data).__name__}")
    return data[step % len(data)]


def run_model(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a dict, ``model(input_ids=batch)`` for a tensor of token ids."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, torch.Tensor):
        return model(input_ids=batch)
    raise TypeError(f"a batch must be a dict of model inputs or a tensor of token ids, got {type(batch).__name__}")


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------- teacher
class TeacherRunner:
    """Runs the teacher without gradients: ``teacher(batch, capture=False) -> (outputs, captured)``.

    The teacher is a separate model, or the student itself (``teacher=None`` or the same object): then
    it runs in ``set_attention_mode(model, "teacher")`` with any LoRA adapters disabled, which is the
    original model exactly (linearize keeps the original weights).
    """

    def __init__(self, teacher: Optional[nn.Module], student: nn.Module):
        self.model = student if teacher is None else teacher
        self.shared = self.model is student

    @contextmanager
    def _mode(self) -> Iterator[None]:
        from lincomp.models import LinearizedAttention, attention_mode

        if not self.shared or not any(isinstance(m, LinearizedAttention) for m in self.model.modules()):
            yield   # a separate teacher, or a stock model compared with itself
            return
        lora = _lora_layers(self.model)
        for m in lora:
            m.enable_adapters(False)
        try:
            with attention_mode(self.model, "teacher"):
                yield
        finally:
            for m in lora:
                m.enable_adapters(True)

    def __call__(self, batch: Any, capture: bool = False, forward: Optional[Callable] = None):
        """``(outputs, {layer: attention output} or None)``; ``forward(model, batch)`` defaults to run_model."""
        from lincomp.models import capture_attention

        forward = forward or run_model
        with torch.no_grad(), self._mode(), ExitStack() as stack:
            caps = stack.enter_context(capture_attention(self.model)) if capture else None
            out = forward(self.model, batch)
        return out, (dict(caps) if caps is not None else None)


def _forward_captured(model: nn.Module, batch: Any, forward: Optional[Callable] = None):
    from lincomp.models import capture_attention

    with capture_attention(model) as caps:
        out = (forward or run_model)(model, batch)
    return out, dict(caps)


# ------------------------------------------------------------------------------------------ losses
def attention_mse(student_caps: Mapping[str, torch.Tensor], teacher_caps: Mapping[str, torch.Tensor],
                  layers: Optional[Sequence[str]] = None) -> Tuple[torch.Tensor, int]:
    """Mean over layers of MSE(student attention output, teacher's); returns ``(loss, n_layers)``.

    Layers are matched by module name (falling back to order when the names differ but the counts agree).
    ``layers`` restricts the match to those names.
    """
    names = [n for n in student_caps if n in teacher_caps]
    pairs = [(student_caps[n], teacher_caps[n]) for n in names]
    if not pairs and len(student_caps) == len(teacher_caps) and student_caps:
        names = list(student_caps)
        pairs = list(zip(student_caps.values(), teacher_caps.values()))
    if layers is not None:
        keep = set(layers)
        missing = keep - set(names)
        if missing:
            raise ValueError(f"attention layers {sorted(missing)} were not captured; captured: {names}")
        pairs = [p for n, p in zip(names, pairs) if n in keep]
    if not pairs:
        raise ValueError("no attention outputs were captured from both the student and the teacher; is the "
                         "student linearised (lincomp.linearize) and does the teacher have the same layers?")
    losses = []
    for s, t in pairs:
        if s.shape != t.shape:
            raise ValueError(f"attention output shapes differ: student {list(s.shape)}, teacher {list(t.shape)}")
        losses.append(F.mse_loss(s.float(), t.float()))
    return torch.stack(losses).mean(), len(pairs)


def attention_transfer_loss(student: nn.Module, teacher: TeacherRunner, batch: Any) -> LossOut:
    """Stage 1, end to end: MSE between each linearised layer's attention output (the student running on its
    own hidden states) and the teacher's (``capture_attention`` on both)."""
    _, t_caps = teacher(batch, capture=True)
    _, s_caps = _forward_captured(student, batch)
    loss, n = attention_mse(s_caps, t_caps)
    return loss, {"attn_mse": loss.item(), "layers": n}


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                      key_padding_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                      cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain softmax attention, the teacher of a linearised layer: q ``[B, H, L, D]``, k / v ``[B, Hkv, L, D]``
    (grouped-query heads repeated), ``key_padding_mask [B, L]`` (True = attend), ``cu_seqlens [N + 1]`` (a packed
    row: no query sees another document) -> ``[B, H, L, Dv]``."""
    H = q.shape[1]
    if k.shape[1] != H:
        k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :].to(torch.bool)
    if cu_seqlens is not None:
        from lincomp.documents import document_ids
        doc = document_ids(cu_seqlens, q.shape[2], q.device)
        same = (doc[:, None] == doc[None, :])[None, None]
        mask = same if mask is None else mask & same
    if mask is not None:
        if causal:
            L = q.shape[2]
            mask = mask & torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
            causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


class LayerLocalTransfer:
    """LoLCATs' attention transfer, layer by layer, in one forward pass.

    Inside ``with LayerLocalTransfer(model) as t:`` every linearised layer computes its lincomp output on
    its q / k / v, records ``MSE(lincomp output, softmax output)`` in ``t.losses``, and passes the *softmax*
    output on, so every layer sees exactly the teacher's hidden states (linearize keeps the original
    weights) and gradients reach only the learned parts of each layer, never the rest of the network.
    """

    def __init__(self, model: nn.Module):
        from lincomp.models import LinearizedAttention

        self.layers = [m for m in model.modules() if isinstance(m, LinearizedAttention)]
        if not self.layers:
            raise ValueError("layer-local attention transfer needs a linearised model (lincomp.linearize)")
        self.losses: List[torch.Tensor] = []
        self._handles: list = []

    def _hook(self, module, args, kwargs, out):
        if module.mode != "student" or getattr(module, "_decoder", None) is not None:
            return None
        names = ("q", "k", "v")
        q, k, v = (args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names))
        with torch.no_grad():
            target = softmax_attention(q, k, v, causal=module.spec.causal, scale=kwargs.get("scale"),
                                       key_padding_mask=kwargs.get("key_padding_mask"),
                                       cu_seqlens=kwargs.get("cu_seqlens"))
        self.losses.append(F.mse_loss(out.float(), target.float()))
        return target.to(out.dtype)

    def __enter__(self) -> "LayerLocalTransfer":
        self.losses = []
        self._handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def layer_local_loss(student: nn.Module, teacher: TeacherRunner, batch: Any) -> LossOut:
    """Stage 1, layer-local (LoLCATs): the mean over layers of MSE(lincomp output, softmax output) with every
    layer fed the teacher's hidden states; one forward of the student, no teacher forward."""
    with LayerLocalTransfer(student) as t:
        run_model(student, batch)
    if not t.losses:
        raise ValueError("no linearised layer ran in student mode during the forward pass")
    loss = torch.stack(t.losses).mean()
    return loss, {"attn_mse": loss.item(), "layers": len(t.losses)}


def _check_same_weights(student: nn.Module, teacher: nn.Module) -> None:
    """Layer-local transfer uses the student's own original attention as the teacher: they must agree."""
    learned = {id(p) for p in learned_named_parameters(student).values()}
    mine = {n: p for n, p in student.named_parameters() if id(p) not in learned}
    theirs = dict(teacher.named_parameters())
    for n, p in mine.items():
        q = theirs.get(n)
        if q is None or q.shape != p.shape or not torch.equal(q.detach().to(p.device), p.detach()):
            raise ValueError(f"transfer='local' runs the student's own softmax attention as the teacher, but the "
                             f"teacher's {n!r} differs from the student's; pass transfer='end_to_end' to match a "
                             "different teacher's attention outputs")


def lm_loss(student: nn.Module, teacher: TeacherRunner, batch: Any) -> LossOut:
    """Next-token cross-entropy (labels = input ids unless the batch has ``labels``)."""
    inputs = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
    inputs.setdefault("labels", inputs["input_ids"])
    loss = student(**inputs).loss
    return loss, {"lm": loss.item()}


def mean_pool(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sentence embedding as sentence-transformers computes it: the mean over (unpadded) tokens."""
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def embedding_loss(student: nn.Module, teacher: TeacherRunner, batch: Any) -> LossOut:
    """Encoders: 1 - cos(mean-pooled student embedding, teacher's) + token-level MSE of the last hidden state
    (relative to the teacher's mean square)."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    t_out, _ = teacher(batch)
    s_out = run_model(student, batch)
    hs, ht = s_out.last_hidden_state.float(), t_out.last_hidden_state.float()
    cos = F.cosine_similarity(mean_pool(hs, mask), mean_pool(ht, mask), dim=-1).mean()
    mse = F.mse_loss(hs, ht) / ht.pow(2).mean().clamp_min(1e-12)
    loss = (1 - cos) + mse
    return loss, {"cos": cos.item(), "hidden_rel_mse": mse.item()}


@dataclass(frozen=True)
class ClearWeights:
    """CLEAR's loss weights: flow matching + prediction distillation + attention-output MSE."""

    flow: float = 1.0
    prediction: float = 0.5
    attention: float = 0.5


def clear_loss(student: nn.Module, teacher: TeacherRunner, batch: Mapping[str, torch.Tensor], *,
               weights: ClearWeights = ClearWeights(), layers: Optional[Sequence[str]] = None) -> LossOut:
    """CLEAR's distillation loss for a diffusers Flux transformer (rectified flow).

    ``batch``: ``latents`` (clean packed latents x0 ``[B, N, C]``), ``encoder_hidden_states``,
    ``pooled_projections``, ``img_ids``, ``txt_ids`` and optionally ``guidance``. Draws noise e and a
    logit-normal time t (from the torch RNG, which ``distill`` seeds per step), forms
    x_t = (1 - t) x0 + t e and scores: ``flow * MSE(student, e - x0) + prediction * MSE(student, teacher)
    + attention * MSE(student attention outputs, teacher's)`` (``layers``: which attention modules; all
    by default).
    """
    if not isinstance(batch, Mapping) or "latents" not in batch:
        raise ValueError("clear_loss needs a dict batch with 'latents' (clean packed latents [B, N, C]) and the "
                         "Flux conditioning inputs (encoder_hidden_states, pooled_projections, img_ids, txt_ids)")
    x0 = batch["latents"]
    noise = torch.randn(x0.shape, dtype=x0.dtype, device=x0.device)
    t = torch.sigmoid(torch.randn(x0.shape[0], device=x0.device, dtype=x0.dtype))
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    inputs = {k: v for k, v in batch.items() if k != "latents"}
    inputs.update(hidden_states=xt, timestep=t, return_dict=False)
    want_attn = weights.attention != 0
    t_out, t_caps = teacher(inputs, capture=want_attn)
    if want_attn:
        s_out, s_caps = _forward_captured(student, inputs)
    else:
        s_out, s_caps = run_model(student, inputs), None
    pred, t_pred = s_out[0].float(), t_out[0].float()
    flow = F.mse_loss(pred, (noise - x0).float())
    pred_mse = F.mse_loss(pred, t_pred)
    loss = weights.flow * flow + weights.prediction * pred_mse
    parts = {"flow": flow.item(), "pred_mse": pred_mse.item()}
    if want_attn:
        attn, _ = attention_mse(s_caps, t_caps, layers)
        loss = loss + weights.attention * attn
        parts["attn_mse"] = attn.item()
    return loss, parts


def _resolve_task_loss(task_loss: Union[str, Callable], student: nn.Module) -> Callable:
    if callable(task_loss):
        return task_loss
    if task_loss not in TASK_LOSSES:
        raise ValueError(f"task_loss must be one of {list(TASK_LOSSES)} or a callable "
                         f"(student, teacher, batch) -> loss, got {task_loss!r}")
    if task_loss == "auto":
        if hasattr(student, "lm_head") or type(student).__name__.endswith("ForCausalLM"):
            task_loss = "lm"
        elif type(student).__name__.startswith("Flux"):
            task_loss = "clear"
        else:
            task_loss = "embedding"
    return {"lm": lm_loss, "embedding": embedding_loss, "clear": clear_loss}[task_loss]


# -------------------------------------------------------------------------------------------- LoRA
def _lora_layers(model: nn.Module) -> list:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def qkv_module_names(model: nn.Module, targets: Optional[Sequence[str]] = None) -> List[str]:
    """Names of the ``nn.Linear`` modules LoRA attaches to: those whose name ends with one of ``targets``
    (whole dotted parts, e.g. "q_proj" or "to_out.0"; default: the q/k/v projections of Llama, BERT and
    diffusers attention). CLEAR trains the output projections too: add "to_out.0", "to_add_out"."""
    targets = tuple(targets) if targets is not None else QKV_NAMES
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"no nn.Linear module named one of {list(targets)} in {type(model).__name__}; "
                         "pass lora_targets= the last name parts of its q/k/v projections")
    return names


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets: Optional[Sequence[str]] = None,
             seed: int = 0) -> Dict[str, nn.Parameter]:
    """Attach LoRA adapters (peft, in place) to the q/k/v projections; returns their parameters by name.

    Only the adapters' requires_grad is changed (the rest of the model keeps its flags).
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ImportError("the fine-tuning stage needs peft: pip install peft") from e
    if rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {rank}")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    names = qkv_module_names(model, targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_derived_seed(seed, "lora-init", 0))
        from lincomp.models.adapters import peft_auto
        with peft_auto(False):   # the stages train the learned tensors themselves, in place: no peft copies
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=names),
                                    model)
    for n, p in model.named_parameters():  # peft froze everything else; restore the caller's flags
        base = n.replace(".base_layer.", ".")
        if "lora_" not in n:
            p.requires_grad_(flags.get(n, flags.get(base, False)))
    return {n: p for n, p in sorted(model.named_parameters()) if "lora_" in n}


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base weight and put the plain layer back; returns how many."""
    count = 0
    layers = {id(m) for m in _lora_layers(model)}
    for name, module in list(model.named_modules()):
        if id(module) in layers:
            module.merge()
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
            count += 1
    return count


# ---------------------------------------------------------------------------------- training loop
def _derived_seed(seed: int, name: str, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}/{step}".encode()).digest()[:8], "little") & (2 ** 63 - 1)


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: float = 0.1,
                  final: float = 0.1) -> torch.optim.lr_scheduler.LRScheduler:
    """torch's schedulers for ``steps`` steps of ``opt``: linear warmup over ``w = max(1, round(warmup * steps))``
    steps from ``lr / w`` to ``lr``, then cosine decay towards ``final * lr`` (reached at step ``steps``).
    Step it after each ``opt.step()``; its ``state_dict`` goes into the checkpoint."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    w = max(1, int(round(warmup * steps)))
    lr = opt.param_groups[0]["lr"]
    ramp = LinearLR(opt, start_factor=1.0 / w, end_factor=1.0, total_iters=w - 1)
    decay = CosineAnnealingLR(opt, T_max=max(1, steps - w), eta_min=final * lr)
    return SequentialLR(opt, [ramp, decay], milestones=[w])


def _spec_summaries(model: nn.Module) -> List[str]:
    """The distinct specs of a linearised model's layers: a checkpoint trained for one window must not resume
    under another (the learned parameters have the same shapes)."""
    from lincomp.models import LinearizedAttention

    return sorted({m.spec_json for m in model.modules() if isinstance(m, LinearizedAttention)})


def _data_digest(data: Union[Sequence, Callable[[int], Any]]) -> Union[str, list]:
    """What identifies the training data in a checkpoint: its length plus a hash of its first and last batch
    (a callable's output is not hashed: resuming one is the caller's responsibility; one with a ``digest``
    attribute, as :func:`lincomp.models.causal_lm.packed_batches` makes, is identified by it)."""
    if not isinstance(data, Sequence):
        return getattr(data, "digest", "callable")
    h = hashlib.sha256()
    for b in (data[0], data[-1]) if len(data) else ():
        for t in (b.values() if isinstance(b, Mapping) else [b]):
            if isinstance(t, torch.Tensor):   # raw bytes: numpy has no bfloat16
                h.update(str(t.dtype).encode())
                h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(t).encode())
    return [len(data), h.hexdigest()[:16]]


def _fingerprint(d: Mapping) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_checkpoint(path: Path, params: Mapping[str, nn.Parameter], opt: torch.optim.Optimizer,
                     sched: torch.optim.lr_scheduler.LRScheduler, step: int, fingerprint: str, history: list,
                     extra: Optional[Mapping[str, str]] = None) -> None:
    from safetensors.torch import save

    tensors = {f"param/{n}": p.detach().cpu().contiguous().clone() for n, p in params.items()}
    for n, p in params.items():
        for k, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{n}/{k}"] = v.detach().cpu().contiguous().clone()
    meta = {"format": CHECKPOINT_FORMAT, "step": str(step), "fingerprint": fingerprint,
            "history": json.dumps(history), "scheduler": json.dumps(sched.state_dict()),
            **{k: str(v) for k, v in dict(extra or {}).items()}}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def _load_checkpoint(path: Path, params: Mapping[str, nn.Parameter], opt: torch.optim.Optimizer,
                     sched: torch.optim.lr_scheduler.LRScheduler, fingerprint: str) -> Tuple[int, list, float]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a lincomp distillation checkpoint (format {meta.get('format')!r})")
        if meta.get("fingerprint") != fingerprint:
            raise ValueError(f"{path} was written by a run with other settings (spec, steps, lr, seed, trained "
                             "parameters or data); delete it or choose another checkpoint_dir to start afresh "
                             "(`lincomp distill`: --fresh, or another --out)")
        keys = set(f.keys())
        with torch.no_grad():
            for n, p in params.items():
                if f"param/{n}" not in keys:
                    raise ValueError(f"{path} has no parameter {n!r}; delete it to start afresh")
                p.copy_(f.get_tensor(f"param/{n}").to(p.device, p.dtype))
        for n, p in params.items():
            prefix = f"optim/{n}/"
            state = {k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
            if state:
                opt.state[p] = {k: (v.to(p.device) if k != "step" else v) for k, v in state.items()}
        if "scheduler" not in meta:
            raise ValueError(f"{path} was written by an older lincomp (no learning-rate schedule state); delete it "
                             "to start afresh")
        sched.load_state_dict(json.loads(meta["scheduler"]))
        for group, lr in zip(opt.param_groups, sched.get_last_lr()):   # the schedulers compute from the current lr
            group["lr"] = lr
        return int(meta["step"]), json.loads(meta.get("history", "[]")), float(meta.get("elapsed_s", 0.0))


def train_steps(params: Mapping[str, nn.Parameter], loss_at: Callable[[int], LossOut], *, steps: int,
                lr: float, name: str = "train", seed: int = 0, warmup: float = 0.1, weight_decay: float = 0.0,
                clip: Optional[float] = 1.0, checkpoint: Optional[Union[str, Path]] = None,
                checkpoint_every: int = 50, settings: Optional[Mapping] = None,
                progress: bool = True, log_every: int = 1) -> Tuple[List[dict], int]:
    """AdamW over ``params`` for ``steps`` steps of ``loss_at(step)`` with the :func:`warmup_cosine` learning
    rate (``warmup``: the share of steps that warm up); returns ``(history, resumed_from)``.

    ``history`` rows: step, loss, lr, ``elapsed_s`` (training seconds so far, earlier sessions included)
    and the loss's named parts.
    Before each step the torch RNG is seeded from (seed, name, step). With ``checkpoint`` (a .safetensors
    path) the parameters, optimizer and schedule state and history are saved atomically every ``checkpoint_every`` steps
    and at the end, and a run finds its checkpoint and continues from it; ``settings`` (JSON-able) must
    match the run that wrote it.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    params = dict(params)
    if not params:
        raise ValueError(f"stage {name!r} has no parameters to train")
    for n, p in params.items():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=weight_decay)
    sched = warmup_cosine(opt, steps, warmup)
    fp = _fingerprint({"name": name, "steps": steps, "lr": lr, "seed": seed, "warmup": warmup,
                       "weight_decay": weight_decay, "clip": clip,
                       "params": {n: list(p.shape) for n, p in params.items()}, "settings": settings or {}})
    ckpt = Path(checkpoint) if checkpoint is not None else None
    start, history, before = 0, [], 0.0   # before: seconds spent by earlier (interrupted) sessions
    if ckpt is not None and ckpt.exists():
        start, history, before = _load_checkpoint(ckpt, params, opt, sched, fp)
    t0 = time.perf_counter()
    resumed_from = start
    bar = None
    if progress and start < steps:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, initial=start, desc=name, unit="step", dynamic_ncols=True)
        except ImportError:  # tqdm is optional
            bar = None
    try:
        for step in range(start, steps):
            torch.manual_seed(_derived_seed(seed, name, step))
            opt.zero_grad(set_to_none=True)
            out = loss_at(step)
            loss, parts = out if isinstance(out, tuple) else (out, {})
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{name}: the loss is {loss.item()} at step {step}; lower the learning "
                                         f"rate (lr={lr}) or check the data")
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
            opt.step()
            step_lr = opt.param_groups[0]["lr"]
            sched.step()
            elapsed = before + time.perf_counter() - t0
            if (step + 1) % log_every == 0 or step + 1 == steps:
                history.append({"step": step + 1, "loss": float(loss.item()), "lr": step_lr,
                                "elapsed_s": elapsed, **{k: float(v) for k, v in parts.items()}})
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"loss {loss.item():.4g}")
            if ckpt is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                _save_checkpoint(ckpt, params, opt, sched, step + 1, fp, history, {"elapsed_s": elapsed})
    finally:
        if bar is not None:
            bar.close()
    return history, resumed_from


# ----------------------------------------------------------------------------------------- distill
@dataclass
class DistillResult:
    """What ``distill`` did: per-step history, wall time and the step each stage resumed from."""

    history: Dict[str, List[dict]] = field(default_factory=dict)
    wall_s: Dict[str, float] = field(default_factory=dict)
    resumed_from: Dict[str, int] = field(default_factory=dict)
    lora_merged: int = 0

    def last(self, stage: str) -> Optional[dict]:
        rows = self.history.get(stage) or []
        return rows[-1] if rows else None


def distill(student: nn.Module, teacher: Optional[nn.Module], data: Union[Sequence, Callable[[int], Any]], *,
            attention_steps: int = 200, finetune_steps: int = 0, lr: float = 1e-2, finetune_lr: float = 1e-4,
            task_loss: Union[str, Callable] = "auto", lora_rank: int = 8, lora_alpha: float = 16.0,
            lora_targets: Optional[Sequence[str]] = None, finetune_learned: bool = True, merge: bool = True,
            checkpoint_dir: Optional[Union[str, Path]] = None, checkpoint_every: int = 50, seed: int = 0,
            warmup: float = 0.1, clip: Optional[float] = 1.0, transfer: str = "local", progress: bool = True,
            log_every: int = 1) -> DistillResult:
    """Train a ``lincomp.linearize``-d ``student`` to reproduce ``teacher``; returns a :class:`DistillResult`.

    ``teacher``: the original model, or None / the student itself (its "teacher" attention mode, with
    LoRA disabled). ``data``: a sequence of batches (dicts of model inputs or token-id tensors; step ``i``
    uses ``data[i % len(data)]``) or a callable ``step -> batch``.
    Stage 1 (``attention_steps``, ``lr``) trains only the parameters linearize added, on the attention MSE:
    ``transfer="local"`` (LoLCATs; default) feeds every layer the teacher's hidden states (one forward, no
    backward through the network; the student's own weights are the teacher), ``"end_to_end"`` runs the
    student on its own hidden states against ``capture_attention`` of the teacher.
    Stage 2 (``finetune_steps``, ``finetune_lr``) adds LoRA (``lora_rank``, ``lora_alpha``) to the q/k/v
    projections (``lora_targets``: their last name parts) and trains them, plus the learned parts if
    ``finetune_learned``, on ``task_loss``: "lm", "embedding", "clear", "auto" (by model type) or a callable
    ``(student, teacher_runner, batch) -> loss or (loss, {name: float})``. ``merge`` folds LoRA into the
    weights at the end. ``checkpoint_dir``: resumable safetensors checkpoints (one file per stage).
    Gradients flow only to the trained parameters; the model is left in eval mode (no dropout).
    """
    if attention_steps < 0 or finetune_steps < 0:
        raise ValueError("attention_steps and finetune_steps must be >= 0")
    if transfer not in TRANSFERS:
        raise ValueError(f"transfer must be one of {list(TRANSFERS)}, got {transfer!r}")
    runner = TeacherRunner(teacher, student)
    if not runner.shared:
        runner.model.eval()
        for p in runner.model.parameters():
            p.requires_grad_(False)
    student.eval()  # deterministic: no dropout; gradients still flow
    device = _device_of(student)
    learned = learned_named_parameters(student)
    for p in student.parameters():
        p.requires_grad_(False)
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    common = {"seed": seed, "warmup": warmup, "clip": clip, "progress": progress, "log_every": log_every,
              "checkpoint_every": checkpoint_every}
    result = DistillResult()

    def batch(step: int):
        return _to_device(_batch_at(data, step), device)

    settings = {"data": _data_digest(data), "student": type(student).__name__, "specs": _spec_summaries(student)}
    if attention_steps:
        if not learned:
            warnings.warn("stage 1 (attention transfer) skipped: linearize added no learnable parameters to this "
                          "student (a spec without feature maps, gates or sinks); use finetune_steps")
        else:
            stage1 = layer_local_loss if transfer == "local" else attention_transfer_loss
            if transfer == "local" and not runner.shared:
                _check_same_weights(student, runner.model)
            t0 = time.perf_counter()
            hist, res = train_steps(learned, lambda s: stage1(student, runner, batch(s)),
                                    steps=attention_steps, lr=lr, name="attention",
                                    checkpoint=ckdir / "attention.safetensors" if ckdir else None,
                                    settings={**settings, "transfer": transfer}, **common)
            result.history["attention"], result.resumed_from["attention"] = hist, res
            result.wall_s["attention"] = time.perf_counter() - t0
            for p in learned.values():
                p.requires_grad_(False)
    if finetune_steps:
        loss_fn = _resolve_task_loss(task_loss, student)
        lora = add_lora(student, lora_rank, lora_alpha, lora_targets, seed)
        trained = dict(lora)
        if finetune_learned:
            trained.update(learned)
        t0 = time.perf_counter()
        try:
            hist, res = train_steps(trained, lambda s: loss_fn(student, runner, batch(s)), steps=finetune_steps,
                                    lr=finetune_lr, name="finetune",
                                    checkpoint=ckdir / "finetune.safetensors" if ckdir else None,
                                    settings={**settings, "task_loss": getattr(loss_fn, "__name__", str(loss_fn)),
                                              "lora": [lora_rank, lora_alpha]}, **common)
        finally:
            for p in trained.values():
                p.requires_grad_(False)
        if merge:
            result.lora_merged = merge_lora(student)
        result.history["finetune"], result.resumed_from["finetune"] = hist, res
        result.wall_s["finetune"] = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------- eval and save
@torch.no_grad()
def embedding_fidelity(student: nn.Module, teacher: Optional[nn.Module], blocks: torch.Tensor,
                       batch_size: int = 16) -> dict:
    """Cosine similarity of mean-pooled sentence embeddings, student vs teacher, over token-id ``blocks``
    ``[N, L]`` (no padding): ``{"mean", "min", "p05", "n", "length"}``."""
    runner = TeacherRunner(teacher, student)
    dev = _device_of(student)
    sims = []
    for i in range(0, blocks.shape[0], batch_size):
        x = blocks[i:i + batch_size].to(dev)
        t, _ = runner(x)
        s = run_model(student, x)
        sims.append(F.cosine_similarity(mean_pool(s.last_hidden_state.float()),
                                        mean_pool(t.last_hidden_state.float()), dim=-1).cpu())
    c = torch.cat(sims).double()
    return {"mean": c.mean().item(), "min": c.min().item(), "p05": torch.quantile(c, 0.05).item(),
            "n": int(c.numel()), "length": int(blocks.shape[1])}


def save_student(student: nn.Module, path: Union[str, Path], spec, *, extra: Optional[Mapping[str, Any]] = None,
                 include: Optional[Sequence[str]] = None) -> Path:
    """Write what distillation changed (linearize's parameters and the q/k/v projections) to a safetensors
    file, atomically, with the spec in its metadata. ``include``: more module-name parts to store."""
    from safetensors.torch import save

    from lincomp.spec import AttentionSpec

    spec = AttentionSpec.coerce(spec)
    keep = set(learned_named_parameters(student))
    parts = set(QKV_NAMES) | set(include or ())
    for n, _ in student.named_parameters():
        mod = n.rsplit(".", 1)[0]
        if mod.split(".")[-1] in parts:
            keep.add(n)
    tensors = {n: p.detach().cpu().contiguous().clone() for n, p in student.named_parameters() if n in keep}
    meta = {"format": "lincomp-student-1", "spec": spec.canonical_json(), "model": type(student).__name__,
            "extra": json.dumps(dict(extra or {}), default=str)}
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


def load_student(model: nn.Module, path: Union[str, Path], **linearize_kwargs) -> nn.Module:
    """Linearise ``model`` (a fresh copy of the teacher) with the spec stored in ``path`` and load the saved
    tensors into it; returns the student. ``linearize_kwargs`` (e.g. ``target="reference"``) go to linearize."""
    from safetensors import safe_open

    from lincomp.spec import AttentionSpec

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "lincomp-student-1":
            raise ValueError(f"{path} is not a lincomp student file (written by lincomp.models.distill.save_student)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    from lincomp.models import linearize

    student = linearize(model, AttentionSpec.from_json(meta["spec"]), **linearize_kwargs) or model
    params = dict(student.named_parameters())
    missing = [k for k in tensors if k not in params]
    if missing:
        raise ValueError(f"{path} holds tensors this model lacks: {missing[:5]}; was it saved from another "
                         "architecture?")
    with torch.no_grad():
        for k, t in tensors.items():
            params[k].copy_(t.to(params[k].device, params[k].dtype))
    return student


__all__ = ["distill", "DistillResult", "train_steps", "warmup_cosine", "TeacherRunner", "run_model", "LayerLocalTransfer",
           "layer_local_loss", "attention_transfer_loss", "attention_mse", "softmax_attention", "lm_loss",
           "embedding_loss", "mean_pool", "clear_loss", "ClearWeights", "add_lora", "merge_lora", "qkv_module_names",
           "embedding_fidelity", "save_student", "load_student", "learned_named_parameters"]
