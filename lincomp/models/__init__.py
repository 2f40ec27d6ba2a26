"""Linearised attention in real models: ``linearize``, the learned parts, capture / mode switches, generation.

Nothing here imports transformers or diffusers at import time; they load when a model of theirs is linearised.
"""

from lincomp.models.generate import Generated, cache_bytes, decoding, generate
from lincomp.models.api import linearize
from lincomp.models.linearize import (attention_mode, attention_modules, capture_attention, learned_parameters,
                                      set_attention_mode)
from lincomp.models.modules import Gate, HedgehogFeatureMap, LinearizedAttention

__all__ = ["linearize", "learned_parameters", "capture_attention", "set_attention_mode", "attention_mode",
           "attention_modules", "generate", "decoding", "cache_bytes", "Generated", "LinearizedAttention",
           "HedgehogFeatureMap", "Gate"]
