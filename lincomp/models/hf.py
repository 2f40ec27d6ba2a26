"""transformers save / load of linearised models: ``save_pretrained`` + ``AutoModel*.from_pretrained``.

``lincomp.linearize`` records, in the model config, what it did: ``config.quantization_config`` is a
:class:`LincompConfig` (``quant_method="lincomp"``, the spec of every linearised layer by module name, the
target, the fallback and the teacher attention), and ``config.attn_implementation = "lincomp"``. Both land in
``config.json``, so a saved folder (or a Hub repo) is self-describing:

- with lincomp registered (``import lincomp.models.hf`` registers it; so does ``lincomp.linearize``),
  ``AutoModel*.from_pretrained(folder)`` rebuilds the linearised layers *before* the weights load, through
  transformers' quantizer hook (the only ``from_pretrained`` extension point that can add modules), so the
  learned tensors load into them (no "unexpected keys"); the model is not marked quantized afterwards
  (``.float()``, ``.to(dtype)``, training and peft work as on any model);
- without lincomp, transformers refuses ``attn_implementation="lincomp"``: loading fails loudly instead of
  running plain softmax attention with the learned tensors dropped.

``from_pretrained(stock_folder, attn_implementation="lincomp")`` on a model that was never linearised raises at
the first forward (see ``lincomp_attention_forward``) rather than silently running softmax.
"""

from __future__ import annotations

import functools
import json
import warnings
from typing import Dict, Optional

from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "lincomp"
CONFIG_VERSION = 1


@functools.lru_cache(maxsize=None)
def register() -> None:
    """Register lincomp with transformers (idempotent): the attention function and mask function "lincomp",
    and the "lincomp" quantization config + quantizer that ``from_pretrained`` uses to restore a linearised model."""
    from lincomp.models.linearize import ATTN_NAME, lincomp_attention_forward, lincomp_mask
    AttentionInterface.register(ATTN_NAME, lincomp_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, lincomp_mask)
    register_quantization_config(QUANT_METHOD)(LincompConfig)
    register_quantizer(QUANT_METHOD)(LincompQuantizer)


class LincompConfig(QuantizationConfigMixin):
    """What ``linearize`` did, as saved in ``config.json`` under ``quantization_config``.

    ``specs``: ``{attention module name: spec dict}``; ``target`` / ``fallback``: as for ``linearize``;
    ``teacher``: the attention implementation the model had (``"sdpa"`` or ``"eager"``).
    """

    def __init__(self, specs: Optional[Dict[str, dict]] = None, target: str = "auto", fallback: str = "warn",
                 teacher: str = "sdpa", version: int = CONFIG_VERSION, **kwargs):
        self.quant_method = QUANT_METHOD
        if not isinstance(specs, dict) or not specs:
            raise ValueError("quantization_config.specs must be a non-empty {module name: spec} mapping "
                             f"(config.json written by lincomp.linearize), got {specs!r}")
        if version > CONFIG_VERSION:
            raise ValueError(f"this checkpoint was saved by a newer lincomp (config version {version} > "
                             f"{CONFIG_VERSION}); upgrade lincomp to load it")
        self.specs, self.target, self.fallback, self.teacher = specs, target, fallback, teacher
        self.version = version


class LincompQuantizer(HfQuantizer):
    """Adds the linearised layers before the weights load, so their learned tensors load too.

    Not a quantizer: after loading it removes every quantization mark transformers put on the model.
    """

    requires_calibration = False

    def validate_environment(self, *args, **kwargs):
        pass

    def _process_model_before_weight_loading(self, model, **kwargs):
        from lincomp.models.adapters import install_peft_hook
        from lincomp.models.cache import install_generate
        from lincomp.models.linearize import linearize_layers
        qc = self.quantization_config
        model.config._attn_implementation = qc.teacher   # config.json says "lincomp"; linearize wants the teacher
        register()
        linearize_layers(model, dict(qc.specs), target=qc.target, fallback=qc.fallback)
        install_generate(model)
        install_peft_hook()
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        lost = [n for n, p in model.named_parameters() if p.is_meta]
        if lost:
            raise ValueError(f"lincomp: the checkpoint lacks the learned tensors of the linearised layers "
                             f"(e.g. {lost[0]}); save it with save_pretrained after lincomp.linearize")
        model.hf_quantizer = None
        if "is_quantized" in vars(model):
            del model.is_quantized
        for m in model.modules():
            if hasattr(m, "config") and hasattr(m.config, "_is_quantized"):
                m.config._is_quantized = False
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self):
        return True


def record(model: nn.Module) -> None:
    """Write what ``linearize`` did into ``model.config`` (saved by ``save_pretrained``; see the module doc)."""
    from lincomp.models.linearize import attention_modules
    cfg = model.config
    layers = {name: m.lincomp for name, m in attention_modules(model) if hasattr(m, "lincomp")}
    current = getattr(cfg, "quantization_config", None)
    method = current.get("quant_method") if isinstance(current, dict) else getattr(current, "quant_method", None)
    if current is not None and method != QUANT_METHOD:
        warnings.warn(f"the model is quantized ({method}); save_pretrained will not record the lincomp spec, so "
                      "from_pretrained returns the original attention", stacklevel=3)
        return
    first = next(iter(layers.values()))
    teacher = getattr(first, "teacher_impl", "sdpa")
    cfg.quantization_config = LincompConfig(
        specs={name: json.loads(lin.spec_json) for name, lin in layers.items()}, target=first.target,
        fallback=first.fallback, teacher=teacher)
    cfg.attn_implementation = QUANT_METHOD      # config.json: loading without lincomp fails loudly


__all__ = ["register", "record", "LincompConfig", "LincompQuantizer", "QUANT_METHOD"]

register()   # importing this module is what a fresh process does before from_pretrained
