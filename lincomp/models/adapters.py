"""peft with linearised models: lincomp's learned tensors train and save with the adapter, by default.

``get_peft_model`` freezes every parameter that is not an adapter's, and an adapter file holds only adapter
tensors, so a linearised model's feature maps, gates, sinks, window factors and pool weights would stay at their
values and be lost on reload. peft reads nothing from the base model that could declare them, so
``lincomp.linearize`` (when peft is importable) installs a small hook on peft's ``BaseTuner.inject_adapter``,
the step every adapter goes through (``get_peft_model``, ``PeftModel.from_pretrained``, ``add_adapter``,
``load_adapter``, transformers' ``model.add_adapter``): when the model holds linearised layers, the adapter's
config gets ``"lincomp"`` (the attribute linearize sets on each attention module) added to its
``modules_to_save``. peft then trains a copy of each linearised layer, saves it in the adapter file, writes
``"lincomp"`` into ``adapter_config.json`` and restores it with ``PeftModel.from_pretrained``::

    model = lincomp.linearize(model, spec)
    model = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj", "v_proj"]))
    ...train...; model.save_pretrained(folder)

Opt out with ``lincomp.models.adapters.peft_auto(False)`` (``with peft_auto(False):`` for a block; or
``LINCOMP_PEFT_AUTO=0`` in the environment before linearize); ``with_lincomp(config)`` then adds the layers for
one config explicitly. An adapter saved while opted out reloads with the base model's lincomp tensors (peft
warns that their keys are missing); load it inside ``with peft_auto(False):`` to skip the copies. Configs
without ``modules_to_save`` (prompt learning) are left alone. Every lincomp code path (attention,
``set_attention_mode``, ``model.generate()``) sees through peft's wrapper.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import warnings

MODULE_NAME = "lincomp"   # the attribute linearize sets on each attention module
ENV_OPT_OUT = "LINCOMP_PEFT_AUTO"   # "0": linearize does not hook peft
# The hook needs BaseTuner.inject_adapter(self, model, adapter_name, ...) reading self.peft_config[adapter_name]:
# checked on peft 0.21, unchanged since 0.14; a later peft is hooked only while that signature holds.
_PEFT_MIN = (0, 14)
_auto = True


def with_lincomp(peft_config):
    """``peft_config`` with the linearised layers added to its ``modules_to_save`` (in place; returned)."""
    if not hasattr(peft_config, "modules_to_save"):
        raise TypeError(f"{type(peft_config).__name__} has no modules_to_save; lincomp's learned tensors cannot be "
                        "trained with it (use LoraConfig or another adapter config that has modules_to_save)")
    current = list(peft_config.modules_to_save or [])
    if MODULE_NAME not in current:
        current.append(MODULE_NAME)
    peft_config.modules_to_save = current
    return peft_config


class peft_auto:
    """Whether adapters added from now on train and save lincomp's layers without ``with_lincomp`` (default
    True). Like ``torch.set_grad_enabled``: a call sets it, ``with peft_auto(False):`` sets it for a block."""

    def __init__(self, enabled: bool):
        global _auto
        if not isinstance(enabled, bool):
            raise TypeError(f"peft_auto(enabled) takes True or False, got {type(enabled).__name__} {enabled!r}")
        self._before, _auto = _auto, enabled

    def __enter__(self) -> "peft_auto":
        return self

    def __exit__(self, *exc) -> None:
        global _auto
        _auto = self._before


def _has_linearised_layers(model) -> bool:
    from lincomp.models.modules import LinearizedAttention
    return any(isinstance(getattr(m, MODULE_NAME, None), LinearizedAttention) for m in model.modules())


def _version(text: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in text.split(".")[:2])


def install_peft_hook() -> bool:
    """Hook peft (idempotent; called by ``lincomp.linearize``): True when adapters now keep lincomp's layers.

    False, and peft untouched, when peft is not installed, ``LINCOMP_PEFT_AUTO=0``, or (with a warning) peft is
    older than 0.14 or its ``inject_adapter`` changed shape (then use ``with_lincomp``).
    """
    if os.environ.get(ENV_OPT_OUT, "1").strip() == "0" or importlib.util.find_spec("peft") is None:
        return False
    import peft
    from peft.tuners.tuners_utils import BaseTuner
    original = BaseTuner.inject_adapter
    if getattr(original, "_lincomp_hook", False):
        return True
    if _version(peft.__version__) < _PEFT_MIN or list(inspect.signature(original).parameters)[:3] != [
            "self", "model", "adapter_name"]:
        warnings.warn(f"lincomp: peft {peft.__version__} is not one lincomp can hook (needs >= 0.14 with "
                      "BaseTuner.inject_adapter(model, adapter_name)); get_peft_model will freeze the linearised "
                      "layers: pass with_lincomp(config) to train and save them", stacklevel=3)
        return False

    @functools.wraps(original)
    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        config = self.peft_config.get(adapter_name) if isinstance(self.peft_config, dict) else None
        if _auto and hasattr(config, "modules_to_save") and _has_linearised_layers(model):
            with_lincomp(config)
        return original(self, model, adapter_name, *args, **kwargs)

    inject_adapter._lincomp_hook = True
    BaseTuner.inject_adapter = inject_adapter
    return True


__all__ = ["with_lincomp", "peft_auto", "install_peft_hook"]
