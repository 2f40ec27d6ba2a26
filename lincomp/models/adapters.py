"""peft with linearised models: lincomp's learned tensors train and save with the adapter.

``get_peft_model`` freezes every parameter that is not an adapter's, and an adapter file holds only adapter
tensors, so a linearised model's feature maps, gates, sinks and window factors would stay at their values and
be lost on reload. ``with_lincomp(peft_config)`` adds the linearised layers (``attention_module.lincomp``) to
``modules_to_save``: peft then trains a copy of each, saves it in the adapter file and restores it with
``PeftModel.from_pretrained(linearised_model, folder)``::

    model = lincomp.linearize(model, spec)
    model = peft.get_peft_model(model, with_lincomp(peft.LoraConfig(target_modules=["q_proj", "v_proj"])))
    ...train...; model.save_pretrained(folder)

Every lincomp code path (attention, ``set_attention_mode``, ``model.generate()``) sees through peft's wrapper.
"""

from __future__ import annotations

MODULE_NAME = "lincomp"   # the attribute linearize sets on each attention module


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


__all__ = ["with_lincomp"]
