"""``lincomp.linearize``: add the learned parts a spec needs to a model's attention layers, then hook the
model into its library: transformers' attention / mask registries, the spec recorded in ``config.json``
(``save_pretrained`` / ``from_pretrained`` restore it), the constant-memory cache of ``generate()`` and, when
peft is installed, adapters that train and save the learned tensors (``models/adapters.py``).
Diffusers Flux needs none of these (its attention processors are swapped in place).
"""

from __future__ import annotations

from torch import nn

from lincomp.models.linearize import is_flux, linearize_layers


def linearize(model: nn.Module, spec, *, target: str = "auto", fallback: str = "warn") -> nn.Module:
    """Add the learned parts ``spec`` needs to every attention layer of ``model`` and route attention through
    lincomp (in place; returns ``model``).

    ``spec``: an AttentionSpec / dict / JSON, or ``{module-name pattern: spec or None}`` (fnmatch; None or no
    match leaves a layer as it is). A causal model (Llama) makes the spec causal. ``target`` / ``fallback``: as
    for ``torch.ops.lincomp.attention``. Supported: transformers models whose attention uses
    ``ALL_ATTENTION_FUNCTIONS`` (Llama family, BERT family) and diffusers ``FluxTransformer2DModel``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if is_flux(model):
        return linearize_layers(model, spec, target=target, fallback=fallback)
    from lincomp.models import adapters, cache, hf   # transformers (and peft) load here, not at `import lincomp`
    hf.register()
    adapters.install_peft_hook()   # peft adapters then train and save the learned tensors (models/adapters.py)
    linearize_layers(model, spec, target=target, fallback=fallback)
    hf.record(model)      # config.json then says how to rebuild it (save_pretrained / from_pretrained)
    cache.install_generate(model)   # model.generate() then keeps a constant-memory LincompCache
    return model


__all__ = ["linearize"]
